//! Reading a Redis stream the way a consumer of Tether's events does: `XREAD BLOCK`
//! going on from the last entry read, so nothing is read twice or skipped, and a new
//! connection on the next read after one failed (Redis restarted, or a test killed
//! it).

use redis::aio::MultiplexedConnection;
use redis::streams::{StreamId, StreamReadReply};
use std::time::Duration;

/// Where a [`StreamReader`] starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamStart {
    /// The oldest entry the stream keeps (`0-0`).
    Beginning,
    /// Entries added after the first read began (`$`).
    New,
}

/// A reader of one stream.
pub struct StreamReader {
    client: redis::Client,
    connection: Option<MultiplexedConnection>,
    stream: String,
    last_id: String,
}

impl StreamReader {
    /// A reader of `stream` at `url` (`redis://host:port`), not connected yet.
    pub fn new(url: &str, stream: &str, start: StreamStart) -> Result<Self, String> {
        let client = redis::Client::open(url)
            .map_err(|e| format!("{url} is not a usable Redis URL: {e}"))?;
        let last_id = match start {
            StreamStart::Beginning => "0-0",
            StreamStart::New => "$",
        };
        Ok(Self {
            client,
            connection: None,
            stream: stream.to_owned(),
            last_id: last_id.to_owned(),
        })
    }

    /// Connects unless connected ([`StreamReader::read`] does so itself; call this
    /// to find out at once whether Redis is there).
    pub async fn connect(&mut self) -> Result<&mut MultiplexedConnection, String> {
        if self.connection.is_none() {
            let connection = self
                .client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| format!("cannot connect to Redis: {e}; is it running?"))?;
            self.connection = Some(connection);
        }
        Ok(self.connection.as_mut().expect("connected above"))
    }

    /// Up to `count` entries after the last one read, waiting up to `block` for the
    /// first; empty when none came. On `Err` the connection is dropped and the next
    /// read opens a new one.
    pub async fn read(&mut self, block: Duration, count: usize) -> Result<Vec<StreamId>, String> {
        self.connect().await?;
        let Self {
            connection,
            stream,
            last_id,
            ..
        } = self;
        let reply: redis::RedisResult<Option<StreamReadReply>> = redis::cmd("XREAD")
            .arg("BLOCK")
            .arg(block.as_millis() as u64)
            .arg("COUNT")
            .arg(count)
            .arg("STREAMS")
            .arg(&*stream)
            .arg(&*last_id)
            .query_async(connection.as_mut().expect("connected above"))
            .await;
        let reply = match reply {
            Ok(reply) => reply,
            Err(e) => {
                *connection = None;
                return Err(format!("XREAD on {stream} failed: {e}"));
            }
        };
        let entries: Vec<StreamId> = reply
            .map(|r| r.keys)
            .unwrap_or_default()
            .into_iter()
            .flat_map(|key| key.ids)
            .collect();
        if let Some(last) = entries.last() {
            *last_id = last.id.clone();
        }
        Ok(entries)
    }
}
