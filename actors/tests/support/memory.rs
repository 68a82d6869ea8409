//! An in-memory [`Broker`] whose faults a test scripts, so the supervision logic of
//! [`BrokerPublisher`](tether_actors::publisher::supervisor::BrokerPublisher) is tested
//! in process, without a real broker.
//!
//! [`MemoryBroker::new`] returns the broker (handed to the publisher) and a [`Fake`]
//! (kept by the test) that share one state. Through the `Fake` a test scripts the next
//! operations — each scripted step is used by one operation, in order; an operation
//! with no step left succeeds — and observes what the broker saw: every batch it
//! accepted, in order, and how many connections, sends and checks were attempted.
//!
//! Faults the publisher must survive: a connection attempt fails, hangs or panics; a
//! send acknowledges only the first `k` events and errors, hangs (nothing written, or
//! everything written but never acknowledged), or panics; a health check fails; the
//! connection reports its own loss through its [`LossReporter`]. A [`Gate`] holds a
//! connect or a send until the test opens it.

use futures_util::future::{pending, LocalBoxFuture};
use futures_util::FutureExt;
use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tether_actors::event::SharedEvent;
use tether_actors::publisher::broker::{Broker, BrokerError, LossReporter, SendError, Timeouts};
use tokio::sync::oneshot;

/// Holds a scripted operation until opened (or dropped).
pub struct Gate(oneshot::Sender<()>);

impl Gate {
    /// Lets the held operation go on.
    pub fn open(self) {
        let _ = self.0.send(());
    }
}

fn gate() -> (Gate, oneshot::Receiver<()>) {
    let (tx, rx) = oneshot::channel();
    (Gate(tx), rx)
}

enum ConnectStep {
    Fail,
    Hang,
    Panic,
    Hold(oneshot::Receiver<()>),
}

enum SendStep {
    /// Writes and acknowledges the first `acked` events, then errors.
    Fail {
        acked: usize,
    },
    /// Writes nothing and never answers.
    Hang,
    /// Writes the whole batch but never acknowledges it.
    WriteThenHang,
    Panic,
    /// Waits for the gate, then writes and acknowledges the batch.
    Hold(oneshot::Receiver<()>),
}

#[derive(Default)]
struct State {
    connect_script: VecDeque<ConnectStep>,
    send_script: VecDeque<SendStep>,
    check_failures: usize,
    /// Connections are refused (after the script) until this is cleared.
    down: bool,
    connect_attempts: usize,
    send_attempts: usize,
    checks: usize,
    /// The loss reporter of each connection made, in order.
    reporters: Vec<LossReporter>,
    open: HashSet<u64>,
    accepted: Vec<Vec<SharedEvent>>,
}

type Shared = Arc<Mutex<State>>;

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    shared.lock().expect("the fake broker's state is poisoned")
}

/// A connection to the in-memory broker.
#[derive(Debug, Clone)]
pub struct MemoryClient {
    id: u64,
}

/// The in-memory broker, named `memory`.
pub struct MemoryBroker {
    shared: Shared,
    timeouts: Timeouts,
    health_check_interval: Duration,
}

/// The test's side of a [`MemoryBroker`]: scripts faults, observes deliveries.
#[derive(Clone)]
pub struct Fake {
    shared: Shared,
}

impl MemoryBroker {
    /// A broker that accepts everything until scripted otherwise, with operation
    /// timeouts of 1 s and no health check within a test's lifetime.
    pub fn new() -> (Self, Fake) {
        let shared = Shared::default();
        let broker = Self {
            shared: shared.clone(),
            timeouts: Timeouts {
                connect: Duration::from_secs(1),
                send: Duration::from_secs(1),
                check: Duration::from_secs(1),
            },
            health_check_interval: Duration::from_secs(3600),
        };
        (broker, Fake { shared })
    }

    /// Sends not acknowledged within `timeout` count as failed.
    pub fn send_timeout(mut self, timeout: Duration) -> Self {
        self.timeouts.send = timeout;
        self
    }

    /// Connection attempts not done within `timeout` count as failed.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.timeouts.connect = timeout;
        self
    }

    /// An idle connection is checked every `interval`.
    pub fn health_checks_every(mut self, interval: Duration) -> Self {
        self.health_check_interval = interval;
        self
    }
}

impl Fake {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.shared)
    }

    /// The next `n` connection attempts are refused.
    pub fn fail_connects(&self, n: usize) {
        let mut state = self.state();
        state
            .connect_script
            .extend(std::iter::repeat_with(|| ConnectStep::Fail).take(n));
    }

    /// The next connection attempt never completes.
    pub fn hang_next_connect(&self) {
        self.state().connect_script.push_back(ConnectStep::Hang);
    }

    /// The next connection attempt panics.
    pub fn panic_next_connect(&self) {
        self.state().connect_script.push_back(ConnectStep::Panic);
    }

    /// The next connection attempt waits for the returned gate, then succeeds.
    pub fn hold_next_connect(&self) -> Gate {
        let (gate, rx) = gate();
        self.state().connect_script.push_back(ConnectStep::Hold(rx));
        gate
    }

    /// While `down`, connection attempts with no scripted step are refused.
    pub fn set_down(&self, down: bool) {
        self.state().down = down;
    }

    /// The next send writes and acknowledges only the first `acked` events of its
    /// batch, then errors.
    pub fn fail_next_send(&self, acked: usize) {
        self.state().send_script.push_back(SendStep::Fail { acked });
    }

    /// The next send writes nothing and never answers.
    pub fn hang_next_send(&self) {
        self.state().send_script.push_back(SendStep::Hang);
    }

    /// The next send writes its whole batch but the acknowledgement never comes.
    pub fn write_next_send_then_hang(&self) {
        self.state().send_script.push_back(SendStep::WriteThenHang);
    }

    /// The next `n` sends panic.
    pub fn panic_sends(&self, n: usize) {
        let mut state = self.state();
        state
            .send_script
            .extend(std::iter::repeat_with(|| SendStep::Panic).take(n));
    }

    /// The next send waits for the returned gate, then succeeds.
    pub fn hold_next_send(&self) -> Gate {
        let (gate, rx) = gate();
        self.state().send_script.push_back(SendStep::Hold(rx));
        gate
    }

    /// The next `n` health checks fail.
    pub fn fail_checks(&self, n: usize) {
        self.state().check_failures += n;
    }

    /// The latest connection reports that it was lost.
    pub fn report_loss(&self, reason: &str) {
        let reporter = self.state().reporters.last().cloned();
        reporter.expect("no connection was made yet").report(reason);
    }

    /// Connection number `index` (0 is the first made) reports that it was lost.
    pub fn report_loss_on(&self, index: usize, reason: &str) {
        let reporter = self.state().reporters.get(index).cloned();
        reporter.expect("no such connection").report(reason);
    }

    /// Every batch accepted (written), in order, as sequence numbers. A batch
    /// acknowledged in part appears as the part written.
    pub fn batches(&self) -> Vec<Vec<u64>> {
        self.state().accepted.iter().map(super::seqs).collect()
    }

    /// Every event accepted, in order.
    pub fn accepted(&self) -> Vec<SharedEvent> {
        self.state().accepted.concat()
    }

    /// The sequence numbers of every event accepted, in order.
    pub fn accepted_seqs(&self) -> Vec<u64> {
        super::seqs(&self.accepted())
    }

    /// Connection attempts so far.
    pub fn connect_attempts(&self) -> usize {
        self.state().connect_attempts
    }

    /// Connections made so far.
    pub fn connections(&self) -> usize {
        self.state().reporters.len()
    }

    /// Connections made and not closed.
    pub fn open_connections(&self) -> usize {
        self.state().open.len()
    }

    /// Sends attempted so far.
    pub fn send_attempts(&self) -> usize {
        self.state().send_attempts
    }

    /// Health checks so far.
    pub fn checks(&self) -> usize {
        self.state().checks
    }
}

/// Records a new open connection, whose losses `lost` reports.
fn connected(shared: &Shared, lost: LossReporter) -> MemoryClient {
    let mut state = lock(shared);
    let id = state.reporters.len() as u64;
    state.reporters.push(lost);
    state.open.insert(id);
    MemoryClient { id }
}

fn refused() -> BrokerError {
    BrokerError::new(
        "connecting to memory://test",
        "connection refused (scripted)",
    )
}

impl Broker for MemoryBroker {
    type Client = MemoryClient;

    fn name(&self) -> &'static str {
        "memory"
    }

    fn describe(&self) -> String {
        "memory://test".into()
    }

    fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    fn health_check_interval(&self) -> Duration {
        self.health_check_interval
    }

    fn connect(
        &self,
        lost: LossReporter,
    ) -> LocalBoxFuture<'static, Result<MemoryClient, BrokerError>> {
        let shared = self.shared.clone();
        let mut state = lock(&shared);
        state.connect_attempts += 1;
        let step = state.connect_script.pop_front();
        let down = state.down;
        drop(state);
        match step {
            None if down => async { Err(refused()) }.boxed_local(),
            None => async move { Ok(connected(&shared, lost)) }.boxed_local(),
            Some(ConnectStep::Fail) => async { Err(refused()) }.boxed_local(),
            Some(ConnectStep::Hang) => pending().boxed_local(),
            Some(ConnectStep::Panic) => {
                async { panic!("injected fault: the client panicked while connecting") }
                    .boxed_local()
            }
            Some(ConnectStep::Hold(gate)) => async move {
                let _ = gate.await;
                Ok(connected(&shared, lost))
            }
            .boxed_local(),
        }
    }

    fn send(
        &self,
        client: &MemoryClient,
        batch: Vec<SharedEvent>,
    ) -> LocalBoxFuture<'static, Result<(), SendError>> {
        let shared = self.shared.clone();
        let mut state = lock(&shared);
        state.send_attempts += 1;
        if !state.open.contains(&client.id) {
            return async {
                Err(SendError {
                    acked: 0,
                    error: BrokerError("send on a closed connection".into()),
                })
            }
            .boxed_local();
        }
        let step = state.send_script.pop_front();
        drop(state);
        let write = move |events: Vec<SharedEvent>| {
            if !events.is_empty() {
                lock(&shared).accepted.push(events);
            }
        };
        match step {
            None => async move {
                write(batch);
                Ok(())
            }
            .boxed_local(),
            Some(SendStep::Fail { acked }) => async move {
                let acked = acked.min(batch.len());
                write(batch[..acked].to_vec());
                Err(SendError {
                    acked,
                    error: BrokerError("injected fault: the broker refused the rest".into()),
                })
            }
            .boxed_local(),
            Some(SendStep::Hang) => pending().boxed_local(),
            Some(SendStep::WriteThenHang) => async move {
                write(batch);
                pending::<Result<(), SendError>>().await
            }
            .boxed_local(),
            Some(SendStep::Panic) => {
                async { panic!("injected fault: the client panicked while sending") }.boxed_local()
            }
            Some(SendStep::Hold(gate)) => async move {
                let _ = gate.await;
                write(batch);
                Ok(())
            }
            .boxed_local(),
        }
    }

    fn check(&self, client: &MemoryClient) -> LocalBoxFuture<'static, Result<(), BrokerError>> {
        let mut state = lock(&self.shared);
        state.checks += 1;
        let result = if state.check_failures > 0 {
            state.check_failures -= 1;
            Err(BrokerError(
                "injected fault: the health check failed".into(),
            ))
        } else if !state.open.contains(&client.id) {
            Err(BrokerError("the connection is closed".into()))
        } else {
            Ok(())
        };
        async move { result }.boxed_local()
    }

    fn close(&self, client: MemoryClient) -> LocalBoxFuture<'static, ()> {
        lock(&self.shared).open.remove(&client.id);
        async {}.boxed_local()
    }
}
