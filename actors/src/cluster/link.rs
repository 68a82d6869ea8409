//! The cluster's line to Redis: one Redis server, or a Redis Cluster, behind one type.
//!
//! `cluster.redis_url` is either a `redis://` URL (one server, through redis's
//! `ConnectionManager`) or `redis+cluster://host:port,host:port,...`: the seed nodes of
//! a Redis Cluster, through redis's cluster client, which follows the slot map and its
//! `MOVED`/`ASK` redirections. Every key of one agent (and of one member) shares a hash
//! tag, so every script and every single command touches one slot (`keys.rs`). A
//! pipeline may span slots; on a Redis Cluster its commands are sent one after another,
//! in order (pipelines here are batches, never transactions). Pub/sub goes through a
//! plain connection to the first seed: a Redis Cluster forwards every `PUBLISH` to all
//! of its nodes.

use super::ClusterUnavailable;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use std::time::Duration;

/// The URL scheme of a Redis Cluster's seed list.
pub const CLUSTER_SCHEME: &str = "redis+cluster://";

/// Where the cluster's Redis is.
#[derive(Clone)]
pub struct RedisTarget {
    /// The URL as configured (names the target in logs and per-thread caches).
    url: String,
    /// One server: the client; a Redis Cluster: the first seed (for pub/sub).
    plain: redis::Client,
    /// A Redis Cluster's client.
    cluster: Option<redis::cluster::ClusterClient>,
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTarget")
            .field("url", &self.url)
            .finish()
    }
}

impl RedisTarget {
    /// Reads `cluster.redis_url`; answers with the timeouts every connection uses.
    pub fn open(url: &str, timeout: Duration) -> Result<Self, String> {
        let Some(seeds) = url.strip_prefix(CLUSTER_SCHEME) else {
            let plain = redis::Client::open(url).map_err(|e| e.to_string())?;
            return Ok(Self {
                url: url.to_owned(),
                plain,
                cluster: None,
            });
        };
        let seeds: Vec<String> = seeds
            .trim_end_matches('/')
            .split(',')
            .map(str::trim)
            .filter(|seed| !seed.is_empty())
            .map(|seed| format!("redis://{seed}/"))
            .collect();
        let Some(first) = seeds.first() else {
            return Err(format!("{CLUSTER_SCHEME} needs at least one host:port"));
        };
        let plain = redis::Client::open(first.as_str()).map_err(|e| e.to_string())?;
        let cluster = ClusterClientBuilder::new(seeds.clone())
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .retries(2)
            .min_retry_wait(20)
            .max_retry_wait(200)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            url: url.to_owned(),
            plain,
            cluster: Some(cluster),
        })
    }

    /// The URL as configured.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A client for pub/sub (the server itself, or a Redis Cluster's first seed).
    pub fn pubsub_client(&self) -> &redis::Client {
        &self.plain
    }

    /// Connects (one multiplexed connection, reconnecting by itself).
    pub async fn connect(&self, timeout: Duration) -> Result<RedisLink, ClusterUnavailable> {
        let failed = |e: redis::RedisError| {
            ClusterUnavailable(format!("cannot connect to the cluster's Redis: {e}"))
        };
        match &self.cluster {
            Some(cluster) => Ok(RedisLink::Cluster(
                cluster.get_async_connection().await.map_err(failed)?,
            )),
            None => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(timeout)
                    .set_response_timeout(timeout)
                    .set_number_of_retries(1)
                    .set_max_delay(200);
                Ok(RedisLink::Single(
                    ConnectionManager::new_with_config(self.plain.clone(), config)
                        .await
                        .map_err(failed)?,
                ))
            }
        }
    }
}

/// A connection to the cluster's Redis (cheap to clone: multiplexed).
#[derive(Clone)]
pub enum RedisLink {
    /// One Redis server.
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisLink {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(connection) => connection.req_packed_command(cmd),
            Self::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(connection) => connection.req_packed_commands(pipeline, offset, count),
            // The cluster client routes a pipeline as one unit and refuses one that
            // spans slots: send its commands one by one, in order.
            Self::Cluster(connection) => Box::pin(async move {
                let mut answers = Vec::with_capacity(count);
                for (index, cmd) in pipeline.cmd_iter().enumerate() {
                    let answer = connection.req_packed_command(cmd).await?;
                    if (offset..offset + count).contains(&index) {
                        answers.push(answer);
                    }
                }
                Ok(answers)
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(connection) => connection.get_db(),
            Self::Cluster(connection) => connection.get_db(),
        }
    }
}
