//! What the harness reads about a server process from `/proc`: resident memory
//! (`VmRSS` of `/proc/PID/status`) and CPU time (`utime + stime` of `/proc/PID/stat`),
//! summed over the process and its descendants.

use std::sync::OnceLock;

/// Pids of `pid` and all its descendants (via `/proc/PID/task/*/children`).
fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let p = all[i];
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for task in tasks.flatten() {
                let path = task.path().join("children");
                if let Ok(children) = std::fs::read_to_string(path) {
                    all.extend(
                        children
                            .split_whitespace()
                            .filter_map(|c| c.parse::<u32>().ok()),
                    );
                }
            }
        }
        i += 1;
    }
    all.sort_unstable();
    all.dedup();
    all
}

fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Resident memory of `pid` and its descendants, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let values: Vec<u64> = tree(pid).into_iter().filter_map(rss_of).collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

fn ticks_of(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; the fields after it are fixed.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 when that fails).
fn clock_ticks() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU seconds (user + system) used so far by `pid` and its descendants.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let ticks: Vec<u64> = tree(pid).into_iter().filter_map(ticks_of).collect();
    (!ticks.is_empty()).then(|| ticks.iter().sum::<u64>() as f64 / clock_ticks())
}

/// Open file descriptors of `pid`.
pub fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// Sends `signal` (e.g. `TERM`) to `pid` with kill(1).
pub fn signal(pid: u32, signal: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stderr(std::process::Stdio::null())
        .status();
}
