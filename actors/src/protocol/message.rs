//! A `message` frame between agents, read shallowly and written back with the server's
//! stamps.
//!
//! A message is forwarded with every field its sender wrote, so the server needs only
//! its routing fields and the places it stamps (`sender_id`, `message_id`, `timestamp`).
//! The frame is read in one pass as two maps, its top-level fields and its `data`
//! object's, whose values stay the JSON text they arrived as (borrowed from the frame):
//! no tree of the payload is built, and the forwarded text is those slices written back
//! in order. Values reach the recipient as their sender wrote them (numbers keep every
//! digit); the keys of the frame and of `data` come out sorted, as they always have.

use super::{FrameError, MessageKind};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

/// One object's fields, by key (unescaped).
type Fields<'a> = BTreeMap<Key<'a>, Field<'a>>;

/// A `{"type":"message","data":{...}}` frame, borrowing from the text it was read from.
#[derive(Debug)]
pub struct MessageFrame<'a> {
    /// The top-level fields; `data`'s entry stands for the `data` object below.
    fields: Fields<'a>,
    /// The `data` object's fields.
    data: Fields<'a>,
}

/// A field's value.
#[derive(Debug)]
enum Field<'a> {
    /// The JSON text the agent sent.
    Sent(&'a RawValue),
    /// A string the server wrote.
    Text(String),
    /// A number the server wrote.
    Number(u64),
    /// The top-level `data` object (its fields are kept apart).
    Data,
}

impl<'a> MessageFrame<'a> {
    /// Reads `text` as a message frame. `None` when it is anything else, including a
    /// message the general parse refuses (not JSON, `data` not an object, a number out
    /// of range, nested past serde_json's limit, the reserved key): that parse then
    /// explains why.
    pub(super) fn read(text: &'a str) -> Option<Self> {
        // Requests are not read twice: a message's type is spelled `"message"` or with a
        // `\u` escape (its letters have no other escape).
        if !text.contains(r#""message""#) && !text.contains(r"\u") {
            return None;
        }
        let frame: Self = serde_json::from_str(text).ok()?;
        let kind = frame.fields.get("type").and_then(Field::string)?;
        // The shallow read skips over values without reading them as the tree would.
        if kind.0 != "message" || !super::reserved::forwardable(text) {
            return None;
        }
        Some(frame)
    }

    /// Reads the routing of the message; `Err` carries the reason it cannot be routed.
    pub fn kind(&self) -> Result<MessageKind, FrameError> {
        let field = |name: &str| self.data.get(name).and_then(Field::string);
        match field("message_type").as_ref().map(|kind| &*kind.0) {
            Some("direct_message") => match field("target_agent_id") {
                Some(target) if !target.0.is_empty() => {
                    Ok(MessageKind::Direct(target.0.into_owned()))
                }
                _ => Err(FrameError(
                    "direct_message has no `target_agent_id` string".into(),
                )),
            },
            Some("broadcast_message") => {
                let ids: Option<Vec<&RawValue>> = match self.data.get("exclude_agent_ids") {
                    Some(Field::Sent(raw)) => serde_json::from_str(raw.get()).ok(),
                    _ => None,
                };
                let exclude = ids
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(string)
                    .map(|id| id.0.into_owned())
                    .collect();
                Ok(MessageKind::Broadcast(exclude))
            }
            // OpenAgents 0.5.x clients send `protocol_message` for what later became mods.
            Some("mod_message" | "protocol_message") => Ok(MessageKind::Mod),
            Some(other) => Err(FrameError(format!("unknown message_type `{other}`"))),
            None => Err(FrameError("message has no `data.message_type`".into())),
        }
    }

    /// Stamps the message as sent by `sender_id`: sets `data.sender_id` (and a
    /// top-level `sender_id`, if the frame has one: the server owns the field wherever
    /// it appears), fills in `data.message_id` and `data.timestamp` when missing, and
    /// returns the message id.
    pub fn stamp(&mut self, sender_id: &str) -> String {
        if let Some(forged) = self.fields.get_mut("sender_id") {
            *forged = Field::Text(sender_id.to_owned());
        }
        self.data
            .insert(Key::from("sender_id"), Field::Text(sender_id.to_owned()));
        let given = self.data.get("message_id").and_then(Field::string);
        let message_id = match given {
            Some(id) if !id.0.is_empty() => id.0.into_owned(),
            _ => {
                let id = uuid::Uuid::new_v4().to_string();
                self.data
                    .insert(Key::from("message_id"), Field::Text(id.clone()));
                id
            }
        };
        let timestamp = self.data.get("timestamp");
        if timestamp.is_none_or(|field| matches!(field, Field::Sent(raw) if raw.get() == "null")) {
            let now = Field::Number(crate::clock::epoch_ms());
            self.data.insert(Key::from("timestamp"), now);
        }
        message_id
    }

    /// The frame as forwarded: compact at the top and in `data`, every value as sent.
    pub fn to_text(&self) -> String {
        let size = |fields: &Fields| -> usize {
            let value = |field: &Field| match field {
                Field::Sent(raw) => raw.get().len(),
                Field::Text(text) => text.len() + 2,
                Field::Number(_) => 20,
                Field::Data => 0,
            };
            fields.iter().map(|(k, v)| k.0.len() + value(v) + 4).sum()
        };
        let mut text = Vec::with_capacity(size(&self.fields) + size(&self.data) + 2);
        write_object(&mut text, &self.fields, &self.data);
        String::from_utf8(text).expect("JSON keys and values are UTF-8")
    }
}

/// Writes `fields` as a JSON object, `data` where its entry stands.
fn write_object(out: &mut Vec<u8>, fields: &Fields, data: &Fields) {
    use std::io::Write as _;
    out.push(b'{');
    for (at, (key, value)) in fields.iter().enumerate() {
        if at > 0 {
            out.push(b',');
        }
        // Writing into a `Vec` cannot fail.
        let _ = serde_json::to_writer(&mut *out, &*key.0);
        out.push(b':');
        match value {
            Field::Sent(raw) => out.extend_from_slice(raw.get().as_bytes()),
            Field::Text(text) => {
                let _ = serde_json::to_writer(&mut *out, text);
            }
            Field::Number(number) => {
                let _ = write!(out, "{number}");
            }
            Field::Data => write_object(out, data, &Fields::new()),
        }
    }
    out.push(b'}');
}

impl<'a> Field<'a> {
    /// The string the agent sent here, if it sent one.
    fn string(&self) -> Option<Key<'a>> {
        match self {
            Field::Sent(raw) => string(raw),
            _ => None,
        }
    }
}

/// The string a JSON value holds, if it is one.
fn string(raw: &RawValue) -> Option<Key<'_>> {
    serde_json::from_str(raw.get()).ok()
}

/// Reads the frame's top level in one pass: `data`'s fields as a map of their own.
impl<'de> serde::Deserialize<'de> for MessageFrame<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(TopLevel)
    }
}

struct TopLevel;

impl<'de> Visitor<'de> for TopLevel {
    type Value = MessageFrame<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a message frame")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = Fields::new();
        // Like the tree, the last of repeated keys counts, `data` included.
        let mut data = None;
        while let Some(key) = map.next_key::<Key<'de>>()? {
            if key.0 == "data" {
                data = map.next_value_seed(DataObject)?;
                fields.insert(key, Field::Data);
            } else {
                fields.insert(key, Field::Sent(map.next_value()?));
            }
        }
        let data = data.ok_or_else(|| de::Error::custom("message has no `data` object"))?;
        Ok(MessageFrame { fields, data })
    }
}

/// Reads a `data` value: its fields when it is an object, `None` when it is not.
struct DataObject;

impl<'de> DeserializeSeed<'de> for DataObject {
    type Value = Option<Fields<'de>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DataObject {
    type Value = Option<Fields<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = Fields::new();
        while let Some(key) = map.next_key::<Key<'de>>()? {
            fields.insert(key, Field::Sent(map.next_value()?));
        }
        Ok(Some(fields))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<Self::Value, A::Error> {
        while items.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// An object key or string value: borrowed from the frame when it has no escapes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Key<'a>(Cow<'a, str>);

impl<'a> From<&'a str> for Key<'a> {
    fn from(key: &'a str) -> Self {
        Self(Cow::Borrowed(key))
    }
}

impl std::borrow::Borrow<str> for Key<'_> {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> serde::Deserialize<'de> for Key<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Key<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<Key<'de>, E> {
        Ok(Key(Cow::Borrowed(text)))
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Key<'de>, E> {
        Ok(Key(Cow::Owned(text.to_owned())))
    }

    fn visit_string<E: de::Error>(self, text: String) -> Result<Key<'de>, E> {
        Ok(Key(Cow::Owned(text)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{parse_frame, Inbound};
    use serde_json::{json, Value};

    fn read(text: &str) -> MessageFrame<'_> {
        match parse_frame(text) {
            Ok(Inbound::Message(message)) => message,
            other => panic!("{text} is not read as a message: {other:?}"),
        }
    }

    /// What the forwarded frame must equal: the frame as a tree, stamped as the server
    /// stamps (`message_id` and `timestamp` taken from the stamped frame when filled in).
    fn stamped_tree(text: &str, sender: &str, forwarded: &Value) -> Value {
        let mut frame: Value = serde_json::from_str(text).unwrap();
        if let Some(forged) = frame.get_mut("sender_id") {
            *forged = json!(sender);
        }
        let data = frame["data"].as_object_mut().unwrap();
        data.insert("sender_id".into(), json!(sender));
        if data
            .get("message_id")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            data.insert("message_id".into(), forwarded["data"]["message_id"].clone());
        }
        if data.get("timestamp").is_none_or(Value::is_null) {
            data.insert("timestamp".into(), forwarded["data"]["timestamp"].clone());
        }
        frame
    }

    #[test]
    fn a_forwarded_message_is_the_sent_one_with_the_servers_stamps_and_nothing_else() {
        let frames = [
            r#"{"type":"message","data":{"message_type":"direct_message","target_agent_id":"b","content":{"text":"hi"}}}"#,
            r#"{"type":"message","sender_id":"boss","data":{"message_type":"direct_message","target_agent_id":"b","sender_id":"mallory","x":1}}"#,
            r#" { "data" : { "message_type" : "broadcast_message" , "n" : [ 1 , 2.50 , -0 , 1e3 ] } , "type" : "message" , "z" : null } "#,
            r#"{"type":"message","data":{"message_type":"direct_message","target_agent_id":"b","message_id":"m-1","timestamp":17}}"#,
            r#"{"type":"message","data":{"message_type":"direct_message","target_agent_id":"b","message_id":"","timestamp":null}}"#,
            r#"{"type":"message","data":{"message_type":"direct_message","target_agent_id":"b","message_id":7}}"#,
            r#"{"type":"mess\u0061ge","d\u0061ta":{"message_type":"broadcast_message","k\"ey":"caf\u00e9 \ud83d\ude00","tab\t":"a\\b"}}"#,
            r#"{"type":"message","data":{"message_type":"broadcast_message","a":1,"a":2},"data":{"message_type":"direct_message","target_agent_id":"last"}}"#,
            r#"{"type":"message","data":{"message_type":"broadcast_message","big":123456789012345678901234567890,"deep":[[{"b":"]}"}]]}}"#,
        ];
        for text in frames {
            let mut message = read(text);
            let kind = message.kind();
            let id = message.stamp("alice");
            let forwarded: Value = serde_json::from_str(&message.to_text())
                .unwrap_or_else(|e| panic!("{text} was forwarded as no JSON: {e}"));
            assert_eq!(forwarded, stamped_tree(text, "alice", &forwarded), "{text}");
            assert_eq!(forwarded["data"]["message_id"], id.as_str(), "{text}");
            assert!(forwarded["data"]["timestamp"].is_number(), "{text}");
            let again = message.to_text();
            assert_eq!(read(&again).kind(), kind, "{again}");
        }
    }

    #[test]
    fn values_reach_the_recipient_as_their_sender_wrote_them() {
        let text = r#"{"type":"message","data":{"message_type":"broadcast_message","big":123456789012345678901234567890,"content":{"z": 1, "a": [1.50]}}}"#;
        let mut message = read(text);
        message.stamp("alice");
        let forwarded = message.to_text();
        assert!(
            forwarded.contains(r#""big":123456789012345678901234567890"#),
            "{forwarded}"
        );
        assert!(
            forwarded.contains(r#""content":{"z": 1, "a": [1.50]}"#),
            "{forwarded}"
        );
        assert!(
            forwarded.starts_with(r#"{"data":{"big":"#),
            "keys sorted: {forwarded}"
        );
    }

    #[test]
    fn stamping_overrides_sender_and_fills_missing_ids() {
        let mut message = read(
            r#"{"type":"message","sender_id":"boss","data":{"message_type":"direct_message","target_agent_id":"b","sender_id":"mallory","x":1}}"#,
        );
        let id = message.stamp("al\"ice");
        let frame: Value = serde_json::from_str(&message.to_text()).unwrap();
        assert_eq!(frame["data"]["sender_id"], "al\"ice");
        assert_eq!(frame["data"]["message_id"], id.as_str());
        assert!(frame["data"]["timestamp"].is_u64());
        assert_eq!(frame["data"]["x"], 1);
        assert_eq!(
            frame["sender_id"], "al\"ice",
            "the top-level copy is the server's too"
        );
    }

    #[test]
    fn frames_that_are_not_messages_are_left_to_the_tree() {
        for text in [
            r#"{"type":"system_request","command":"register_agent","agent_id":"a"}"#,
            r#"{"type":"system_request","command":"x","data":{"message":1}}"#,
            r#"{"type":"instruction_ack","instruction_id":"i","status":"done"}"#,
        ] {
            assert!(MessageFrame::read(text).is_none(), "{text}");
        }
        let escaped = r#"{"type":"\u006dessage","data":{"message_type":"broadcast_message"}}"#;
        assert!(MessageFrame::read(escaped).is_some());
    }

    #[test]
    fn routing_fields_are_read_as_the_tree_would_read_them() {
        let cases = [
            (
                r#"{"message_type":"direct_message","target_agent_id":"b"}"#,
                Ok(MessageKind::Direct("b".into())),
            ),
            (
                r#"{"message_type":"direct_message","target_agent_id":""}"#,
                Err(()),
            ),
            (
                r#"{"message_type":"direct_message","target_agent_id":3}"#,
                Err(()),
            ),
            (
                r#"{"message_type":"broadcast_message","exclude_agent_ids":["a",1,"b\u0021"]}"#,
                Ok(MessageKind::Broadcast(vec!["a".into(), "b!".into()])),
            ),
            (
                r#"{"message_type":"broadcast_message","exclude_agent_ids":"a"}"#,
                Ok(MessageKind::Broadcast(vec![])),
            ),
            (
                r#"{"message_type":"protocol_message"}"#,
                Ok(MessageKind::Mod),
            ),
            (r#"{"message_type":"other"}"#, Err(())),
            (r#"{"message_type":null}"#, Err(())),
        ];
        for (data, expected) in cases {
            let text = format!(r#"{{"type":"message","data":{data}}}"#);
            assert_eq!(read(&text).kind().map_err(|_| ()), expected, "{text}");
        }
    }

    #[test]
    fn a_message_with_a_value_the_tree_cannot_read_is_refused_as_before() {
        // Found by `cargo fuzz run protocol_frame`: the shallow read forwarded a number
        // out of `f64`'s range, which the tree (and so the old parse) refuses.
        let found = include_str!("../../../fuzz/found/protocol_frame-number-out-of-range.json");
        let unreadable = [
            found,
            r#"{"type":"message","data":{"message_type":"broadcast_message","n":1e400}}"#,
            r#"{"type":"message","data":{"message_type":"broadcast_message","n":[-1e309]}}"#,
            r#"{"type":"message","data":{"message_type":"broadcast_message","s":"\ud800"}}"#,
            r#"{"type":"message","data":{"message_type":"broadcast_message"},"x":{"s":"\uZZZZ"}}"#,
        ];
        for text in unreadable {
            let tree = serde_json::from_str::<Value>(text);
            assert!(tree.is_err(), "{text} is readable after all");
            let Err(FrameError(reason)) = parse_frame(text) else {
                panic!("{text} was accepted");
            };
            assert_eq!(
                reason,
                format!("frame is not valid JSON: {}", tree.unwrap_err()),
                "{text}"
            );
        }
        let tiny = r#"{"type":"message","data":{"message_type":"broadcast_message","n":1e-400}}"#;
        assert!(
            matches!(parse_frame(tiny), Ok(Inbound::Message(_))),
            "{tiny}"
        );
    }

    #[test]
    fn a_message_is_refused_exactly_where_the_tree_would_be() {
        for depth in [100, 125, 126, 127, 128, 129, 5_000] {
            // Brackets in strings do not nest.
            for filler in ["", r#""s":"[{\"[[","#] {
                let text = format!(
                    r#"{{"type":"message","data":{{"message_type":"broadcast_message",{filler}"x":{}1{}}}}}"#,
                    "[".repeat(depth),
                    "]".repeat(depth)
                );
                let tree = serde_json::from_str::<Value>(&text);
                let parsed = parse_frame(&text);
                assert_eq!(
                    parsed.is_ok(),
                    tree.is_ok(),
                    "depth {depth}, filler {filler:?}"
                );
                if let Err(FrameError(reason)) = parsed {
                    assert!(reason.contains("recursion limit"), "{reason}");
                }
            }
        }
        for text in [
            r#"{"type":"message","data":[1]}"#,
            r#"{"type":"message"}"#,
            r#"{"type":"message","data":{"message_type":"broadcast_message"}"#,
        ] {
            assert!(parse_frame(text).is_err(), "{text}");
        }
    }
}
