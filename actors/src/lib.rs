//! Tether's supervision core: the actors that keep agents connected and accounted for.
//!
//! - [`connection`]: one actor per agent WebSocket.
//! - [`registry`]: the table of agents, lifecycle owner and message router.
//! - [`heartbeat`]: pings, stale detection and inactivity, on a timer wheel.
//! - [`cluster`]: membership of a network of several nodes, through Redis.
//! - [`bus`] and [`publisher`]: lifecycle events fanned out to publishers.
//! - [`protocol`], [`event`] and [`disconnect`]: the wire types, error and close codes.
//! - [`liveness`] and [`clock`]: what alive, stale and inactive mean; time sources.
//!
//! Events flow one way: connection → registry → bus → publishers; the heartbeat sends
//! its verdicts to the registry. Actors talk only through the typed messages defined
//! beside each actor and know each other only as [`actix::Recipient`]s of those
//! messages, so no module names an actor that names it back. There is no HTTP here:
//! the `tether` binary upgrades sockets and serves the admin API.

#![warn(missing_docs)]
#![warn(clippy::all)]
#![forbid(unsafe_code)]

pub mod bus;
pub mod clock;
pub mod cluster;
pub mod connection;
pub mod disconnect;
pub mod event;
pub mod heartbeat;
pub mod identity;
pub mod instructions;
pub mod liveness;
pub mod metrics;
pub mod outbound;
pub mod protocol;
pub mod publisher;
pub mod registry;
pub mod routes;
pub mod settings;
pub mod stats;
#[cfg(test)]
mod testing;
