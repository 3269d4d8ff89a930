//! The recorded API answers in `tests/fixtures/` (see its README), and one JSON shape
//! comparison that the Consul and Marathon double tests both hold their doubles to.

use serde_json::{Map, Value};

/// `tests/fixtures/<dir>/<name>`, parsed.
pub fn read(dir: &str, name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{dir}/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("fixture {path} cannot be read: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Where a double's answer may knowingly differ from a recorded one. The defaults: keys match
/// by name, array items by index, nothing skipped.
pub trait ShapeRules {
    /// An object at `path` whose keys are data, not schema.
    fn skip(&self, _path: &str) -> bool {
        false
    }
    /// Ours for the fixture's `key` in the object at `path`.
    fn counterpart<'a>(
        &self,
        ours: &'a Map<String, Value>,
        key: &str,
        _path: &str,
    ) -> Option<&'a Value> {
        ours.get(key)
    }
    /// A key of the fixture that the double may leave out.
    fn optional(&self, _key: &str, _path: &str) -> bool {
        false
    }
    /// Ours for the fixture's item `i` of an array.
    fn item<'a>(&self, ours: &'a [Value], i: usize, _fixture: &Value) -> Option<&'a Value> {
        ours.get(i)
    }
}

/// Every key of `fixture` exists in `ours` with a value of the same kind, recursively, but for
/// what `rules` allow. Returns one line per difference, each naming its path below `root`.
pub fn shape_differences(
    fixture: &Value,
    ours: &Value,
    root: &str,
    rules: &impl ShapeRules,
) -> Vec<String> {
    let mut found = Vec::new();
    compare(fixture, ours, root, rules, &mut found);
    found
}

fn compare(
    fixture: &Value,
    ours: &Value,
    path: &str,
    rules: &impl ShapeRules,
    found: &mut Vec<String>,
) {
    if kind(fixture) != kind(ours) {
        found.push(format!(
            "{path}: {} in the fixture, {} from the double",
            kind(fixture),
            kind(ours)
        ));
        return;
    }
    match (fixture, ours) {
        (Value::Object(_), Value::Object(_)) if rules.skip(path) => {}
        (Value::Object(fixture), Value::Object(ours)) => {
            for (key, value) in fixture {
                match rules.counterpart(ours, key, path) {
                    Some(ours) => compare(value, ours, &format!("{path}.{key}"), rules, found),
                    None if rules.optional(key, path) => {}
                    None => found.push(format!("{path}.{key}: missing from the double")),
                }
            }
        }
        (Value::Array(fixture), Value::Array(ours)) => {
            for (i, value) in fixture.iter().enumerate() {
                match rules.item(ours, i, value) {
                    Some(ours) => compare(value, ours, &format!("{path}[{i}]"), rules, found),
                    None if value.is_object() => {
                        found.push(format!("{path}[{i}]: missing from the double"))
                    }
                    None => {}
                }
            }
        }
        _ => {}
    }
}
