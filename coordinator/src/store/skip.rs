//! Decoding a stored record while skipping one of its fields.
//!
//! A trial record is mostly its full trial config, which a report never reads; building that
//! JSON tree for 100,000 trials takes longer than everything else a report does. The field is
//! still scanned (the JSON must be well-formed) but not built: it is decoded as unit, so a
//! `serde_json::Value` field becomes `null`. Works for any derived struct, whatever fields are
//! added to it later.

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, IntoDeserializer, MapAccess, Visitor};
use std::fmt;

/// Decodes `bytes` as a `T` whose field `field` is taken as unit (JSON null) whatever it holds.
pub fn from_slice_skipping<'de, T: serde::Deserialize<'de>>(
    bytes: &'de [u8],
    field: &'static str,
) -> serde_json::Result<T> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = T::deserialize(Skip { inner: &mut de, field })?;
    de.end()?;
    Ok(value)
}

struct Skip<D> {
    inner: D,
    field: &'static str,
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Skip<D> {
    type Error = D::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.inner.deserialize_any(SkipVisitor { visitor, field: self.field })
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.inner.deserialize_map(SkipVisitor { visitor, field: self.field })
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

struct SkipVisitor<V> {
    visitor: V,
    field: &'static str,
}

impl<'de, V: Visitor<'de>> Visitor<'de> for SkipVisitor<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.visitor.expecting(f)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.visitor.visit_map(SkipMap { map, field: self.field, skip_value: false })
    }
}

struct SkipMap<A> {
    map: A,
    field: &'static str,
    /// The key just read is the skipped field.
    skip_value: bool,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for SkipMap<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        let Some(key) = self.map.next_key::<String>()? else { return Ok(None) };
        self.skip_value = key == self.field;
        seed.deserialize(key.into_deserializer()).map(Some)
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, A::Error> {
        if std::mem::take(&mut self.skip_value) {
            self.map.next_value::<IgnoredAny>()?;
            seed.deserialize(().into_deserializer())
        } else {
            self.map.next_value_seed(seed)
        }
    }

    fn size_hint(&self) -> Option<usize> {
        self.map.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Rec {
        a: u32,
        config: serde_json::Value,
        b: Vec<String>,
        c: Option<f64>,
    }

    #[test]
    fn the_field_becomes_null_and_the_rest_is_kept() {
        let rec = Rec {
            a: 7,
            config: serde_json::json!({"deep": [1, {"x": "y\"z"}], "n": null}),
            b: vec!["p".into(), "q\n".into()],
            c: Some(0.5),
        };
        let bytes = serde_json::to_vec(&rec).unwrap();
        let back: Rec = from_slice_skipping(&bytes, "config").unwrap();
        assert_eq!(back, Rec { config: serde_json::Value::Null, ..rec });
        assert!(from_slice_skipping::<Rec>(b"{\"a\": 1, \"config\": [1,", "config").is_err());
        assert!(from_slice_skipping::<Rec>(b"{\"a\": 1}", "config").is_err(), "missing b");
    }
}
