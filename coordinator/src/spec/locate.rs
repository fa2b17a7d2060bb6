//! Find the line and column of a node in YAML text, given its path of keys and list indexes.
//!
//! serde_yaml values carry no source spans, but serde_yaml stamps every error raised while a
//! node is being visited with that node's position. So the locator walks the document with a
//! `DeserializeSeed` that skips everything off the path and raises a marker error on the target
//! node; the position of that error is the position of the node. It works for block and flow
//! style alike, and costs one parse per lookup, which is only paid on the error path.

use msae_shared::yaml;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::fmt;

/// One step of a path into the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    /// A mapping key (scalar keys are compared by their text).
    Key(String),
    /// A sequence element, 0-based.
    Index(usize),
}

impl From<&str> for Seg {
    fn from(s: &str) -> Self {
        Seg::Key(s.to_string())
    }
}

impl From<usize> for Seg {
    fn from(i: usize) -> Self {
        Seg::Index(i)
    }
}

/// A path (an array) from mixed keys and indexes: `segs!["parameters", "lr", "values", 2]`.
macro_rules! segs {
    ($($seg:expr),* $(,)?) => { [$($crate::spec::locate::Seg::from($seg)),*] };
}
pub(crate) use segs;

/// The marker error message; unlikely to collide with a real parse error.
const FOUND: &str = "\u{0}msae-locate-found\u{0}";

/// 1-based (line, column) of the node at `path`: of the key when the last step is a key, of the
/// element when it is an index. None when the path does not exist or the text does not parse.
pub fn locate(text: &str, path: &[Seg]) -> Option<(usize, usize)> {
    if path.is_empty() {
        return Some((1, 1));
    }
    match yaml::from_str_seed(text, Walk { path }) {
        // serde_yaml prefixes messages with the node's path (`metric.goal: ...`).
        Err(e) if e.message.ends_with(FOUND) => e.location,
        _ => None,
    }
}

/// Walks one node, following `path` (non-empty).
struct Walk<'p> {
    path: &'p [Seg],
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Seg::Key(want) = &self.path[0] else {
            return skip_map(map);
        };
        let last = self.path.len() == 1;
        while let Some(hit) = map.next_key_seed(KeyMatch { want, last })? {
            if hit {
                map.next_value_seed(Walk { path: &self.path[1..] })?;
                // Keys are unique in a sweep document; nothing else can match.
                return skip_map(map);
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Seg::Index(want) = self.path[0] else {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(());
        };
        let mut i = 0;
        loop {
            if i == want {
                if self.path.len() == 1 {
                    seq.next_element_seed(Hit)?;
                } else {
                    seq.next_element_seed(Walk { path: &self.path[1..] })?;
                }
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                return Ok(());
            }
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }

    // Scalars: the path goes deeper than the document; nothing to find.
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

fn skip_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

/// Reads one mapping key: Ok(true) if it is the wanted one and the path goes on, the marker
/// error (stamped with the key's position) if it is the wanted one and the path ends here.
struct KeyMatch<'a> {
    want: &'a str,
    last: bool,
}

impl<'de> DeserializeSeed<'de> for KeyMatch<'_> {
    type Value = bool;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl KeyMatch<'_> {
    fn check<E: de::Error>(&self, key: &str) -> Result<bool, E> {
        if key != self.want {
            Ok(false)
        } else if self.last {
            Err(E::custom(FOUND))
        } else {
            Ok(true)
        }
    }
}

impl<'de> Visitor<'de> for KeyMatch<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        self.check(v)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
        self.check(&v.to_string())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<bool, E> {
        self.check(&v.to_string())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<bool, E> {
        self.check(&v.to_string())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<bool, E> {
        self.check(&v.to_string())
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
    // Complex keys never match a path step; consume them.
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<bool, A::Error> {
        skip_map(map).map(|()| false)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(false)
    }
}

/// Raises the marker on whatever node it is given.
struct Hit;

impl<'de> DeserializeSeed<'de> for Hit {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Hit {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML node")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(FOUND))
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(FOUND))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(FOUND))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
# a comment
name: demo
metric:
  name: fvu   # trailing
  goal: minimize
parameters:
  lr:
    values: [0.1, 0.01,
             0.001]
  layer_k: {distribution: int_uniform, min: 4, max: 64}
  stripe_k:
    values:
      - 2
      - 4
";

    #[test]
    fn finds_block_keys() {
        assert_eq!(locate(DOC, &segs!["name"]), Some((2, 1)));
        assert_eq!(locate(DOC, &segs!["metric", "goal"]), Some((5, 3)));
        assert_eq!(locate(DOC, &segs!["parameters", "lr"]), Some((7, 3)));
    }

    #[test]
    fn finds_flow_keys_and_elements() {
        assert_eq!(locate(DOC, &segs!["parameters", "layer_k", "max"]), Some((10, 48)));
        assert_eq!(locate(DOC, &segs!["parameters", "lr", "values", 2]), Some((9, 14)));
        assert_eq!(locate(DOC, &segs!["parameters", "stripe_k", "values", 1]), Some((14, 9)));
    }

    #[test]
    fn missing_paths_are_none() {
        assert_eq!(locate(DOC, &segs!["nope"]), None);
        assert_eq!(locate(DOC, &segs!["name", "deeper"]), None);
        assert_eq!(locate(DOC, &segs!["parameters", "lr", "values", 9]), None);
        assert_eq!(locate("a: [unclosed\nb: 1\n", &segs!["b"]), None);
    }
}
