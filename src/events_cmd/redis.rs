//! `tether events --from redis`: `XREAD BLOCK` on the stream of `[events.redis]`,
//! after its newest entry or from its start, printing the `event` field of each entry.

use super::{subscribed, EventsArgs, Printer, Since};
use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::AsyncCommands;
use tether_actors::settings::RedisSettings;

/// Reads the stream until `--count` events or an error.
pub async fn read(settings: &RedisSettings, args: &EventsArgs) -> Result<(), String> {
    let client = redis::Client::open(settings.url.as_str())
        .map_err(|e| format!("events.redis.url is not a usable Redis URL: {e}"))?;
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("cannot connect to Redis (events.redis.url): {e}; is it running?"))?;
    // `now` starts after the newest entry, read before announcing the subscription
    // so nothing published after the announcement is missed.
    let mut last_id = match args.since {
        Since::Now => {
            let newest: redis::streams::StreamRangeReply = connection
                .xrevrange_count(&settings.stream, "+", "-", 1)
                .await
                .map_err(|e| format!("XREVRANGE on {} failed: {e}", settings.stream))?;
            newest
                .ids
                .first()
                .map_or_else(|| "0-0".to_owned(), |entry| entry.id.clone())
        }
        Since::Beginning => "0-0".to_owned(),
    };
    subscribed(&format!("Redis stream {}", settings.stream));
    let mut printer = Printer::new(args);
    if printer.done() {
        return Ok(());
    }
    let options = StreamReadOptions::default().block(5000).count(500);
    loop {
        let reply: Option<StreamReadReply> = connection
            .xread_options(&[&settings.stream], &[&last_id], &options)
            .await
            .map_err(|e| format!("XREAD on {} failed: {e}", settings.stream))?;
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for entry in key.ids {
                last_id = entry.id.clone();
                let Some(json) = entry.get::<String>("event") else {
                    eprintln!(
                        "tether events: entry {} of {} has no `event` field; skipped",
                        entry.id, settings.stream
                    );
                    continue;
                };
                if !printer.print(&json) {
                    return Ok(());
                }
            }
        }
    }
}
