//! The Redis broker: `XADD <stream> MAXLEN ~ <maxlen> * event <json>` for every event
//! (PROTOCOL.md §8), plus `PUBLISH <channel> <json>` when `publish_channel` is set.
//! A batch goes as one pipeline over a [`ConnectionManager`]; the `XADD` replies are
//! the acknowledgement.

use super::broker::{redact_url, Broker, BrokerError, LossReporter, SendError, Timeouts};
use crate::event::SharedEvent;
use crate::settings::{secs, RedisSettings};
use futures_util::future::LocalBoxFuture;
use futures_util::FutureExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::sync::Arc;
use std::time::Duration;

/// Delivers events to a Redis stream.
pub struct RedisBroker {
    settings: Arc<RedisSettings>,
}

impl RedisBroker {
    /// A broker for `[events.redis]`.
    pub fn new(settings: RedisSettings) -> Self {
        Self {
            settings: Arc::new(settings),
        }
    }
}

async fn connect(settings: Arc<RedisSettings>) -> Result<ConnectionManager, BrokerError> {
    let where_ = redact_url(&settings.url);
    let client = redis::Client::open(settings.url.as_str()).map_err(|e| {
        BrokerError(format!(
            "events.redis.url `{where_}` is not a usable Redis URL: {e}"
        ))
    })?;
    // The manager's own reconnection is kept short: the publisher retries with its
    // own backoff and counts restarts.
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(secs(settings.connection_timeout))
        .set_response_timeout(secs(settings.response_timeout))
        .set_number_of_retries(1)
        .set_max_delay(100);
    let mut manager = ConnectionManager::new_with_config(client, config)
        .await
        .map_err(|e| BrokerError(format!("cannot connect to Redis at {where_}: {e}")))?;
    redis::cmd("PING")
        .query_async::<()>(&mut manager)
        .await
        .map_err(|e| BrokerError(format!("Redis at {where_} does not answer PING: {e}")))?;
    Ok(manager)
}

impl Broker for RedisBroker {
    type Client = ConnectionManager;

    fn name(&self) -> &'static str {
        "redis"
    }

    fn describe(&self) -> String {
        format!(
            "Redis {} (stream {})",
            redact_url(&self.settings.url),
            self.settings.stream
        )
    }

    fn timeouts(&self) -> Timeouts {
        let response = secs(self.settings.response_timeout);
        Timeouts {
            connect: secs(self.settings.connection_timeout) * 2 + response,
            send: response + Duration::from_secs(1),
            check: response,
        }
    }

    fn health_check_interval(&self) -> Duration {
        secs(self.settings.health_check_interval)
    }

    fn connect(
        &self,
        _lost: LossReporter,
    ) -> LocalBoxFuture<'static, Result<Self::Client, BrokerError>> {
        connect(self.settings.clone()).boxed_local()
    }

    fn send(
        &self,
        client: &Self::Client,
        batch: Vec<SharedEvent>,
    ) -> LocalBoxFuture<'static, Result<(), SendError>> {
        let mut manager = client.clone();
        let settings = self.settings.clone();
        async move {
            let mut pipe = redis::pipe();
            for event in &batch {
                pipe.cmd("XADD")
                    .arg(&settings.stream)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(settings.maxlen)
                    .arg("*")
                    .arg("event")
                    .arg(&event.json);
                if let Some(channel) = &settings.publish_channel {
                    pipe.cmd("PUBLISH").arg(channel).arg(&event.json).ignore();
                }
            }
            pipe.query_async::<Vec<redis::Value>>(&mut manager)
                .await
                .map(|_| ())
                .map_err(|e| SendError {
                    acked: 0,
                    error: BrokerError(format!("XADD to stream {} failed: {e}", settings.stream)),
                })
        }
        .boxed_local()
    }

    fn check(&self, client: &Self::Client) -> LocalBoxFuture<'static, Result<(), BrokerError>> {
        let mut manager = client.clone();
        async move {
            redis::cmd("PING")
                .query_async::<()>(&mut manager)
                .await
                .map_err(|e| BrokerError::new("PING failed", e))
        }
        .boxed_local()
    }

    fn close(&self, client: Self::Client) -> LocalBoxFuture<'static, ()> {
        async move { drop(client) }.boxed_local()
    }
}
