//! The HTTP side of a cluster: `GET /cluster/nodes`, `GET /connect` (placement), and
//! the cluster-wide answers of `GET /agents`, `GET /agents/{id}`,
//! `DELETE /agents/{id}` and the totals of `GET /stats`.
//!
//! An agent held on this node is described by the registry in full; one held on
//! another node by its claim in Redis (id, node, session, incarnation, metadata,
//! registration time): its holder's own `GET /agents/{id}` has the live details.

use crate::state::AppState;
use actix::Addr;
use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use tether_actors::cluster::{
    Cluster, ClusterNodes, ClusterUnavailable, GetHeld, HeldAgent, ListHeld, NodeInfo, RemoveHeld,
};
use tether_actors::registry::{GetAgent, ListAgents, RemoveAgent};

fn cluster_unavailable(error: ClusterUnavailable) -> HttpResponse {
    HttpResponse::ServiceUnavailable()
        .json(json!({"error": error.0, "error_code": "cluster_unavailable"}))
}

fn mailbox_error(error: actix::MailboxError) -> HttpResponse {
    HttpResponse::ServiceUnavailable().json(json!({
        "error": format!("the server is stopping ({error})"), "error_code": "shutting_down"
    }))
}

fn not_found() -> HttpResponse {
    HttpResponse::NotFound().json(json!({"error": "no agent with this id is registered"}))
}

/// An agent held on another node, as its claim records it.
fn remote(held: HeldAgent) -> Value {
    let metadata = held.parsed_metadata();
    let name = held.name(&metadata);
    json!({
        "agent_id": held.agent_id, "name": name, "session_id": held.session_id,
        "incarnation": held.incarnation,
        "connected_at": held.connected_at,
        "metadata": metadata, "node_id": held.node_id, "member": held.member,
    })
}

/// `GET /cluster/nodes`: the live nodes of the cluster (admin token rules).
pub async fn cluster_nodes(state: web::Data<AppState>) -> HttpResponse {
    let Some(cluster) = &state.cluster else {
        return HttpResponse::NotFound().json(json!({
            "error": "this node is not clustered (cluster.enabled is false)"
        }));
    };
    match cluster.send(ClusterNodes).await {
        Ok(Ok(nodes)) => HttpResponse::Ok().json(json!({ "nodes": nodes })),
        Ok(Err(unavailable)) => cluster_unavailable(unavailable),
        Err(e) => mailbox_error(e),
    }
}

/// The query of `GET /connect`.
#[derive(Debug, Deserialize)]
pub struct ConnectQuery {
    strategy: Option<String>,
}

/// `GET /connect?strategy=least_loaded|round_robin` (no token, like the WebSocket):
/// `{"url"}` of the node a new agent should connect to, never a full or
/// shutting-down one. A single node answers its own URL while it accepts agents.
pub async fn connect(state: web::Data<AppState>, query: web::Query<ConnectQuery>) -> HttpResponse {
    let strategy = query.strategy.as_deref().unwrap_or("least_loaded");
    if !matches!(strategy, "least_loaded" | "round_robin") {
        return HttpResponse::BadRequest().json(json!({
            "error": format!("unknown strategy {strategy:?}: use least_loaded or round_robin"),
            "error_code": "invalid_request",
        }));
    }
    let Some(cluster) = &state.cluster else {
        if !state.accepting.load(Ordering::Acquire) {
            return no_node("this node is shutting down");
        }
        return HttpResponse::Ok().json(json!({"url": state.advertise_url, "strategy": strategy}));
    };
    let nodes = match cluster.send(ClusterNodes).await {
        Ok(Ok(nodes)) => nodes,
        Ok(Err(unavailable)) => return cluster_unavailable(unavailable),
        Err(e) => return mailbox_error(e),
    };
    let open: Vec<&NodeInfo> = nodes.iter().filter(|n| n.accepts_agents()).collect();
    let turn = state.placements.fetch_add(1, Ordering::Relaxed);
    let chosen = match strategy {
        "round_robin" => open.get(turn % open.len().max(1)).copied(),
        _ => {
            // Fewest agents; ties taken in turn, so a burst of new agents spreads.
            let fewest = open.iter().map(|n| n.agents).min();
            let tied: Vec<&NodeInfo> = open
                .iter()
                .copied()
                .filter(|n| Some(n.agents) == fewest)
                .collect();
            tied.get(turn % tied.len().max(1)).copied()
        }
    };
    match chosen {
        Some(node) => HttpResponse::Ok().json(json!({
            "url": node.advertise_url, "node_id": node.node_id, "strategy": strategy,
        })),
        None => no_node("every node of the cluster is full or shutting down"),
    }
}

fn no_node(why: &str) -> HttpResponse {
    HttpResponse::ServiceUnavailable().json(json!({
        "error": format!("no node accepts new agents now ({why}); retry later"),
        "error_code": "server_full",
    }))
}

/// `GET /agents` of a clustered node: every live node's agents, in id order.
pub async fn list_agents(state: &AppState, cluster: &Addr<Cluster>) -> HttpResponse {
    let all = ListHeld {
        after: None,
        limit: usize::MAX,
    };
    let (local, held) = match tokio::try_join!(state.registry.send(ListAgents), cluster.send(all)) {
        Ok((local, Ok((held, _)))) => (local, held),
        Ok((_, Err(unavailable))) => return cluster_unavailable(unavailable),
        Err(e) => return mailbox_error(e),
    };
    let mut agents: Vec<(String, Value)> = local
        .into_iter()
        .map(|info| (info.agent_id.clone(), json!(info)))
        .collect();
    let here: std::collections::HashSet<String> = agents.iter().map(|(id, _)| id.clone()).collect();
    agents.extend(
        held.into_iter()
            .filter(|held| !here.contains(&held.agent_id))
            .map(|held| (held.agent_id.clone(), remote(held))),
    );
    agents.sort_by(|a, b| a.0.cmp(&b.0));
    let agents: Vec<Value> = agents.into_iter().map(|(_, agent)| agent).collect();
    HttpResponse::Ok().json(json!({"count": agents.len(), "agents": agents}))
}

/// `GET /agents/{id}` of a clustered node: in full if held here, else from its claim.
pub async fn get_agent(state: &AppState, cluster: &Addr<Cluster>, id: String) -> HttpResponse {
    match state.registry.send(GetAgent(id.clone())).await {
        Ok(Some(agent)) => return HttpResponse::Ok().json(agent),
        Ok(None) => {}
        Err(e) => return mailbox_error(e),
    }
    match cluster.send(GetHeld(id)).await {
        Ok(Ok(Some(held))) => HttpResponse::Ok().json(remote(held)),
        Ok(Ok(None)) => not_found(),
        Ok(Err(unavailable)) => cluster_unavailable(unavailable),
        Err(e) => mailbox_error(e),
    }
}

/// `DELETE /agents/{id}` of a clustered node: removed here, or by its holder (answered
/// once the holder let it go).
pub async fn remove_agent(state: &AppState, cluster: &Addr<Cluster>, id: String) -> HttpResponse {
    match state.registry.send(RemoveAgent(id.clone())).await {
        Ok(true) => return HttpResponse::NoContent().finish(),
        Ok(false) => {}
        Err(e) => return mailbox_error(e),
    }
    match cluster.send(RemoveHeld(id)).await {
        Ok(Ok(Some(_))) => HttpResponse::NoContent().finish(),
        Ok(Ok(None)) => not_found(),
        Ok(Err(unavailable)) => cluster_unavailable(unavailable),
        Err(e) => mailbox_error(e),
    }
}

/// The cluster's totals for `GET /stats` (`null` when not clustered; an error text
/// when Redis cannot be read).
pub async fn totals(state: &AppState) -> Value {
    let Some(cluster) = &state.cluster else {
        return Value::Null;
    };
    match cluster.send(ClusterNodes).await {
        Ok(Ok(nodes)) => json!({
            "nodes": nodes.len(),
            "agents": nodes.iter().map(|n| n.agents).sum::<usize>(),
            "max_connections": nodes.iter().map(|n| n.max_connections).sum::<usize>(),
            "nodes_shutting_down": nodes.iter().filter(|n| n.shutting_down).count(),
        }),
        Ok(Err(unavailable)) => {
            json!({"error": unavailable.0, "error_code": "cluster_unavailable"})
        }
        Err(_) => Value::Null,
    }
}

/// The URL agents of a node shutting down are sent to: the live node, other than
/// this one, with the fewest agents (none when there is no other).
pub async fn reconnect_url(cluster: &Addr<Cluster>, own_node_id: &str) -> Option<String> {
    let nodes = cluster.send(ClusterNodes).await.ok()?.ok()?;
    nodes
        .into_iter()
        .filter(|n| n.node_id != own_node_id && n.accepts_agents())
        .min_by_key(|n| n.agents)
        .map(|n| n.advertise_url)
}
