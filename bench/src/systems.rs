//! The systems measured side by side, and how the harness starts, watches and stops
//! each one: Tether from its release binary, the OpenAgents 0.5.1 network server from
//! a virtualenv the harness creates, and the floor server from this binary.

use crate::procfs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum System {
    /// Tether (release build).
    Tether,
    /// The OpenAgents 0.5.1 network server (Python).
    OpenAgents,
    /// The floor: a bare tokio-tungstenite server.
    Floor,
}

impl System {
    /// Parses `tether,openagents,floor`.
    pub fn parse_list(list: &str) -> Result<Vec<System>, String> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| match s {
                "tether" => Ok(System::Tether),
                "openagents" => Ok(System::OpenAgents),
                "floor" => Ok(System::Floor),
                other => Err(format!(
                    "unknown system `{other}` (expected tether, openagents or floor)"
                )),
            })
            .collect()
    }

    /// The name shown in tables.
    pub fn label(self) -> &'static str {
        match self {
            System::Tether => "Tether",
            System::OpenAgents => "OpenAgents 0.5.1",
            System::Floor => "floor",
        }
    }
}

/// Where the systems come from, prepared once per harness invocation.
#[derive(Debug, Clone)]
pub struct Env {
    /// A private copy of the Tether binary (so a rebuild during the run cannot change
    /// what is measured).
    pub tether_bin: PathBuf,
    /// The virtualenv with openagents 0.5.1.
    pub venv: PathBuf,
    /// Scratch directory for logs and configuration files.
    pub work_dir: PathBuf,
    /// `git describe` of the workspace, for the tables.
    pub revision: String,
}

fn exe_dir() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    exe.parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| "the bench binary has no directory".into())
}

/// Finds the Tether binary: `--tether-bin`, else `tether` next to this binary, else
/// `../release/tether` (this binary in target/debug).
fn find_tether(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(path) = explicit {
        return Ok(path.to_path_buf());
    }
    let dir = exe_dir()?;
    for candidate in [dir.join("tether"), dir.join("../release/tether")] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(format!(
        "no tether binary next to {} (run `cargo build --release -p tether -p tether-bench` first, or pass --tether-bin)",
        dir.display()
    ))
}

impl Env {
    /// Prepares the environment; creates the OpenAgents virtualenv when `openagents`
    /// is true and it is missing.
    pub async fn prepare(
        tether_bin: Option<&Path>,
        venv: Option<&Path>,
        openagents: bool,
        tether: bool,
    ) -> Result<Env, String> {
        let dir = exe_dir()?;
        let target_dir = dir.parent().unwrap_or(&dir).to_path_buf();
        let root = target_dir.parent().unwrap_or(&target_dir).to_path_buf();
        let work_dir = target_dir.join("bench-work");
        std::fs::create_dir_all(&work_dir)
            .map_err(|e| format!("cannot create {}: {e}", work_dir.display()))?;
        let tether_bin = if tether {
            let source = find_tether(tether_bin)?;
            let copy = work_dir.join(format!("tether-{}", std::process::id()));
            std::fs::copy(&source, &copy)
                .map_err(|e| format!("cannot copy {}: {e}", source.display()))?;
            copy
        } else {
            PathBuf::new()
        };
        let venv = venv
            .map(Path::to_path_buf)
            .unwrap_or_else(|| root.join(".venv-bench"));
        if openagents {
            ensure_venv(&venv).await?;
        }
        // The checkout the binary was built in; the current directory when the target
        // directory lies outside it (CARGO_TARGET_DIR).
        let revision = [root.clone(), PathBuf::from(".")]
            .iter()
            .find_map(|dir| git_describe(dir))
            .unwrap_or_else(|| "unknown".into());
        Ok(Env {
            tether_bin,
            venv,
            work_dir,
            revision,
        })
    }
}

/// `git describe --always --dirty` in `dir`, if that is a checkout.
fn git_describe(dir: &Path) -> Option<String> {
    let output = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(dir)
        .output()
        .ok()?;
    let revision = String::from_utf8(output.stdout).ok()?.trim().to_owned();
    (output.status.success() && !revision.is_empty()).then_some(revision)
}

/// Creates `venv` with openagents 0.5.1 unless it already imports.
async fn ensure_venv(venv: &Path) -> Result<(), String> {
    let python = venv.join("bin/python");
    let ok = Command::new(&python)
        .args(["-c", "import openagents.core.network, importlib.metadata as m; assert m.version('openagents') == '0.5.1'"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        return Ok(());
    }
    eprintln!(
        "tether-bench: creating {} with openagents==0.5.1 ...",
        venv.display()
    );
    let status = Command::new("python3")
        .arg("-m")
        .arg("venv")
        .arg(venv)
        .status()
        .await
        .map_err(|e| format!("python3 -m venv: {e}"))?;
    if !status.success() {
        return Err(format!("python3 -m venv {} failed", venv.display()));
    }
    let status = Command::new(venv.join("bin/pip"))
        .args([
            "install",
            "-q",
            "openagents==0.5.1",
            "requests",
            "packaging",
        ])
        .status()
        .await
        .map_err(|e| format!("pip: {e}"))?;
    if !status.success() {
        return Err("pip install openagents==0.5.1 failed".into());
    }
    Ok(())
}

/// Options for starting Tether: extra `TETHER__...` variables.
#[derive(Debug, Clone, Default)]
pub struct TetherVars(pub Vec<(String, String)>);

impl TetherVars {
    /// Adds `TETHER__{key}` = `value`.
    pub fn set(mut self, key: &str, value: impl ToString) -> Self {
        self.0.push((format!("TETHER__{key}"), value.to_string()));
        self
    }
}

/// A running server.
pub struct Server {
    child: Child,
    /// Its process id (the one whose /proc entries are read).
    pub pid: u32,
    /// WebSocket URL agents connect to.
    pub ws_url: String,
    /// HTTP base URL (Tether only).
    pub http_url: Option<String>,
}

impl Server {
    /// Starts `system` and waits until it accepts connections.
    pub async fn start(system: System, env: &Env, vars: &TetherVars) -> Result<Server, String> {
        match system {
            System::Tether => start_tether(env, vars).await,
            System::Floor => start_floor(env, &[]).await,
            System::OpenAgents => start_openagents(env).await,
        }
    }

    /// Starts the floor server pinging each connection after `interval_s` seconds
    /// without a frame and closing it 4002 after `ping_timeout_s` unanswered (the
    /// heartbeat workload's floor).
    pub async fn start_floor_pinging(
        env: &Env,
        interval_s: f64,
        ping_timeout_s: f64,
    ) -> Result<Server, String> {
        let args = [
            "--ping-interval".to_owned(),
            interval_s.to_string(),
            "--ping-timeout".to_owned(),
            ping_timeout_s.to_string(),
        ];
        start_floor(env, &args).await
    }

    /// Resident memory now, KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        procfs::rss_kib(self.pid)
    }

    /// CPU seconds used so far.
    pub fn cpu_secs(&self) -> Option<f64> {
        procfs::cpu_secs(self.pid)
    }

    /// Tether's `GET /stats`, `None` for the other systems or on error.
    pub async fn stats(&self) -> Option<serde_json::Value> {
        let base = self.http_url.as_ref()?;
        let response = reqwest::Client::new()
            .get(format!("{base}/stats"))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .ok()?;
        response.json().await.ok()
    }

    /// Waits `settle`, then returns the RSS (KiB) — after letting the server finish
    /// in-flight work.
    pub async fn settled_rss(&self, settle: Duration) -> Option<u64> {
        tokio::time::sleep(settle).await;
        self.rss_kib()
    }

    /// Stops the server: SIGTERM, then SIGKILL after 15 s.
    pub async fn stop(mut self) {
        procfs::signal(self.pid, "TERM");
        if tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

fn log_file(env: &Env, name: &str) -> Result<(PathBuf, std::fs::File), String> {
    let path = env.work_dir.join(name);
    let file = std::fs::File::create(&path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    Ok((path, file))
}

/// Reads `child`'s stdout until a line starting with `prefix`; returns the rest of it.
/// Keeps draining stdout afterwards so the child never blocks on it.
async fn wait_for_line(child: &mut Child, prefix: &str) -> Result<String, String> {
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.strip_prefix(prefix) {
                return Some(rest.trim().to_owned());
            }
        }
        None
    })
    .await;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    match found {
        Ok(Some(rest)) => Ok(rest),
        Ok(None) => Err(format!("the server exited before printing `{prefix}`")),
        Err(_) => Err(format!("the server did not print `{prefix}` within 30 s")),
    }
}

async fn start_tether(env: &Env, vars: &TetherVars) -> Result<Server, String> {
    start_tether_logging_to(env, vars, "tether.log").await
}

/// Starts Tether with its log in `log_name` (in the work directory): several nodes of
/// one cluster each need a log of their own.
pub async fn start_tether_logging_to(
    env: &Env,
    vars: &TetherVars,
    log_name: &str,
) -> Result<Server, String> {
    let (log, file) = log_file(env, log_name)?;
    let mut command = Command::new(&env.tether_bin);
    command
        .env("TETHER__NETWORK__PORT", "0")
        .env("TETHER__NETWORK__HOST", "127.0.0.1")
        .env("TETHER__NETWORK__MAX_CONNECTIONS", "1000000")
        .env("TETHER__SHUTDOWN__TIMEOUT", "2")
        // Each server its own instructions database, next to its log.
        .env(
            "TETHER__STORAGE__URL",
            format!("sqlite://{}.db", log.display()),
        )
        .env_remove("TETHER_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(file)
        .kill_on_drop(true);
    for (key, value) in &vars.0 {
        command.env(key, value);
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", env.tether_bin.display()))?;
    let pid = child.id().ok_or("tether exited at once")?;
    let rest = match wait_for_line(&mut child, "tether listening on http://").await {
        Ok(rest) => rest,
        Err(e) => {
            let tail = std::fs::read_to_string(&log)
                .ok()
                .and_then(|l| l.lines().last().map(str::to_owned))
                .unwrap_or_default();
            return Err(format!("{e}: {tail} (log {})", log.display()));
        }
    };
    Ok(Server {
        child,
        pid,
        ws_url: format!("ws://{rest}/"),
        http_url: Some(format!("http://{rest}")),
    })
}

async fn start_floor(env: &Env, extra_args: &[String]) -> Result<Server, String> {
    let (_log, file) = log_file(env, "floor.log")?;
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut child = Command::new(exe)
        .args(["floor-server", "--host", "127.0.0.1", "--port", "0"])
        .args(extra_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(file)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start the floor server: {e}"))?;
    let pid = child.id().ok_or("the floor server exited at once")?;
    let rest = wait_for_line(&mut child, "floor listening on ").await?;
    Ok(Server {
        child,
        pid,
        ws_url: format!("ws://{rest}/"),
        http_url: None,
    })
}

/// Starts `python -m openagents.cli launch-network network.yaml`: a centralized
/// network in server mode with the WebSocket transport on a free loopback port. Its
/// stdout (a debug print per message) goes to /dev/null, its log to a file.
async fn start_openagents(env: &Env) -> Result<Server, String> {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .map_err(|e| format!("cannot find a free port: {e}"))?;
        listener.local_addr().map_err(|e| e.to_string())?.port()
    };
    let dir = env.work_dir.join(format!("openagents-{port}"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let config = format!(
        "network:\n  name: BenchNetwork\n  mode: centralized\n  node_id: bench-network\n  host: 127.0.0.1\n  port: {port}\n  server_mode: true\n  transport: websocket\n  encryption_enabled: false\nlog_level: INFO\n"
    );
    std::fs::write(dir.join("network.yaml"), config).map_err(|e| e.to_string())?;
    let (log, file) = log_file(env, "openagents.log")?;
    let mut child = Command::new(env.venv.join("bin/python"))
        .args(["-m", "openagents.cli", "launch-network", "network.yaml"])
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start the OpenAgents server: {e}"))?;
    let pid = child.id().ok_or("the OpenAgents server exited at once")?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "the OpenAgents server exited ({status}); see {}",
                log.display()
            ));
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "the OpenAgents server did not listen within 60 s; see {}",
                log.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(Server {
        child,
        pid,
        ws_url: format!("ws://{addr}/"),
        http_url: None,
    })
}
