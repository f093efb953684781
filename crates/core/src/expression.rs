//! Mapping expressions in CEL (Common Expression Language): safe by design —
//! no I/O, no loops beyond macros over the input's own lists — and limited in
//! length, so an expression's run time is bounded by its input.
//!
//! Each attribute an expression names is bound to its first value as a string,
//! or to `null` when it has none; `all` maps every available attribute to the
//! list of its values (`all["mail"]`). The result is a string, a list of
//! strings, a number or a boolean (written as text), or `null` for no value.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cel::objects::Value;
use cel::{Context, Program};

/// Longest expression accepted.
pub const MAX_LENGTH: usize = 2048;

/// The variable that holds every attribute's list of values.
pub const ALL: &str = "all";

/// Compiled expressions kept at most; a configuration holds far fewer.
const CACHE_LIMIT: usize = 4096;

/// The compiled form of `text`, compiled once per process: mappings are
/// evaluated for every change, and compiling is the expensive part.
///
/// # Errors
/// As [`Expression::compile`] (failures are not kept).
pub fn compiled(text: &str) -> Result<Arc<Expression>, String> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<Expression>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Mutex::default);
    if let Some(found) = cache.lock().ok().and_then(|c| c.get(text).cloned()) {
        return Ok(found);
    }
    let expression = Arc::new(Expression::compile(text)?);
    if let Ok(mut c) = cache.lock() {
        if c.len() >= CACHE_LIMIT {
            c.clear();
        }
        c.insert(text.to_owned(), expression.clone());
    }
    Ok(expression)
}

/// A compiled expression.
#[derive(Debug)]
pub struct Expression {
    program: Program,
    variables: Vec<String>,
}

impl Expression {
    /// # Errors
    /// The text is too long or is not valid CEL; the message says where.
    pub fn compile(text: &str) -> Result<Self, String> {
        if text.len() > MAX_LENGTH {
            return Err(format!(
                "is {} characters long; the limit is {MAX_LENGTH}",
                text.len()
            ));
        }
        let program = Program::compile(text).map_err(|e| format!("does not compile: {e}"))?;
        let variables = program
            .references()
            .variables()
            .into_iter()
            .filter(|v| *v != ALL)
            .map(str::to_owned)
            .collect();
        Ok(Self { program, variables })
    }

    /// Attributes the expression names (besides `all`).
    pub fn variables(&self) -> &[String] {
        &self.variables
    }

    /// Whether it reads `all` (so any attribute may be a source).
    pub fn reads_all(&self) -> bool {
        self.program.references().has_variable(ALL)
    }

    /// Runs the expression over the values `lookup` gives.
    ///
    /// # Errors
    /// A run-time error (a type mismatch, such as `null + "x"`), or a result of
    /// a type that is not a value.
    pub fn eval(
        &self,
        lookup: &dyn Fn(&str) -> Vec<String>,
        all: &dyn Fn() -> HashMap<String, Vec<String>>,
    ) -> Result<Vec<String>, String> {
        let mut context = Context::default();
        for name in &self.variables {
            match lookup(name).into_iter().next() {
                Some(v) => context.add_variable_from_value(name.as_str(), v),
                None => context.add_variable_from_value(name.as_str(), Value::Null),
            }
        }
        if self.reads_all() {
            let map: HashMap<String, Value> = all()
                .into_iter()
                .map(|(k, v)| {
                    (
                        k,
                        Value::List(Arc::new(v.into_iter().map(Value::from).collect())),
                    )
                })
                .collect();
            context.add_variable_from_value(ALL, map);
        }
        let value = self.program.execute(&context).map_err(|e| e.to_string())?;
        to_values(value)
    }

    /// Runs the expression as a condition: `true` or `false` (`null` is false).
    ///
    /// # Errors
    /// As [`Expression::eval`], and a result that is not a boolean.
    pub fn eval_bool(
        &self,
        lookup: &dyn Fn(&str) -> Vec<String>,
        all: &dyn Fn() -> HashMap<String, Vec<String>>,
    ) -> Result<bool, String> {
        let values = self.eval(lookup, all)?;
        match values.as_slice() {
            [] => Ok(false),
            [v] if v == "true" => Ok(true),
            [v] if v == "false" => Ok(false),
            other => Err(format!("a condition must be true or false, not {other:?}")),
        }
    }
}

fn to_values(value: Value) -> Result<Vec<String>, String> {
    match value {
        Value::Null => Ok(Vec::new()),
        Value::List(items) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items.iter() {
                out.extend(to_values(item.clone())?);
            }
            Ok(out)
        }
        Value::String(s) => Ok(vec![s.as_str().to_owned()]),
        Value::Int(i) => Ok(vec![i.to_string()]),
        Value::UInt(u) => Ok(vec![u.to_string()]),
        Value::Float(f) => Ok(vec![f.to_string()]),
        Value::Bool(b) => Ok(vec![b.to_string()]),
        other => Err(format!(
            "returned {:?}, which is not a value for an attribute",
            other.type_of()
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn run(text: &str, attrs: &[(&str, &[&str])]) -> Result<Vec<String>, String> {
        let e = Expression::compile(text)?;
        let lookup = |name: &str| {
            attrs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.iter().map(|s| (*s).to_owned()).collect())
                .unwrap_or_default()
        };
        let all = || {
            attrs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.iter().map(|s| (*s).to_owned()).collect()))
                .collect()
        };
        e.eval(&lookup, &all)
    }

    #[test]
    fn the_seed_full_name_expression() {
        let attrs: &[(&str, &[&str])] = &[("givenName", &["Will"]), ("familyName", &["Turner"])];
        assert_eq!(
            run("givenName + ' ' + familyName", attrs).unwrap(),
            ["Will Turner"]
        );
    }

    #[test]
    fn nulls_conditions_and_lists() {
        let attrs: &[(&str, &[&str])] = &[("uid", &["will"]), ("mail", &["a@x", "b@x"])];
        assert_eq!(
            run("title == null ? 'none' : title", attrs).unwrap(),
            ["none"]
        );
        assert_eq!(
            run("'uid=' + uid + ',ou=people'", attrs).unwrap(),
            ["uid=will,ou=people"]
        );
        assert_eq!(
            run("all['mail'].map(m, m + '.org')", attrs).unwrap(),
            ["a@x.org", "b@x.org"]
        );
        assert_eq!(run("size(all['mail'])", attrs).unwrap(), ["2"]);
        assert!(run("title", attrs).unwrap().is_empty());
    }

    #[test]
    fn compiled_once_and_shared() {
        let a = compiled("uid + '!'").unwrap();
        let b = compiled("uid + '!'").unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert!(compiled("uid +").is_err());
    }

    #[test]
    fn errors_say_what_went_wrong() {
        let err = run("givenName + ", &[]).unwrap_err();
        assert!(err.starts_with("does not compile"), "{err}");
        let err = run("title + 'x'", &[]).unwrap_err();
        assert!(!err.is_empty());
        let long = "a".repeat(MAX_LENGTH + 1);
        assert!(run(&long, &[]).unwrap_err().contains("limit"));
        let err = run("{'a': 1}", &[]).unwrap_err();
        assert!(err.contains("not a value"), "{err}");
    }
}
