//! Start-up and graceful shutdown: the actors on their own arbiters, the actix-web
//! listener, and the shutdown sequence run on SIGINT or SIGTERM.

use crate::state::AppState;
use crate::{admin, cluster_api, dashboard, instructions_api, listener, metrics, publishers, sse};
use actix::prelude::*;
use actix_web::middleware::from_fn;
use actix_web::{web, App};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_actors::bus::{CloseSubscribers, EventBus, FlushAll, GetBusStatus, Publish};
use tether_actors::cluster::{Cluster, Leaving, TellRegistry};
use tether_actors::connection::{ConnectionContext, ConnectionSettings};
use tether_actors::event::{EventSource, LifecycleEvent, NetworkEvent};
use tether_actors::heartbeat::Heartbeat;
use tether_actors::instructions::{Dispatcher, Notices, Store};
use tether_actors::liveness::Liveness;
use tether_actors::registry::{BeginShutdown, CloseAll, Drained, Registry, WaitFor};
use tether_actors::routes::Routes;
use tether_actors::settings::{secs, Settings};

/// What the shutdown did, logged at exit.
#[derive(Debug)]
pub struct ShutdownSummary {
    /// Agents registered when shutdown began.
    pub agents_at_start: usize,
    /// Agents that left on their own before the timeout.
    pub left_gracefully: usize,
    /// Agents closed with 1001 at the timeout.
    pub forced: usize,
    /// Events published since start.
    pub events_published: u64,
    /// Events publishers could not deliver.
    pub events_dropped: u64,
    /// How long shutdown took.
    pub duration: Duration,
}

fn network_event(source: &EventSource, payload: NetworkEvent<'_>) -> Publish {
    Publish(Arc::new(LifecycleEvent::network(source, &payload)))
}

/// Runs the server until it is told to stop; returns what the shutdown did.
pub async fn run(settings: Settings, secret: Vec<u8>) -> std::io::Result<ShutdownSummary> {
    let settings = Arc::new(settings);
    // Before any actor starts: what is recorded before the recorder exists is lost.
    metrics::install();
    let node_id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let source = EventSource::new(&settings.network.id, &node_id);

    // Bound first: a cluster node advertises the port it listens on.
    let tcp = std::net::TcpListener::bind((settings.network.host.as_str(), settings.network.port))?;
    tcp.set_nonblocking(true)?;
    let local = tcp.local_addr()?;

    // Before any actor starts: a storage that cannot be opened stops the start-up.
    let store = Store::open(&settings.storage.url, settings.storage.max_connections)
        .await
        .map_err(|e| std::io::Error::other(format!("storage.url: {e}")))?;

    let bus_arbiter = Arbiter::new();
    let registry_arbiter = Arbiter::new();
    let heartbeat_arbiter = Arbiter::new();
    let buffer = settings.events.sse_buffer;
    let bus = EventBus::start_in_arbiter(&bus_arbiter.handle(), move |_| EventBus::new(buffer));
    let _publisher_arbiters = publishers::start(&settings, &bus).map_err(std::io::Error::other)?;
    // The heartbeat is started from the registry's constructor, so each is built with
    // the recipient of what it sends the other: no second wiring step.
    let rules = Liveness::new(&settings.heartbeat);
    let (heartbeat_tx, heartbeat_rx) = tokio::sync::oneshot::channel();
    let routes = Routes::new();
    let cluster_arbiter = Arbiter::new();
    let advertise_url = match settings.cluster.advertise_url.as_str() {
        "" => format!("ws://{local}/ws"),
        url => url.to_owned(),
    };
    let mut direct = None;
    let cluster = if settings.cluster.enabled {
        let mut cluster_settings = settings.cluster.clone();
        cluster_settings.advertise_url = advertise_url.clone();
        let node = Cluster::new(
            cluster_settings,
            &node_id,
            settings.network.max_connections,
            routes.clone(),
            bus.clone().recipient(),
            bus.clone().recipient(),
            source.clone(),
        )
        .map_err(|e| std::io::Error::other(e.0))?;
        direct = Some(node.direct_line());
        Some(Cluster::start_in_arbiter(
            &cluster_arbiter.handle(),
            move |_| node,
        ))
    } else {
        None
    };
    let dispatcher_arbiter = Arbiter::new();
    let instructions = {
        let (store, routes, events) = (store.clone(), routes.clone(), bus.clone());
        let (source, settings) = (source.clone(), settings.clone());
        let notices = match settings.cluster.enabled {
            true => Some(
                Notices::new(&settings.cluster.redis_url, &settings.cluster.prefix)
                    .map_err(std::io::Error::other)?,
            ),
            false => None,
        };
        Dispatcher::start_in_arbiter(&dispatcher_arbiter.handle(), move |_| {
            let dispatcher = Dispatcher::new(
                store,
                routes,
                events.recipient(),
                source,
                settings.instructions.clone(),
                settings.sessions.clone(),
            );
            match notices {
                Some(notices) => dispatcher.with_notices(notices),
                None => dispatcher,
            }
        })
    };
    let registry = {
        let (settings, source, events) = (settings.clone(), source.clone(), bus.clone());
        let presence = instructions.clone().recipient();
        let routes = routes.clone();
        let cluster = cluster.clone();
        let heartbeat_arbiter = heartbeat_arbiter.handle();
        Registry::start_in_arbiter(&registry_arbiter.handle(), move |ctx| {
            let verdicts = ctx.address().recipient();
            let heartbeat = Heartbeat::start_in_arbiter(&heartbeat_arbiter, move |_| {
                Heartbeat::new(rules, verdicts)
            });
            let _ = heartbeat_tx.send(heartbeat.clone());
            let watch = heartbeat.recipient();
            let registry =
                Registry::new(settings, source, events.recipient(), watch, secret, routes)
                    .with_instructions(presence);
            match cluster {
                Some(cluster) => {
                    cluster.do_send(TellRegistry {
                        lease_lost: ctx.address().recipient(),
                        hand_over: ctx.address().recipient(),
                        remove: ctx.address().recipient(),
                        held_claims: ctx.address().recipient(),
                        reasserted: ctx.address().recipient(),
                    });
                    registry.with_cluster(cluster)
                }
                None => registry,
            }
        })
    };
    let heartbeat = heartbeat_rx
        .await
        .map_err(|_| std::io::Error::other("the registry's arbiter stopped at start-up"))?;

    let state = AppState {
        connections: ConnectionContext {
            registry: registry.clone(),
            routes,
            settings: Arc::new(ConnectionSettings {
                limits: settings.limits.clone(),
                registration_timeout: settings.network.registration_timeout,
                liveness: rules,
                cluster: cluster.clone(),
                direct,
                instructions: Some(instructions.clone().recipient()),
            }),
            open_sockets: Arc::new(AtomicUsize::new(0)),
        },
        settings: settings.clone(),
        registry: registry.clone(),
        heartbeat,
        bus: bus.clone(),
        instructions,
        store,
        source: source.clone(),
        next_session: Arc::new(AtomicU64::new(1)),
        accepting: Arc::new(AtomicBool::new(true)),
        cluster,
        advertise_url,
        placements: Arc::new(AtomicUsize::new(0)),
    };
    let app_state = web::Data::new(state.clone());
    let app = move || {
        App::new()
            .app_data(app_state.clone())
            .route("/", web::get().to(listener::not_an_upgrade))
            .route("/ws", web::get().to(listener::not_an_upgrade))
            .route("/health", web::get().to(admin::health))
            .route("/livez", web::get().to(admin::livez))
            .route("/readyz", web::get().to(admin::readyz))
            .route("/connect", web::get().to(cluster_api::connect))
            .route("/metrics", web::get().to(metrics::metrics))
            .route("/dashboard", web::get().to(dashboard::page))
            .route("/dashboard/app.js", web::get().to(dashboard::script))
            .route("/dashboard/app.css", web::get().to(dashboard::style))
            .service(
                web::scope("")
                    .wrap(from_fn(admin::require_token))
                    .route("/stats", web::get().to(admin::stats))
                    .route("/agents", web::get().to(admin::list_agents))
                    .route("/agents/{id}", web::get().to(admin::get_agent))
                    .route("/agents/{id}", web::delete().to(admin::remove_agent))
                    .route("/events", web::get().to(sse::events))
                    .route("/cluster/nodes", web::get().to(cluster_api::cluster_nodes))
                    .app_data(instructions_api::query_config())
                    .route(
                        "/agents/{id}/instructions",
                        web::post().to(instructions_api::create_for_agent),
                    )
                    .route(
                        "/agents/{id}/instructions",
                        web::get().to(instructions_api::agent_instructions),
                    )
                    .route(
                        "/instructions",
                        web::post().to(instructions_api::create_instruction),
                    )
                    .route(
                        "/instructions/{id}",
                        web::get().to(instructions_api::get_instruction),
                    )
                    .route(
                        "/instructions/{id}",
                        web::delete().to(instructions_api::cancel_instruction),
                    )
                    .route("/sessions", web::post().to(instructions_api::open_session))
                    .route("/sessions", web::get().to(instructions_api::list_sessions))
                    .route(
                        "/sessions/{id}",
                        web::get().to(instructions_api::get_session),
                    )
                    .route(
                        "/sessions/{id}/close",
                        web::post().to(instructions_api::close_session),
                    ),
            )
    };
    // Tests and scripts read this line to learn the port (network.port may be 0).
    println!("tether listening on http://{local}");
    let server = listener::serve(state.clone(), tcp, settings.network.workers, app)?;
    log::info!(
        "network {} ({}) node {node_id}: heartbeat every {} s, ping timeout {} s, publishers {:?}",
        settings.network.name,
        settings.network.id,
        settings.heartbeat.interval,
        settings.heartbeat.ping_timeout,
        settings.events.publishers
    );
    let handle = server.handle();
    let server_task = actix_web::rt::spawn(server);
    bus.do_send(network_event(
        &source,
        NetworkEvent::Started {
            name: &settings.network.name,
            max_connections: settings.network.max_connections,
        },
    ));

    let mut signals = ShutdownSignals::listen();
    signals.next().await;
    log::info!("shutdown signal received: stopping gracefully (a second signal forces exit)");
    // The same listeners wait for the second signal: one sent while the graceful
    // shutdown starts, before this task first runs, is still seen.
    actix_web::rt::spawn(async move {
        signals.next().await;
        log::warn!("second shutdown signal: exiting now");
        std::process::exit(130);
    });

    let summary = shutdown(&state, &settings).await;
    handle.stop(true).await;
    let _ = server_task.await;
    Ok(summary)
}

/// The shutdown sequence of issue #2: stop accepting, notify, wait, force, publish
/// `network.stopped`, flush publishers.
async fn shutdown(state: &AppState, settings: &Settings) -> ShutdownSummary {
    let started = Instant::now();
    let timeout = settings.shutdown.timeout;
    state.accepting.store(false, Ordering::Release);
    // Clustered: the lease says at once that no new agents should come here, and the
    // agents are pointed at another live node.
    let reconnect_url = match &state.cluster {
        Some(cluster) => {
            cluster.do_send(Leaving);
            cluster_api::reconnect_url(cluster, &state.source.node_id).await
        }
        None => None,
    };
    let agents_at_start = state
        .registry
        .send(BeginShutdown {
            timeout_secs: timeout,
            reconnect_url,
        })
        .await
        .unwrap_or(0);
    let _ = tokio::time::timeout(secs(timeout), wait_for(state, Drained::NoAgents)).await;
    let forced = state.registry.send(CloseAll).await.unwrap_or(0);
    let _ = tokio::time::timeout(Duration::from_secs(3), wait_for(state, Drained::NoSockets)).await;
    let left_gracefully = agents_at_start.saturating_sub(forced);
    let duration = started.elapsed();
    state.bus.do_send(network_event(
        &state.source,
        NetworkEvent::Stopped {
            agents_at_start,
            left_gracefully,
            forced,
            duration_secs: duration.as_secs_f64(),
        },
    ));
    let flush_time = secs(timeout)
        .saturating_sub(started.elapsed())
        .max(Duration::from_secs(2));
    let reports = state
        .bus
        .send(FlushAll {
            timeout: flush_time,
        })
        .await
        .unwrap_or_default();
    for report in &reports {
        log::info!(
            "publisher {}: {} events delivered, {} undelivered",
            report.name,
            report.delivered,
            report.undelivered
        );
    }
    state.bus.do_send(CloseSubscribers);
    let events_published = match state.bus.send(GetBusStatus).await {
        Ok(status) => status.published,
        Err(_) => 0,
    };
    ShutdownSummary {
        agents_at_start,
        left_gracefully,
        forced,
        events_published,
        events_dropped: reports.iter().map(|r| r.undelivered).sum(),
        duration: started.elapsed(),
    }
}

async fn wait_for(state: &AppState, condition: Drained) {
    let (reply, done) = tokio::sync::oneshot::channel();
    state.registry.do_send(WaitFor { condition, reply });
    let _ = done.await;
}

/// SIGTERM and SIGINT, listened for from creation on: a signal that arrives between
/// two waits is not lost.
struct ShutdownSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn listen() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        Self {
            terminate: signal(SignalKind::terminate()).expect("cannot listen for SIGTERM"),
            interrupt: signal(SignalKind::interrupt()).expect("cannot listen for SIGINT"),
        }
    }

    /// The next SIGTERM or SIGINT received since the last one returned.
    async fn next(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}
