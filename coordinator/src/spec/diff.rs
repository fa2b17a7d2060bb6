//! What changed between two sweep definitions, for the refusal to resume a sweep whose YAML
//! changed: `parameters.lr.max: 0.01 -> 0.02`, one line per differing key.
//!
//! Compares the YAML documents as parsed (so comments, key order and number spelling do not
//! count), in the user's own terms rather than the normalised spec's.

use serde_json::Value;

/// At most this many changes are listed; the rest are counted.
pub const MAX_LISTED: usize = 10;

/// The differing keys of two sweep YAML texts, as `path: old -> new` (`(absent)` for a key on
/// one side only). Empty when the documents are equal once parsed, or one does not parse.
pub fn changes(old_yaml: &str, new_yaml: &str) -> Vec<String> {
    let (Ok(old), Ok(new)) =
        (msae_shared::yaml::to_json_value(old_yaml), msae_shared::yaml::to_json_value(new_yaml))
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    walk("", &old, &new, &mut out);
    out
}

/// The changes as one clause: `a: 1 -> 2, b: x -> y (and 3 more)`.
pub fn summary(changes: &[String]) -> String {
    let mut text = changes.iter().take(MAX_LISTED).cloned().collect::<Vec<_>>().join(", ");
    if changes.len() > MAX_LISTED {
        text.push_str(&format!(" (and {} more)", changes.len() - MAX_LISTED));
    }
    text
}

fn walk(path: &str, old: &Value, new: &Value, out: &mut Vec<String>) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let sub = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => walk(&sub, x, y, out),
                    (x, y) => out.push(line(&sub, x, y)),
                }
            }
        }
        _ if same(old, new) => {}
        _ => out.push(line(path, Some(old), Some(new))),
    }
}

/// Equal values; numbers by value, so `0.01` and `1.0e-2`, or `2` and `2.0`, are the same.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        _ => a == b,
    }
}

fn line(path: &str, old: Option<&Value>, new: Option<&Value>) -> String {
    let show = |v: Option<&Value>| match v {
        None => "(absent)".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    };
    let path = if path.is_empty() { "(document)" } else { path };
    format!("{path}: {} -> {}", show(old), show(new))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_changed_added_and_removed_keys() {
        let old = "name: s\nmethod: grid\nparameters:\n  lr: {min: 0.01, max: 0.01}\n  k: {values: [1, 2]}\n";
        let new = "# a comment\nmethod: grid\nname: s\nparameters:\n  lr: {min: 1.0e-2, max: 0.02}\n  k: {values: [1, 3]}\nseed: 4\n";
        assert_eq!(
            changes(old, new),
            [
                "parameters.k.values: [1,2] -> [1,3]",
                "parameters.lr.max: 0.01 -> 0.02",
                "seed: (absent) -> 4"
            ]
        );
        assert!(changes(old, old).is_empty());
        let many: Vec<String> = (0..12).map(|i| format!("k{i}: 1 -> 2")).collect();
        assert!(summary(&many).ends_with("k9: 1 -> 2 (and 2 more)"), "{}", summary(&many));
    }
}
