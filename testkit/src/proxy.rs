//! A TCP proxy a test or a benchmark owns, to make a broker unreachable without
//! touching the broker: [`Proxy::cut`] drops every connection through it and refuses
//! new ones (they are accepted and closed at once), [`Proxy::restore`] lets traffic
//! through again, and [`Proxy::freeze`] makes every connection open at that moment
//! half-open: nothing more is forwarded on it, both sides stay open, while new
//! connections are forwarded as usual. It runs on a thread and runtime of its own, so a caller that
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
    /// How many times [`Proxy::freeze`] was called.
    freezes: Arc<watch::Sender<u64>>,
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
        let (freezes, _) = watch::channel(0);
        let freezes = Arc::new(freezes);
        let target = target.to_owned();
        let control = state.clone();
        let frozen = freezes.clone();
        std::thread::Builder::new()
            .name(format!("proxy-{port}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("cannot start the proxy's runtime");
                runtime.block_on(serve(listener, target, control, frozen));
            })
            .expect("cannot start the proxy's thread");
        Self {
            port,
            state,
            freezes,
        }
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Drops every connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.state.send_replace(State::Cut);
    }

    /// Stops forwarding on every connection open now, keeping both its sides open
    /// (a half-open connection, as a dead NAT or a pulled cable leaves one); later
    /// connections are forwarded.
    pub fn freeze(&self) {
        self.freezes.send_modify(|freezes| *freezes += 1);
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

async fn serve(
    listener: StdListener,
    target: String,
    state: Arc<watch::Sender<State>>,
    freezes: Arc<watch::Sender<u64>>,
) {
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
        let mut freeze = freezes.subscribe();
        let generation = *freeze.borrow_and_update();
        let target = target.clone();
        tokio::spawn(async move {
            let Ok(upstream) = TcpStream::connect(&target).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            pipe(client, upstream, &mut watcher, &mut freeze, generation).await;
        });
    }
}

/// Copies both ways until either side closes or the proxy is cut; once frozen, holds
/// both sides open, forwarding nothing, until the proxy is cut or dropped.
async fn pipe(
    mut client: TcpStream,
    mut upstream: TcpStream,
    state: &mut watch::Receiver<State>,
    freeze: &mut watch::Receiver<u64>,
    generation: u64,
) {
    let check = freeze.clone();
    let frozen = {
        let (client_read, client_write) = client.split();
        let (upstream_read, upstream_write) = upstream.split();
        let copy = async {
            tokio::try_join!(
                forward(client_read, upstream_write, &check, generation),
                forward(upstream_read, client_write, &check, generation),
            )
        };
        tokio::select! {
            copied = copy => copied.is_err(),
            _ = state.wait_for(|s| *s != State::Open) => false,
            _ = freeze.wait_for(|g| *g != generation) => true,
        }
    };
    if frozen {
        let _ = state.wait_for(|s| *s != State::Open).await;
    }
}

/// The connection was frozen.
struct Frozen;

/// Copies one direction until its end (passed on as a half-close). Bytes read after a
/// freeze are dropped: the freeze is checked before every write, so nothing sent after
/// [`Proxy::freeze`] returned gets through.
async fn forward(
    mut from: tokio::net::tcp::ReadHalf<'_>,
    mut to: tokio::net::tcp::WriteHalf<'_>,
    freeze: &watch::Receiver<u64>,
    generation: u64,
) -> Result<(), Frozen> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return Ok(());
            }
            Ok(read) => read,
        };
        if *freeze.borrow() != generation {
            return Err(Frozen);
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return Ok(());
        }
    }
}
