//! The cluster's line to Redis: one Redis server, or a Redis Cluster, behind one type.
//!
//! `cluster.redis_url` is either a `redis://` URL (one server, through redis's
//! `ConnectionManager`) or `redis+cluster://host:port,host:port,...`: the seed nodes of
//! a Redis Cluster, through redis's cluster client, which follows the slot map and its
//! `MOVED`/`ASK` redirections. Every key of one agent (and of one member) shares a hash
//! tag, so every script and every single command touches one slot (`keys.rs`). A
//! pipeline may span slots; on a Redis Cluster its commands are sent one after another,
//! in order (pipelines here are batches, never transactions).
//!
//! Pub/sub on a Redis Cluster: every node subscribes through a plain connection to the
//! first seed that answers, and every `PUBLISH` is sent to that same seed. A Redis
//! Cluster forwards a `PUBLISH` to all of its nodes, but the count of receivers it
//! answers (which tells a node whether the holder of an id still listens) covers only
//! the subscribers of the node it was sent to.

use super::{ClusterUnavailable, RESPONSE_TIMEOUT};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, Pipeline, RedisFuture, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The URL scheme of a Redis Cluster's seed list.
pub const CLUSTER_SCHEME: &str = "redis+cluster://";

/// Where the cluster's Redis is.
#[derive(Clone)]
pub struct RedisTarget {
    /// The URL as configured (names the target in logs and per-thread caches).
    url: String,
    /// One server: its client; a Redis Cluster: one per seed (for pub/sub), in order.
    plain: Vec<redis::Client>,
    /// A Redis Cluster's client.
    cluster: Option<redis::cluster::ClusterClient>,
    /// A Redis Cluster's seeds as `(host, port)`, in order.
    seeds: Arc<[(String, u16)]>,
    /// The seed the last pub/sub connection was made to (where `PUBLISH` goes).
    pubsub_at: Arc<AtomicUsize>,
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTarget")
            .field("url", &self.url)
            .finish()
    }
}

impl RedisTarget {
    /// Reads `cluster.redis_url`. Every connection made from it uses the cluster's
    /// timeouts (`RESPONSE_TIMEOUT`).
    pub fn open(url: &str) -> Result<Self, String> {
        let timeout = RESPONSE_TIMEOUT;
        let Some(seeds) = url.strip_prefix(CLUSTER_SCHEME) else {
            let plain = redis::Client::open(url).map_err(|e| e.to_string())?;
            return Ok(Self {
                url: url.to_owned(),
                plain: vec![plain],
                cluster: None,
                seeds: Arc::new([]),
                pubsub_at: Arc::default(),
            });
        };
        let addresses = seeds
            .trim_end_matches('/')
            .split(',')
            .map(str::trim)
            .filter(|seed| !seed.is_empty())
            .map(|seed| {
                let (host, port) = seed.rsplit_once(':').unwrap_or((seed, "6379"));
                let port = port
                    .parse::<u16>()
                    .map_err(|_| format!("{seed:?} is not host:port"))?;
                Ok((host.to_owned(), port))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let seeds: Vec<String> = addresses
            .iter()
            .map(|(host, port)| format!("redis://{host}:{port}/"))
            .collect();
        if seeds.is_empty() {
            return Err(format!("{CLUSTER_SCHEME} needs at least one host:port"));
        }
        let plain = seeds
            .iter()
            .map(|seed| redis::Client::open(seed.as_str()).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let cluster = ClusterClientBuilder::new(seeds.clone())
            .connection_timeout(timeout)
            .response_timeout(timeout)
            // Redirections after a failover count as retries.
            .retries(4)
            .min_retry_wait(20)
            .max_retry_wait(200)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            url: url.to_owned(),
            plain,
            cluster: Some(cluster),
            seeds: addresses.into(),
            pubsub_at: Arc::default(),
        })
    }

    /// The URL as configured.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A pub/sub connection: to the server itself, or to the first seed of a Redis
    /// Cluster that answers (so a seed that failed over is passed by).
    pub async fn pubsub(&self) -> redis::RedisResult<redis::aio::PubSub> {
        let mut failed = None;
        for (index, client) in self.plain.iter().enumerate() {
            match client.get_async_pubsub().await {
                Ok(pubsub) => {
                    self.pubsub_at.store(index, Ordering::Release);
                    return Ok(pubsub);
                }
                Err(error) => failed = Some(error),
            }
        }
        Err(failed
            .unwrap_or_else(|| (redis::ErrorKind::ClientError, "no Redis to subscribe to").into()))
    }

    /// Connects (one multiplexed connection, reconnecting by itself).
    pub async fn connect(self) -> Result<RedisLink, ClusterUnavailable> {
        let timeout = RESPONSE_TIMEOUT;
        let failed = |e: redis::RedisError| {
            ClusterUnavailable(format!("cannot connect to the cluster's Redis: {e}"))
        };
        match &self.cluster {
            Some(cluster) => Ok(RedisLink::Cluster(ClusterLink {
                connection: cluster.get_async_connection().await.map_err(failed)?,
                seeds: self.seeds.clone(),
                pubsub_at: self.pubsub_at.clone(),
            })),
            None => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(timeout)
                    .set_response_timeout(timeout)
                    .set_number_of_retries(1)
                    .set_max_delay(200);
                Ok(RedisLink::Single(
                    ConnectionManager::new_with_config(self.plain[0].clone(), config)
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
    Cluster(ClusterLink),
}

/// A connection to a Redis Cluster, and where its pub/sub happens.
#[derive(Clone)]
pub struct ClusterLink {
    connection: ClusterConnection,
    seeds: Arc<[(String, u16)]>,
    pubsub_at: Arc<AtomicUsize>,
}

impl ClusterLink {
    /// Sends one command: `PUBLISH` to the seed the subscribers listen on, anything
    /// else where the slot map says.
    async fn command(&mut self, cmd: &Cmd) -> redis::RedisResult<Value> {
        let publish = cmd
            .args_iter()
            .next()
            .is_some_and(|name| matches!(name, redis::Arg::Simple(name) if name.eq_ignore_ascii_case(b"PUBLISH")));
        let seed = self.seeds.get(self.pubsub_at.load(Ordering::Acquire));
        match seed {
            Some((host, port)) if publish => {
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                });
                self.connection.route_command(cmd, routing).await
            }
            _ => self.connection.req_packed_command(cmd).await,
        }
    }
}

impl ConnectionLike for RedisLink {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(connection) => connection.req_packed_command(cmd),
            Self::Cluster(link) => Box::pin(link.command(cmd)),
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
            Self::Cluster(link) => Box::pin(async move {
                let mut answers = Vec::with_capacity(count);
                for (index, cmd) in pipeline.cmd_iter().enumerate() {
                    let answer = link.command(cmd).await?;
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
            Self::Cluster(link) => link.connection.get_db(),
        }
    }
}
