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
//! Pub/sub on a Redis Cluster: a Redis Cluster forwards a `PUBLISH` to all of its
//! nodes, but the count of receivers it answers (which tells a node whether the holder
//! of an id still listens) covers only the subscribers of the node that took it. So
//! every Tether node subscribes through a plain connection to the master of hash slot
//! 0, and every `PUBLISH` is routed to that master: the count then covers everyone.
//! After a failover both sides move to the new master of slot 0 (subscribers when
//! their connection drops, publishers with the slot map). While they disagree (a
//! master demoted while alive, a slot map not yet refreshed), [`RedisLink::publish`]
//! counts the subscribers of every node it knows (`PUBSUB NUMSUB`, summed by the
//! cluster client) before it says that nobody listens, and a subscriber checks every
//! [`ANCHOR_CHECK`] that slot 0 still has the master it subscribed through
//! (`RedisTarget::moved`), subscribing again when not.

use super::{ClusterUnavailable, RESPONSE_TIMEOUT};
use futures_util::StreamExt;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// How often a subscriber on a Redis Cluster checks that its node still masters slot 0.
pub const ANCHOR_CHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// `step`, failed as timed out unless done within `RESPONSE_TIMEOUT` (a Redis host gone
/// without a reset holds a connect or a reply for minutes).
async fn bounded<T>(
    what: &'static str,
    step: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> redis::RedisResult<T> {
    tokio::time::timeout(RESPONSE_TIMEOUT, step)
        .await
        .unwrap_or_else(|_| Err((redis::ErrorKind::IoError, "timed out", what.to_owned()).into()))
}

/// Where pub/sub happens on a Redis Cluster: the master of hash slot 0.
fn pubsub_route() -> RoutingInfo {
    RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(
        0,
        SlotAddr::Master,
    )))
}

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
        })
    }

    /// The URL as configured.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Subscribes to `channels` and hands every message to `deliver` (its channel and
    /// payload) until the subscription drops or, on a Redis Cluster, has to move
    /// ([`moved`](Self::moved)); `on_subscribed` runs once it is in place. `Err`: no
    /// subscription could be made. Every step before the messages is bounded by
    /// `RESPONSE_TIMEOUT`.
    pub async fn listen(
        &self,
        channels: &[&str],
        on_subscribed: impl FnOnce(),
        mut deliver: impl FnMut(&str, String),
    ) -> redis::RedisResult<Ended> {
        let Subscription { mut pubsub, at } = self.pubsub().await?;
        for channel in channels {
            bounded("SUBSCRIBE", pubsub.subscribe(*channel)).await?;
        }
        on_subscribed();
        let moved = self.moved(at);
        tokio::pin!(moved);
        let mut messages = pubsub.on_message();
        loop {
            let message = tokio::select! {
                message = messages.next() => message,
                () = &mut moved => return Ok(Ended::Moved),
            };
            let Some(message) = message else {
                return Ok(Ended::Dropped);
            };
            deliver(
                message.get_channel_name(),
                message.get_payload().unwrap_or_default(),
            );
        }
    }

    /// A pub/sub connection: to the server itself, or to the master of slot 0 of a
    /// Redis Cluster (where every `PUBLISH` goes), as the first seed that answers sees
    /// it; failing that, to the first seed that answers.
    async fn pubsub(&self) -> redis::RedisResult<Subscription> {
        if self.cluster.is_some() {
            match self.pubsub_master().await {
                Ok(master) => {
                    let client = redis::Client::open(format!("redis://{master}/"))?;
                    match bounded("connect", client.get_async_pubsub()).await {
                        Ok(pubsub) => {
                            let at = Some(master);
                            return Ok(Subscription { pubsub, at });
                        }
                        Err(error) => log::warn!(
                            "cluster: cannot subscribe through {master}, slot 0's master \
                             ({error}); subscribing through a seed"
                        ),
                    }
                }
                Err(error) => log::warn!(
                    "cluster: no master of slot 0 found ({error}); subscribing through a seed"
                ),
            }
        }
        let mut failed = None;
        for client in &self.plain {
            match bounded("connect", client.get_async_pubsub()).await {
                Ok(pubsub) => {
                    // On a Redis Cluster, `moved` tells whether this seed serves slot 0.
                    let at = self
                        .cluster
                        .as_ref()
                        .map(|_| client.get_connection_info().addr.to_string());
                    return Ok(Subscription { pubsub, at });
                }
                Err(error) => failed = Some(error),
            }
        }
        Err(failed
            .unwrap_or_else(|| (redis::ErrorKind::ClientError, "no Redis to subscribe to").into()))
    }

    /// `host:port` of the master of slot 0, as the first seed that answers sees it.
    async fn pubsub_master(&self) -> redis::RedisResult<String> {
        let mut failed = None;
        for client in &self.plain {
            let asking = async {
                let mut connection = client.get_multiplexed_async_connection().await?;
                redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query_async::<String>(&mut connection)
                    .await
            };
            match bounded("CLUSTER NODES", asking).await {
                Ok(nodes) => match slot_0_master(&nodes, false) {
                    Some(master) => return Ok(master),
                    None => {
                        failed = Some(
                            (
                                redis::ErrorKind::ClusterDown,
                                "no live master serves slot 0",
                            )
                                .into(),
                        )
                    }
                },
                Err(error) => failed = Some(error),
            }
        }
        Err(failed.unwrap_or_else(|| (redis::ErrorKind::ClientError, "no seed").into()))
    }

    /// Resolves once a subscription made at `at` ([`Subscription::at`]) is no longer
    /// where `PUBLISH` goes, checked every [`ANCHOR_CHECK`] on that Redis node itself:
    /// when it no longer is a master serving slot 0 (`CLUSTER NODES`, its own line: a
    /// master demoted by a failover, even alive, is not), when it says the cluster is
    /// not ok (`CLUSTER INFO`: cut off from the majority, which may promote another),
    /// or when it cannot be asked twice in a row (a host gone without a reset leaves
    /// the subscription itself waiting forever). Never on a single server.
    async fn moved(&self, at: Option<String>) {
        let Some(at) = at.filter(|_| self.cluster.is_some()) else {
            return std::future::pending().await;
        };
        let mut node = None;
        let mut unanswered = 0;
        loop {
            tokio::time::sleep(ANCHOR_CHECK).await;
            match serves_slot_0(&at, &mut node).await {
                Ok(true) => unanswered = 0,
                Ok(false) => {
                    return log::info!(
                        "cluster: {at} no longer serves slot 0 in an ok cluster: subscribing \
                         through slot 0's master"
                    )
                }
                Err(error) => {
                    node = None;
                    unanswered += 1;
                    if unanswered >= 2 {
                        return log::warn!(
                            "cluster: {at} did not answer twice ({error}): subscribing again"
                        );
                    }
                }
            }
        }
    }

    /// Connects (one multiplexed connection, reconnecting by itself).
    pub async fn connect(self) -> Result<RedisLink, ClusterUnavailable> {
        let timeout = RESPONSE_TIMEOUT;
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
                    ConnectionManager::new_with_config(self.plain[0].clone(), config)
                        .await
                        .map_err(failed)?,
                ))
            }
        }
    }
}

/// Whether the Redis Cluster node at `at` is a master serving slot 0 in a cluster it
/// says is ok; `node` keeps a connection to it across checks.
async fn serves_slot_0(
    at: &str,
    node: &mut Option<redis::aio::MultiplexedConnection>,
) -> redis::RedisResult<bool> {
    if node.is_none() {
        let client = redis::Client::open(format!("redis://{at}/"))?;
        *node = Some(bounded("connect", client.get_multiplexed_async_connection()).await?);
    }
    let connection = node.as_mut().expect("connected above");
    let mut asking = redis::pipe();
    asking
        .cmd("CLUSTER")
        .arg("INFO")
        .cmd("CLUSTER")
        .arg("NODES");
    let (info, nodes): (String, String) =
        bounded("CLUSTER INFO + NODES", asking.query_async(connection)).await?;
    Ok(info.contains("cluster_state:ok") && slot_0_master(&nodes, true).is_some())
}

/// How a subscription made by [`RedisTarget::listen`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Redis ended it (or the connection broke).
    Dropped,
    /// Slot 0 of the Redis Cluster moved away from the node it went to.
    Moved,
}

/// A pub/sub connection and the Redis Cluster node it goes to (`None`: a single
/// server).
struct Subscription {
    pubsub: redis::aio::PubSub,
    at: Option<String>,
}

/// The address (`host:port`) of the live master serving slot 0 in `CLUSTER NODES`
/// output; with `myself_only`, only if that is the node that answered.
fn slot_0_master(nodes: &str, myself_only: bool) -> Option<String> {
    nodes.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let flags: Vec<&str> = fields.get(2)?.split(',').collect();
        let serves_0 = fields
            .iter()
            .skip(8)
            .any(|range| *range == "0" || range.starts_with("0-"));
        let live_master =
            flags.contains(&"master") && !flags.contains(&"fail") && !flags.contains(&"fail?");
        let chosen = live_master && serves_0 && (!myself_only || flags.contains(&"myself"));
        chosen.then(|| {
            fields[1]
                .split(['@', ','])
                .next()
                .unwrap_or_default()
                .to_owned()
        })
    })
}

/// A connection to the cluster's Redis (cheap to clone: multiplexed).
#[derive(Clone)]
pub enum RedisLink {
    /// One Redis server.
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl RedisLink {
    /// Publishes `payload` on `channel` and tells whether anyone listens to it.
    pub async fn publish(&mut self, channel: &str, payload: &str) -> redis::RedisResult<bool> {
        let receivers: u64 = redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async(self)
            .await?;
        if receivers > 0 || matches!(self, Self::Single(_)) {
            return Ok(receivers > 0);
        }
        // The node that took it counted only its own subscribers: count everyone's.
        let subscribers: Vec<(String, u64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query_async(self)
            .await?;
        Ok(subscribers.iter().any(|(_, count)| *count > 0))
    }
}

/// Sends one command to a Redis Cluster: `PUBLISH` to the master of slot 0 (where
/// the subscribers are), anything else where the slot map says.
fn cluster_command<'a>(
    connection: &'a mut ClusterConnection,
    cmd: &'a Cmd,
) -> RedisFuture<'a, Value> {
    let publish = cmd.args_iter().next().is_some_and(
        |name| matches!(name, redis::Arg::Simple(name) if name.eq_ignore_ascii_case(b"PUBLISH")),
    );
    if publish {
        Box::pin(connection.route_command(cmd, pubsub_route()))
    } else {
        connection.req_packed_command(cmd)
    }
}

impl ConnectionLike for RedisLink {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(connection) => connection.req_packed_command(cmd),
            Self::Cluster(connection) => cluster_command(connection, cmd),
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
                    let answer = cluster_command(connection, cmd).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: &str = "\
b722 127.0.0.1:34847@43803 myself,slave 5c02 0 1796560480000 8 connected
496d 127.0.0.1:44053@45991 master - 0 1796560481063 3 connected 10923-16383
5c02 127.0.0.1:43903@33901 master - 0 1796560481063 8 connected 0-5460
dead 127.0.0.1:40000@40001 master,fail - 0 1796560481063 1 disconnected
1204 127.0.0.1:40113@36887 master - 0 1796560481063 2 connected 5461-10922
";

    #[test]
    fn the_live_master_serving_slot_0_is_found_in_cluster_nodes() {
        assert_eq!(
            slot_0_master(NODES, false).as_deref(),
            Some("127.0.0.1:43903")
        );
        assert_eq!(
            slot_0_master(NODES, true),
            None,
            "the answering node is a replica"
        );
        let promoted = NODES
            .replace("myself,slave 5c02", "myself,master -")
            .replace("connected\n496d", "connected 0-5460\n496d")
            .replace(
                "master - 0 1796560481063 8 connected 0-5460",
                "slave b722 0 0 8 connected",
            );
        assert_eq!(
            slot_0_master(&promoted, true).as_deref(),
            Some("127.0.0.1:34847")
        );
        let failed = "x 10.0.0.1:7000@17000,host master,fail - 0 0 1 connected 0-100\n";
        assert_eq!(
            slot_0_master(failed, false),
            None,
            "a failed master serves nothing"
        );
    }
}
