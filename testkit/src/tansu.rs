//! A tansu broker (Kafka-compatible, in memory) the caller owns: started on a port of
//! its choosing, advertising whatever address clients should use (a [`Proxy`] in
//! front of it, so cutting the proxy cuts Kafka clients off too: they follow the
//! advertised address), killed when dropped.
//!
//! The binary is found the way `scripts/test.sh` installs it: `TETHER_TEST_TANSU`,
//! else `tansu` on the PATH, else `~/.cargo/bin/tansu`.

use crate::{free_port, wait_listening, Proxy};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long tansu may take to listen after it was started.
const START_DEADLINE: Duration = Duration::from_secs(20);

/// The tansu binary: `TETHER_TEST_TANSU`, else `tansu` on the PATH or in
/// `~/.cargo/bin`.
pub fn binary() -> Result<PathBuf, String> {
    if let Ok(path) = std::env::var("TETHER_TEST_TANSU") {
        return Ok(PathBuf::from(path));
    }
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|dir| PathBuf::from(dir).join("tansu"))
        .chain(std::env::var("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/tansu")))
        .find(|path| path.is_file())
        .ok_or_else(|| {
            "tansu (a Kafka-compatible broker) is not installed: run scripts/test.sh, which installs it, or set TETHER_TEST_TANSU".to_owned()
        })
}

/// A running tansu broker, killed when dropped.
pub struct Tansu {
    child: Child,
    /// The port it listens on.
    pub port: u16,
}

impl Tansu {
    /// Starts `binary` as an in-memory broker on `127.0.0.1:<port>` telling clients
    /// to connect to `advertised` (`host:port`); returns once it listens.
    pub fn start(binary: &Path, port: u16, advertised: &str) -> Result<Self, String> {
        let child = Command::new(binary)
            .arg("broker")
            .arg("--listener-url")
            .arg(format!("tcp://127.0.0.1:{port}"))
            .arg("--advertised-listener-url")
            .arg(format!("tcp://{advertised}"))
            .arg("--storage-engine")
            .arg("memory://tansu/")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start tansu ({}): {e}", binary.display()))?;
        // Killed by drop if it never listens.
        let tansu = Self { child, port };
        wait_listening(port, "tansu", START_DEADLINE)?;
        Ok(tansu)
    }

    /// Starts `binary` on a free port behind a new [`Proxy`], advertising the proxy:
    /// every Kafka client reaches this broker only through the proxy.
    pub fn behind_proxy(binary: &Path) -> Result<(Self, Proxy), String> {
        let port = free_port();
        let proxy = Proxy::start(&format!("127.0.0.1:{port}"));
        let tansu = Self::start(binary, port, &proxy.addr())?;
        Ok((tansu, proxy))
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
