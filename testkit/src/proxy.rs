//! A TCP proxy a test or a benchmark owns, to make a broker unreachable without
//! touching the broker: [`Proxy::cut`] drops every connection through it and refuses
//! new ones (they are accepted and closed at once), [`Proxy::restore`] lets traffic
//! through again. It runs on a thread and runtime of its own, so a caller that
//! blocks does not stall it, and stops when dropped.

use std::net::TcpListener as StdListener;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    Cut,
    Shutdown,
}

/// A proxy from `127.0.0.1:<port>` to a target address.
pub struct Proxy {
    /// The port the proxy listens on.
    pub port: u16,
    state: Arc<watch::Sender<State>>,
}

impl Proxy {
    /// Starts a proxy on a free port forwarding to `target` (`host:port`).
    pub fn start(target: &str) -> Self {
        let listener = StdListener::bind("127.0.0.1:0")
            .expect("cannot bind a loopback port for the proxy: is the loopback interface up?");
        listener
            .set_nonblocking(true)
            .expect("cannot make the proxy's listener non-blocking");
        let port = listener.local_addr().expect("the proxy's port").port();
        let (state, _) = watch::channel(State::Open);
        let state = Arc::new(state);
        let target = target.to_owned();
        let control = state.clone();
        std::thread::Builder::new()
            .name(format!("proxy-{port}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("cannot start the proxy's runtime");
                runtime.block_on(serve(listener, target, control));
            })
            .expect("cannot start the proxy's thread");
        Self { port, state }
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Drops every connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.state.send_replace(State::Cut);
    }

    /// Lets traffic through again.
    pub fn restore(&self) {
        self.state.send_replace(State::Open);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.send_replace(State::Shutdown);
    }
}

async fn serve(listener: StdListener, target: String, state: Arc<watch::Sender<State>>) {
    let listener = TcpListener::from_std(listener).expect("the proxy's listener");
    let mut changes = state.subscribe();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = changes.wait_for(|s| *s == State::Shutdown) => return,
        };
        let Ok((client, _)) = accepted else { continue };
        if *state.borrow() != State::Open {
            drop(client);
            continue;
        }
        let mut watcher = state.subscribe();
        let target = target.clone();
        tokio::spawn(async move {
            let Ok(upstream) = TcpStream::connect(&target).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            pipe(client, upstream, &mut watcher).await;
        });
    }
}

/// Copies both ways until either side closes or the proxy is cut.
async fn pipe(mut client: TcpStream, mut upstream: TcpStream, state: &mut watch::Receiver<State>) {
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
        _ = state.wait_for(|s| *s != State::Open) => {}
    }
}
