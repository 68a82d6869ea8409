//! Decoding the server's `GET /events` stream as a client reads it: bytes in, in
//! whatever chunks the network delivers them; blocks out, each the lines up to a
//! blank line (`event: <type>`, `id: <id>`, `data: <json>`, or a `: comment`).
//!
//! Bytes are kept until a block is complete, so a character split across two
//! chunks is decoded whole.

/// Splits a server-sent-event byte stream into [`SseBlock`]s.
#[derive(Debug, Default)]
pub struct SseDecoder {
    buffer: Vec<u8>,
}

impl SseDecoder {
    /// A decoder that has read nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes read from the stream.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buffer.extend_from_slice(chunk);
    }

    /// The next complete block, if one has arrived; `None` until more bytes are
    /// pushed.
    pub fn next_block(&mut self) -> Option<SseBlock> {
        let end = self.buffer.windows(2).position(|pair| pair == b"\n\n")?;
        let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
        Some(SseBlock(String::from_utf8_lossy(&block).into_owned()))
    }
}

/// One block of the stream, with its terminating blank line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseBlock(String);

impl SseBlock {
    /// The value of the first `<name>: <value>` line.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.0
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(": "))
    }

    /// The `data:` line: the event document. `None` for a comment block.
    pub fn data(&self) -> Option<&str> {
        self.field("data")
    }

    /// The block as received.
    pub fn text(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_come_out_whole_whatever_the_chunks() {
        let stream = ": subscribed\n\nevent: agent.registered\nid: 1\ndata: {\"é\":1}\n\n";
        let mut decoder = SseDecoder::new();
        let mut blocks = Vec::new();
        for byte in stream.as_bytes() {
            decoder.push(std::slice::from_ref(byte));
            blocks.extend(std::iter::from_fn(|| decoder.next_block()));
        }
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0].data(), None);
        assert_eq!(blocks[1].field("event"), Some("agent.registered"));
        assert_eq!(blocks[1].field("id"), Some("1"));
        assert_eq!(blocks[1].data(), Some("{\"é\":1}"));
        assert_eq!(decoder.next_block(), None);
    }
}
