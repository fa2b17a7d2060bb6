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

/// Parse YAML text into a generic JSON value (the shape sweep expansion works on).
pub fn to_json_value(text: &str) -> Result<serde_json::Value, YamlError> {
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
