//! `tether-testkit`: the helpers Tether's tests (`tests/`) and its benchmark harness
//! (`bench/`) share, one copy each, so the two talk to brokers and to the server the
//! same way. Dev-only: the shipped `tether` binary does not depend on it.
//!
//! - [`Proxy`]: a TCP proxy that can cut a broker off and let it back;
//! - [`Tansu`]: a Kafka-compatible broker (tansu) the caller owns, in memory;
//! - [`sse`]: decoding the server's `GET /events` stream into blocks;
//! - [`rabbitmq`]: a queue bound to the exchange Tether publishes to;
//! - [`redis_stream`]: reading a Redis stream with `XREAD BLOCK`.

#![warn(missing_docs)]

pub mod proxy;
pub mod rabbitmq;
pub mod redis_stream;
pub mod sse;
pub mod tansu;
pub mod ws;

pub use proxy::Proxy;
pub use tansu::Tansu;

use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `count` distinct loopback ports nothing listens on right now (all bound at once,
/// so none is handed out twice).
pub fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..count)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .expect("cannot bind a loopback port: is the loopback interface up?")
        })
        .collect();
    listeners
        .iter()
        .map(|listener| listener.local_addr().expect("a bound port").port())
        .collect()
}

/// Waits until something accepts connections on `127.0.0.1:<port>`; `Err` saying
/// so after `within`. `what` names the process, for the message.
pub fn wait_listening(port: u16, what: &str, within: Duration) -> Result<(), String> {
    let end = Instant::now() + within;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > end {
            return Err(format!(
                "{what} did not listen on port {port} within {} s",
                within.as_secs_f64()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
