//! The harness side of the client workers: spawns `tether-bench client-worker`
//! processes, sends them commands and collects their replies.

use crate::wire::{Cmd, Reply, Request, Response};
use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>>;

struct Handle {
    child: Child,
    tx: mpsc::UnboundedSender<String>,
    pending: Pending,
}

/// A set of client-worker processes.
pub struct Pool {
    workers: Vec<Handle>,
    next_id: AtomicU64,
}

impl Pool {
    /// Spawns `count` workers (indices `first_index..`), which decide their loopback
    /// source addresses from their index.
    pub async fn spawn(count: usize, first_index: u32) -> Result<Pool, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let mut workers = Vec::new();
        for i in 0..count {
            let index = first_index + i as u32;
            let mut child = Command::new(&exe)
                .arg("client-worker")
                .arg("--index")
                .arg(index.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("cannot spawn a client worker: {e}"))?;
            let mut stdin = child.stdin.take().expect("piped stdin");
            let stdout = child.stdout.take().expect("piped stdout");
            let (tx, mut rx) = mpsc::unbounded_channel::<String>();
            tokio::spawn(async move {
                while let Some(line) = rx.recv().await {
                    if stdin.write_all(line.as_bytes()).await.is_err() {
                        break;
                    }
                    let _ = stdin.flush().await;
                }
            });
            let pending: Pending = Arc::default();
            let reader_pending = pending.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    match serde_json::from_str::<Response>(&line) {
                        Ok(response) => {
                            let waiter = reader_pending.lock().unwrap().remove(&response.id);
                            if let Some(waiter) = waiter {
                                let _ = waiter.send(response.reply);
                            }
                        }
                        Err(e) => eprintln!("tether-bench: bad worker reply {line:?}: {e}"),
                    }
                }
                // The worker is gone: fail whatever still waits.
                reader_pending.lock().unwrap().clear();
            });
            workers.push(Handle { child, tx, pending });
        }
        Ok(Pool {
            workers,
            next_id: AtomicU64::new(1),
        })
    }

    /// Number of workers.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Sends `cmd` to worker `index` and waits for its reply.
    pub async fn request(&self, index: usize, cmd: Cmd) -> Result<Reply, String> {
        let worker = self
            .workers
            .get(index)
            .ok_or_else(|| format!("no worker {index}"))?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        worker.pending.lock().unwrap().insert(id, tx);
        let mut line = serde_json::to_string(&Request { id, cmd }).map_err(|e| e.to_string())?;
        line.push('\n');
        worker
            .tx
            .send(line)
            .map_err(|_| format!("worker {index} is gone"))?;
        match rx.await {
            Ok(Reply::Error { message }) => Err(format!("worker {index}: {message}")),
            Ok(reply) => Ok(reply),
            Err(_) => Err(format!("worker {index} died before answering")),
        }
    }

    /// Sends `make(i)` to every worker at once and returns the replies in order.
    pub async fn all(&self, make: impl Fn(usize) -> Cmd) -> Result<Vec<Reply>, String> {
        let futures: Vec<_> = (0..self.workers.len())
            .map(|i| self.request(i, make(i)))
            .collect();
        futures_util::future::join_all(futures)
            .await
            .into_iter()
            .collect()
    }

    /// Tells every worker to exit and waits for them.
    pub async fn shutdown(mut self) {
        let _ = self.all(|_| Cmd::Exit).await;
        for worker in &mut self.workers {
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(5), worker.child.wait()).await;
            let _ = worker.child.start_kill();
        }
    }
}
