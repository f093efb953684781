//! Correlation rules as pure functions: which values a rule searches for, and
//! which candidates satisfy its conditions and its confirmation.

use crate::CoreError;
use std::collections::HashMap;

use crate::config::{Condition, CorrelationRule};
use crate::inbound::utf8_values;
use crate::model::{Focus, SourceChange};

/// (focus attribute, value) pairs that every match must hold.
pub type Query = Vec<(String, String)>;

/// The query of `conditions` for `change`: `None` when the entry has no value
/// for one of them (the rule does not apply).
///
/// # Errors
/// A source value that is not UTF-8.
pub fn query(change: &SourceChange, conditions: &[Condition]) -> Result<Option<Query>, CoreError> {
    let mut out = Vec::with_capacity(conditions.len());
    for c in conditions {
        let values = match (&c.source, &c.expression) {
            (Some(source), _) => utf8_values(change, source, &c.focus_attribute)?,
            (None, Some(text)) => {
                let mut inputs = Vec::new();
                for name in c.sources() {
                    let v = utf8_values(change, &name, &c.focus_attribute)?;
                    inputs.push((name, v));
                }
                let lookup = |name: &str| {
                    inputs
                        .iter()
                        .find(|(n, _)| n == name)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                };
                let fail = |reason: String| CoreError::Expression {
                    target: c.focus_attribute.clone(),
                    expression: text.clone(),
                    reason,
                };
                crate::expression::compiled(text)
                    .map_err(fail)?
                    .eval(&lookup, &HashMap::new)
                    .map_err(fail)?
            }
            (None, None) => Vec::new(),
        };
        let Some(first) = values.into_iter().next() else {
            return Ok(None);
        };
        out.push((c.focus_attribute.clone(), first));
    }
    Ok(Some(out))
}

/// Whether `focus` holds every pair of `query`.
pub fn matches(focus: &Focus, query: &[(String, String)]) -> bool {
    query.iter().all(|(attribute, value)| {
        focus
            .attributes
            .get(attribute)
            .is_some_and(|vals| vals.iter().any(|v| v == value))
    })
}

/// Narrows `candidates` (the IDM's answer to the first pair of `all`, the
/// rule's [`query`]) to those that satisfy all its conditions, then — if
/// several remain — to those that its confirmation accepts.
///
/// # Errors
/// A source value that is not UTF-8.
pub fn narrow(
    rule: &CorrelationRule,
    change: &SourceChange,
    all: &[(String, String)],
    mut candidates: Vec<Focus>,
) -> Result<Vec<Focus>, CoreError> {
    candidates.retain(|f| matches(f, all));
    if candidates.len() > 1 && !rule.confirmation.is_empty() {
        // An entry without the confirming values confirms nobody.
        let confirm = query(change, &rule.confirmation)?.unwrap_or_default();
        if confirm.is_empty() {
            candidates.clear();
        } else {
            candidates.retain(|f| matches(f, &confirm));
        }
    }
    Ok(candidates)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::model::ChangeKind;

    fn cond(f: &str, s: &str) -> Condition {
        Condition {
            focus_attribute: f.into(),
            source: Some(s.into()),
            expression: None,
        }
    }

    #[test]
    fn an_expression_computes_the_value_searched_for() {
        let c = Condition {
            focus_attribute: "name".into(),
            source: None,
            expression: Some("'x-' + uid".into()),
        };
        let q = query(&entry(&[("uid", "will")]), std::slice::from_ref(&c))
            .unwrap()
            .unwrap();
        assert_eq!(q, [("name".to_owned(), "x-will".to_owned())]);
        // A failing expression is an error naming it; a null result means the rule does not apply.
        assert!(query(&entry(&[]), &[c]).is_err());
        let null = Condition {
            focus_attribute: "name".into(),
            source: None,
            expression: Some("title".into()),
        };
        assert_eq!(query(&entry(&[]), &[null]).unwrap(), None);
    }

    fn entry(pairs: &[(&str, &str)]) -> SourceChange {
        SourceChange {
            resource: "hr".into(),
            entry_uuid: "u".into(),
            dn: "uid=x".into(),
            object_type: Default::default(),
            csn: None,
            kind: ChangeKind::Upsert {
                attributes: pairs
                    .iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), vec![v.as_bytes().to_vec()]))
                    .collect(),
            },
        }
    }

    fn user(id: &str, pairs: &[(&str, &str)]) -> Focus {
        Focus {
            id: id.into(),
            kind: "user".into(),
            attributes: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), vec![(*v).to_owned()]))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn all_conditions_must_hold() {
        let rule = CorrelationRule {
            conditions: vec![cond("givenName", "givenName"), cond("familyName", "sn")],
            confirmation: vec![],
        };
        let e = entry(&[("givenName", "Will"), ("sn", "Turner")]);
        let all = query(&e, &rule.conditions).unwrap().unwrap();
        let found = narrow(
            &rule,
            &e,
            &all,
            vec![
                user("a", &[("givenName", "Will"), ("familyName", "Turner")]),
                user("b", &[("givenName", "Will"), ("familyName", "Smith")]),
            ],
        )
        .unwrap();
        assert_eq!(
            found.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(),
            ["a"]
        );
    }

    #[test]
    fn a_missing_source_value_means_the_rule_does_not_apply() {
        let rule = CorrelationRule {
            conditions: vec![cond("employeeNumber", "employeeNumber")],
            confirmation: vec![],
        };
        assert_eq!(
            query(&entry(&[("uid", "x")]), &rule.conditions).unwrap(),
            None
        );
    }

    #[test]
    fn confirmation_narrows_several_candidates_only() {
        let rule = CorrelationRule {
            conditions: vec![cond("familyName", "sn")],
            confirmation: vec![cond("mail", "mail")],
        };
        let e = entry(&[("sn", "Turner"), ("mail", "will@example.com")]);
        let a = user(
            "a",
            &[("familyName", "Turner"), ("mail", "will@example.com")],
        );
        let b = user("b", &[("familyName", "Turner"), ("mail", "b@example.com")]);
        let all = query(&e, &rule.conditions).unwrap().unwrap();
        let found = narrow(&rule, &e, &all, vec![a.clone(), b.clone()]).unwrap();
        assert_eq!(found, vec![a]);
        // A single candidate is not second-guessed.
        assert_eq!(
            narrow(&rule, &e, &all, vec![b.clone()]).unwrap(),
            vec![b.clone()]
        );
        // Without the confirming value, several candidates confirm nobody.
        let bare = entry(&[("sn", "Turner")]);
        assert!(
            narrow(&rule, &bare, &all, vec![b.clone(), b])
                .unwrap()
                .is_empty()
        );
    }
}
