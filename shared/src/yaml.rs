//! The one place YAML is parsed (serde_yaml is archived; swapping it touches only this file).

use serde::de::DeserializeOwned;

/// A YAML error with the 1-based line and column where it was found, when known.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}{message}", location.map(|(l, c)| format!("line {l}, column {c}: ")).unwrap_or_default())]
pub struct YamlError {
    pub message: String,
    pub location: Option<(usize, usize)>,
}

impl From<serde_yaml::Error> for YamlError {
    fn from(e: serde_yaml::Error) -> Self {
        let location = e.location().map(|l| (l.line(), l.column()));
        // serde_yaml appends " at line L column C"; the location is reported separately.
        let mut message = e.to_string();
        if let Some(idx) = message.find(" at line ") {
            message.truncate(idx);
        }
        YamlError { message, location }
    }
}

/// Deserialize a value from YAML text.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, YamlError> {
    serde_yaml::from_str(text).map_err(YamlError::from)
}

/// Parse YAML text into a generic JSON value (the shape sweep expansion works on). A key
/// given twice in one mapping is an error (a JSON map would silently keep the last).
pub fn to_json_value(text: &str) -> Result<serde_json::Value, YamlError> {
    from_str::<serde_yaml::Value>(text)?;
    from_str(text)
}

/// Serialize a value as YAML.
pub fn to_string<T: serde::Serialize>(value: &T) -> Result<String, YamlError> {
    serde_yaml::to_string(value).map_err(YamlError::from)
}

/// Deserialize with a stateful seed. The coordinator uses it to find the line and column of a
/// key (serde_yaml values carry no spans, but an error raised while visiting a node does).
pub fn from_str_seed<'de, S>(text: &'de str, seed: S) -> Result<S::Value, YamlError>
where
    S: serde::de::DeserializeSeed<'de>,
{
    seed.deserialize(serde_yaml::Deserializer::from_str(text)).map_err(YamlError::from)
}

#[cfg(test)]
mod tests {
    #[test]
    fn duplicate_keys_are_refused_with_a_location() {
        let e = super::to_json_value("name: a\nmethod: grid\nmethod: random\n").unwrap_err();
        assert!(e.message.contains("duplicate entry with key \"method\""), "{e}");
        assert!(e.location.is_some());
        let e = super::to_json_value("base:\n  steps: 5\n  steps: 7\n").unwrap_err();
        assert!(e.message.contains("steps"), "{e}");
        assert_eq!(e.location.map(|l| l.0), Some(2));
        assert!(super::to_json_value("a: 1\nb: {a: 1}\n").is_ok());
    }
}
