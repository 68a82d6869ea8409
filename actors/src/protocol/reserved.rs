//! Object keys the server's JSON library reserves for itself, and a scan of a frame as
//! that library's tree would read it.
//!
//! serde_json (built with `raw_value`, which the event path uses) treats an object whose
//! first key is `$serde_json::private::RawValue` as a raw value: parsing
//! `{"$serde_json::private::RawValue":"[1]"}` yields the array `[1]`, and an object that
//! carries the key further down parses, but its re-serialization (keys sorted) does not
//! parse again. A frame with such a key anywhere would be altered or break later readers,
//! so it is refused as `invalid_frame`; every other key is forwarded as sent.
//!
//! The check costs nothing for ordinary frames: only a frame whose text holds
//! `RawValue` literally, or a `\u` escape of a character the token is made of (printable
//! ASCII, `\u0020`–`\u007f`), is scanned (a second, allocation-free pass of the
//! deserializer over its keys). Escapes of other characters, such as the `\u00e9` that
//! Python's `json.dumps` writes for every non-ASCII letter, do not trigger it.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// The key serde_json reserves (`serde_json::raw::TOKEN`, not public).
pub const RESERVED_KEY: &str = "$serde_json::private::RawValue";

/// `true` when some object in `text` (valid JSON) has the reserved key.
pub fn has_reserved_key(text: &str) -> bool {
    if !text.contains("RawValue") && !escapes_printable_ascii(text) {
        return false;
    }
    let mut reader = serde_json::Deserializer::from_str(text);
    KeyScan.deserialize(&mut reader).unwrap_or(false)
}

/// Whether a frame read shallowly (valid JSON syntax) may be forwarded as it is: the
/// scan reads every value as serde_json's tree would, without building it, so it fails
/// where the tree fails and a shallow read does not look (a number out of `f64`'s range,
/// objects nested past the recursion limit), and it finds the reserved key.
pub fn forwardable(text: &str) -> bool {
    let mut reader = serde_json::Deserializer::from_str(text);
    matches!(KeyScan.deserialize(&mut reader), Ok(false))
}

/// Whether `text` holds an escape `\u002x`–`\u007x`: the only escapes that can spell a
/// character of [`RESERVED_KEY`].
fn escapes_printable_ascii(text: &str) -> bool {
    text.match_indices("\\u00")
        .any(|(at, _)| matches!(text.as_bytes().get(at + 4), Some(b'2'..=b'7')))
}

/// Visits a JSON value, answering whether any object key in it is [`RESERVED_KEY`].
#[derive(Clone, Copy)]
struct KeyScan;

impl<'de> DeserializeSeed<'de> for KeyScan {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeyScan {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<bool, A::Error> {
        let mut found = false;
        while let Some(inner) = items.next_element_seed(KeyScan)? {
            found |= inner;
        }
        Ok(found)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut entries: A) -> Result<bool, A::Error> {
        let mut found = false;
        while let Some(key) = entries.next_key_seed(KeyIs)? {
            found |= key;
            found |= entries.next_value_seed(KeyScan)?;
        }
        Ok(found)
    }
}

/// Reads a key (borrowed when it has no escapes), answering whether it is reserved.
struct KeyIs;

impl<'de> DeserializeSeed<'de> for KeyIs {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<bool, E> {
        Ok(key == RESERVED_KEY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_frames_have_no_reserved_key() {
        for text in [
            r#"{"type":"message","data":{"a":[1,{"b":null}],"RawValue":true}}"#,
            r#"{"type":"message","data":{"text":"caf\u00e9"}}"#,
            r#"[1,2,"$serde_json::private::RawValue"]"#,
        ] {
            assert!(!has_reserved_key(text), "{text}");
        }
    }

    #[test]
    fn only_escapes_of_printable_ascii_can_spell_the_key() {
        assert!(!escapes_printable_ascii(
            r#"{"text":"caf\u00e9 \u0001 \ud83d\ude00"}"#
        ));
        assert!(escapes_printable_ascii(r#"{"k":"\u0024"}"#));
        assert!(escapes_printable_ascii(r#"{"k":"\u007A"}"#));
    }

    #[test]
    fn the_reserved_key_is_found_at_any_depth_and_in_any_spelling() {
        for text in [
            r#"{"$serde_json::private::RawValue":"[1]"}"#,
            r#"{"type":"message","data":{"x":1,"$serde_json::private::RawValue":"m-1"}}"#,
            r#"{"a":[{"b":{"$serde_json::private::RawValue":1}}]}"#,
            r#"{"a":{"\u0024serde_json::private::Raw\u0056alue":1}}"#,
        ] {
            assert!(has_reserved_key(text), "{text}");
        }
    }
}
