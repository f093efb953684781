//! Mapping evaluation: string templates, the values a mapping produces, and
//! how a mapping's strength decides whether those values are written.

use std::fmt;

use std::collections::HashMap;

use crate::CoreError;
use crate::config::{Mapping, Range, Strength};
use crate::model::Attrs;

/// A string template with `{attribute}` placeholders; `{{` and `}}` are literal braces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Text(String),
    Var(String),
}

/// Why a template does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    pub template: String,
    pub reason: String,
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "template {:?}: {}", self.template, self.reason)
    }
}

impl std::error::Error for TemplateError {}

impl Template {
    /// # Errors
    /// An unclosed `{`, a stray `}`, or an empty or non-attribute placeholder.
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let bad = |reason: &str| TemplateError {
            template: text.to_owned(),
            reason: reason.to_owned(),
        };
        let mut segments = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c)
                                if c.is_ascii_alphanumeric()
                                    || c == '-'
                                    || c == '_'
                                    || c == ';' =>
                            {
                                name.push(c)
                            }
                            Some(c) => {
                                return Err(bad(&format!(
                                    "{c:?} cannot be part of an attribute name"
                                )));
                            }
                            None => return Err(bad("a '{' is never closed")),
                        }
                    }
                    if name.is_empty() {
                        return Err(bad("empty placeholder {}"));
                    }
                    if !literal.is_empty() {
                        segments.push(Segment::Text(std::mem::take(&mut literal)));
                    }
                    segments.push(Segment::Var(name));
                }
                '}' => return Err(bad("a '}' has no matching '{' (write '}}' for a brace)")),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            segments.push(Segment::Text(literal));
        }
        Ok(Self { segments })
    }

    pub fn variables(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Var(v) => Some(v.as_str()),
            Segment::Text(_) => None,
        })
    }

    /// Renders with each placeholder replaced by `lookup(name)` passed through
    /// `escape`. Returns the first placeholder without a value as the error.
    pub fn render<'a>(
        &self,
        lookup: impl Fn(&str) -> Option<&'a str>,
        escape: impl Fn(&str) -> String,
    ) -> Result<String, String> {
        let mut out = String::new();
        for s in &self.segments {
            match s {
                Segment::Text(t) => out.push_str(t),
                Segment::Var(v) => match lookup(v) {
                    Some(value) => out.push_str(&escape(value)),
                    None => return Err(v.clone()),
                },
            }
        }
        Ok(out)
    }
}

/// The values `mapping` produces; `lookup` gives the values of a source
/// attribute and `all` every attribute (for expressions that read `all`).
/// A template with a missing source produces nothing.
///
/// # Errors
/// An expression that fails to compile or to run.
pub fn evaluate(
    mapping: &Mapping,
    lookup: &dyn Fn(&str) -> Vec<String>,
    all: &dyn Fn() -> HashMap<String, Vec<String>>,
) -> Result<Vec<String>, CoreError> {
    if let Some(source) = &mapping.source {
        return Ok(lookup(source));
    }
    if let Some(value) = &mapping.value {
        return Ok(vec![value.clone()]);
    }
    if let Some(text) = &mapping.expression {
        let fail = |reason: String| CoreError::Expression {
            target: mapping.target.clone(),
            expression: text.clone(),
            reason,
        };
        let e = crate::expression::compiled(text).map_err(fail)?;
        return e.eval(lookup, all).map_err(fail);
    }
    Ok(evaluate_template(mapping, lookup))
}

/// Whether `mapping` applies: its condition holds (a mapping without one always applies).
///
/// # Errors
/// A condition that fails to compile or run, or is not a boolean.
pub fn applies(
    mapping: &Mapping,
    lookup: &dyn Fn(&str) -> Vec<String>,
    all: &dyn Fn() -> HashMap<String, Vec<String>>,
) -> Result<bool, CoreError> {
    let Some(text) = &mapping.condition else {
        return Ok(true);
    };
    let fail = |reason: String| CoreError::Expression {
        target: mapping.target.clone(),
        expression: text.clone(),
        reason,
    };
    crate::expression::compiled(text)
        .map_err(fail)?
        .eval_bool(lookup, all)
        .map_err(fail)
}

fn evaluate_template(mapping: &Mapping, lookup: &dyn Fn(&str) -> Vec<String>) -> Vec<String> {
    let Some(Ok(template)) = mapping.template.as_deref().map(Template::parse) else {
        return Vec::new();
    };
    let firsts: Vec<(String, Option<String>)> = template
        .variables()
        .map(|v| (v.to_owned(), lookup(v).into_iter().next()))
        .collect();
    let found = |name: &str| {
        firsts
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    };
    template
        .render(found, str::to_owned)
        .map(|s| vec![s])
        .unwrap_or_default()
}

/// Writes `output` into `target[name]` as `strength` allows. `sources_changed`
/// says whether any source of the mapping changed (normal strength acts only
/// then). Returns whether `target` changed.
pub fn apply(
    strength: Strength,
    name: &str,
    output: Vec<String>,
    sources_changed: bool,
    target: &mut Attrs,
) -> bool {
    let current_empty = target.get(name).is_none_or(Vec::is_empty);
    let write = match strength {
        Strength::Strong => true,
        Strength::Normal => sources_changed,
        Strength::Weak => current_empty && !output.is_empty(),
    };
    if !write {
        return false;
    }
    let mut output = output;
    dedup_in_order(&mut output);
    if output.is_empty() {
        return target.remove(name).is_some_and(|v| !v.is_empty());
    }
    if target.get(name) == Some(&output) {
        return false;
    }
    target.insert(name.to_owned(), output);
    true
}

/// As [`apply`], for a mapping whose range is [`Range::Mapped`]: it removes
/// only values of `old_output` (what it produced from the previous state of
/// its sources) that it no longer produces, and adds what it produces now.
pub fn apply_mapped_range(
    strength: Strength,
    name: &str,
    old_output: &[String],
    output: Vec<String>,
    sources_changed: bool,
    target: &mut Attrs,
) -> bool {
    let current = target.get(name).cloned().unwrap_or_default();
    let write = match strength {
        Strength::Strong => true,
        Strength::Normal => sources_changed,
        Strength::Weak => current.is_empty() && !output.is_empty(),
    };
    if !write {
        return false;
    }
    let dropped: Vec<&String> = old_output.iter().filter(|v| !output.contains(v)).collect();
    let mut next: Vec<String> = current
        .iter()
        .filter(|v| !dropped.contains(v))
        .cloned()
        .collect();
    for v in output {
        if !next.contains(&v) {
            next.push(v);
        }
    }
    if next == current {
        return false;
    }
    if next.is_empty() {
        target.remove(name);
    } else {
        target.insert(name.to_owned(), next);
    }
    true
}

/// Applies `mapping` by its range: `old_output` is what it produced from the
/// previous state of its sources (used only by [`Range::Mapped`]).
pub fn apply_mapping(
    mapping: &Mapping,
    old_output: &[String],
    output: Vec<String>,
    sources_changed: bool,
    target: &mut Attrs,
) -> bool {
    match mapping.range {
        Range::All => apply(
            mapping.strength,
            &mapping.target,
            output,
            sources_changed,
            target,
        ),
        Range::Mapped => apply_mapped_range(
            mapping.strength,
            &mapping.target,
            old_output,
            output,
            sources_changed,
            target,
        ),
    }
}

/// Removes repeated values, keeping the first occurrence of each.
pub fn dedup_in_order(values: &mut Vec<String>) {
    let mut seen = std::collections::BTreeSet::new();
    values.retain(|v| seen.insert(v.clone()));
}

/// Escapes a value for use inside a DN (RFC 4514).
pub fn escape_dn_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        match c {
            ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            '\0' => out.push_str("\\00"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn mapping(strength: Strength) -> Mapping {
        Mapping {
            source: Some("cn".into()),
            value: None,
            template: None,
            expression: None,
            condition: None,
            target: "fullName".into(),
            strength,
            range: Range::All,
        }
    }

    #[test]
    fn template_renders_and_reports_missing() {
        let t = Template::parse("{givenName} {familyName}").unwrap();
        let vals = [("givenName", "Will"), ("familyName", "Turner")];
        let look = |n: &str| vals.iter().find(|(k, _)| *k == n).map(|(_, v)| *v);
        assert_eq!(t.render(look, str::to_owned).unwrap(), "Will Turner");
        let none = |_: &str| None;
        assert_eq!(t.render(none, str::to_owned).unwrap_err(), "givenName");
        assert!(Template::parse("cn={name").is_err());
        assert!(Template::parse("cn={}").is_err());
        assert!(Template::parse("a}b").is_err());
        assert_eq!(
            Template::parse("{{x}}")
                .unwrap()
                .render(none, str::to_owned)
                .unwrap(),
            "{x}"
        );
    }

    #[test]
    fn weak_fills_only_empty_targets() {
        let mut t = Attrs::new();
        assert!(apply(
            Strength::Weak,
            "fullName",
            vec!["A".into()],
            true,
            &mut t
        ));
        assert!(!apply(
            Strength::Weak,
            "fullName",
            vec!["B".into()],
            true,
            &mut t
        ));
        assert_eq!(t["fullName"], vec!["A"]);
    }

    #[test]
    fn normal_follows_changed_sources_only() {
        let mut t = Attrs::from([("fullName".to_owned(), vec!["local".to_owned()])]);
        assert!(!apply(
            Strength::Normal,
            "fullName",
            vec!["X".into()],
            false,
            &mut t
        ));
        assert!(apply(
            Strength::Normal,
            "fullName",
            vec!["X".into()],
            true,
            &mut t
        ));
        assert_eq!(t["fullName"], vec!["X"]);
    }

    #[test]
    fn strong_always_wins_and_removes() {
        let mut t = Attrs::from([("fullName".to_owned(), vec!["local".to_owned()])]);
        assert!(apply(
            Strength::Strong,
            "fullName",
            vec!["X".into()],
            false,
            &mut t
        ));
        assert!(apply(Strength::Strong, "fullName", vec![], false, &mut t));
        assert!(!t.contains_key("fullName"));
    }

    #[test]
    fn evaluate_kinds() {
        let look = |n: &str| match n {
            "cn" => vec!["Jack Sparrow".to_owned()],
            _ => vec![],
        };
        assert_eq!(
            evaluate(&mapping(Strength::Normal), &look, &HashMap::new).unwrap(),
            vec!["Jack Sparrow"]
        );
        let mut lit = mapping(Strength::Normal);
        lit.source = None;
        lit.value = Some("Created by IDM".into());
        assert_eq!(
            evaluate(&lit, &look, &HashMap::new).unwrap(),
            vec!["Created by IDM"]
        );
        let mut tpl = mapping(Strength::Normal);
        tpl.source = None;
        tpl.template = Some("{cn}/{missing}".into());
        assert!(evaluate(&tpl, &look, &HashMap::new).unwrap().is_empty());
        let mut expr = mapping(Strength::Normal);
        expr.source = None;
        expr.expression = Some("cn + '!'".into());
        assert_eq!(
            evaluate(&expr, &look, &HashMap::new).unwrap(),
            vec!["Jack Sparrow!"]
        );
        expr.expression = Some("missing + '!'".into());
        let err = evaluate(&expr, &look, &HashMap::new)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("mapping to \"fullName\": expression \"missing + '!'\""),
            "{err}"
        );
    }

    #[test]
    fn dn_values_are_escaped() {
        assert_eq!(escape_dn_value("Smith, John"), "Smith\\, John");
        assert_eq!(escape_dn_value(" #a+b "), "\\ #a\\+b\\ ");
        assert_eq!(escape_dn_value("#x"), "\\#x");
    }

    #[test]
    fn a_condition_gates_its_mapping() {
        let look = |n: &str| match n {
            "employeeType" => vec!["staff".to_owned()],
            _ => vec![],
        };
        let mut m = mapping(Strength::Normal);
        assert!(
            applies(&m, &look, &HashMap::new).unwrap(),
            "no condition: applies"
        );
        m.condition = Some("employeeType == 'staff'".into());
        assert!(applies(&m, &look, &HashMap::new).unwrap());
        m.condition = Some("employeeType == 'contractor'".into());
        assert!(!applies(&m, &look, &HashMap::new).unwrap());
        m.condition = Some("title == null".into());
        assert!(applies(&m, &look, &HashMap::new).unwrap());
        m.condition = Some("employeeType".into());
        let err = applies(&m, &look, &HashMap::new).unwrap_err().to_string();
        assert!(err.contains("must be true or false"), "{err}");
        assert!(m.sources().contains(&"employeeType".to_owned()));
    }

    #[test]
    fn mapped_range_keeps_foreign_values() {
        let mut t = Attrs::from([(
            "mail".to_owned(),
            vec!["own@hr".to_owned(), "local@idm".to_owned()],
        )]);
        let changed = apply_mapped_range(
            Strength::Normal,
            "mail",
            &["own@hr".into()],
            vec!["new@hr".into()],
            true,
            &mut t,
        );
        assert!(changed);
        assert_eq!(t["mail"], vec!["local@idm", "new@hr"]);
    }

    proptest! {
        /// A mapping with the mapped range never removes a value it did not produce.
        #[test]
        fn mapped_range_removes_only_its_own(foreign in proptest::collection::vec("f[a-z]{1,3}", 0..4),
                                             old in proptest::collection::vec("m[a-z]{1,3}", 0..4),
                                             new in proptest::collection::vec("m[a-z]{1,3}", 0..4),
                                             changed in any::<bool>(), s in 0u8..3) {
            let strength = [Strength::Weak, Strength::Normal, Strength::Strong][s as usize];
            let mut current = foreign.clone();
            current.extend(old.iter().cloned());
            let mut t = Attrs::from([("a".to_owned(), current.clone())]);
            let wrote = apply_mapped_range(strength, "a", &old, new.clone(), changed, &mut t);
            let after = t.get("a").cloned().unwrap_or_default();
            for f in &foreign {
                prop_assert!(after.contains(f), "{f} was removed");
            }
            if wrote {
                for v in &new {
                    prop_assert!(after.contains(v));
                }
                for v in old.iter().filter(|v| !new.contains(v) && !foreign.contains(v)) {
                    prop_assert!(!after.contains(v), "{v} should be gone");
                }
            } else {
                prop_assert_eq!(after, current);
            }
        }

        /// Applying the same mapping output twice changes nothing the second time.
        #[test]
        fn apply_is_idempotent(values in proptest::collection::vec("[a-z]{0,4}", 0..4),
                               changed in any::<bool>(),
                               s in 0u8..3) {
            let strength = [Strength::Weak, Strength::Normal, Strength::Strong][s as usize];
            let mut t = Attrs::new();
            apply(strength, "a", values.clone(), changed, &mut t);
            let snapshot = t.clone();
            prop_assert!(!apply(strength, "a", values, changed, &mut t));
            prop_assert_eq!(snapshot, t);
        }

        /// A weak mapping never overwrites an existing value.
        #[test]
        fn weak_never_overwrites(existing in "[a-z]{1,4}", values in proptest::collection::vec("[a-z]{0,4}", 0..4)) {
            let mut t = Attrs::from([("a".to_owned(), vec![existing.clone()])]);
            apply(Strength::Weak, "a", values, true, &mut t);
            prop_assert_eq!(&t["a"], &vec![existing]);
        }
    }
}
