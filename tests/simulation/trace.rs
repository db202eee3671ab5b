//! The run's journal: the trace (every event of the workload, the servers and the faults,
//! with its simulated time) and the servers' ledger of the calls their handlers ran.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Shared by the client, the servers and the driver; all of them run on the simulation's one
/// thread, so the order of its lines is the order things happened in.
#[derive(Clone, Default)]
pub struct Journal(Arc<Mutex<Inner>>);

#[derive(Default)]
struct Inner {
    lines: Vec<String>,
    /// (call id, server, attempt number the server was told), one per handler run.
    ledger: Vec<(u64, String, u32)>,
    violations: Vec<String>,
    /// The pool's state as the sampler last saw it (not a trace line: for reports).
    last_state: String,
    /// Every TCP connect the pool began: host, start, end, whether it connected.
    connects: Vec<Connect>,
}

/// One TCP connect the pool began.
#[derive(Debug, Clone)]
pub struct Connect {
    pub host: String,
    pub started: Duration,
    pub ended: Duration,
    pub connected: bool,
}

/// Simulated time now, as the host running the caller sees it (the driver passes its own).
pub fn now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

impl Journal {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A trace line at `at`.
    pub fn at(&self, at: Duration, what: impl AsRef<str>) {
        let line = format!("{:>10.3}ms {}", at.as_secs_f64() * 1e3, what.as_ref());
        self.inner().lines.push(line);
    }

    /// A trace line now.
    pub fn note(&self, what: impl AsRef<str>) {
        self.at(now(), what);
    }

    /// A handler ran call `id` on `server`.
    pub fn handled(&self, id: u64, server: &str, attempt: u32, method: &str) {
        self.note(format!("{server} runs call {id} ({method}, previous attempts {attempt})"));
        self.inner().ledger.push((id, server.to_owned(), attempt));
    }

    /// An invariant failed: `check` is its name.
    pub fn violation(&self, check: &str, what: impl AsRef<str>) {
        self.violation_at(now(), check, what);
    }

    /// An invariant failed, as the driver (outside the hosts) saw it at `at`.
    pub fn violation_at(&self, at: Duration, check: &str, what: impl AsRef<str>) {
        let line = format!("[{check}] {}", what.as_ref());
        self.at(at, format!("VIOLATION {line}"));
        self.inner().violations.push(line);
    }

    pub fn set_last_state(&self, state: String) {
        self.inner().last_state = state;
    }

    pub fn last_state(&self) -> String {
        self.inner().last_state.clone()
    }

    pub fn violations(&self) -> Vec<String> {
        self.inner().violations.clone()
    }

    /// A TCP connect to `host` that began at `started` ended now.
    pub fn connect(&self, host: &str, started: Duration, connected: bool) {
        let ended = now();
        let how = if connected { "connected" } else { "failed" };
        self.at(ended, format!("TCP connect to {host} begun at {:.3}ms {how}", started.as_secs_f64() * 1e3));
        self.inner().connects.push(Connect { host: host.to_owned(), started, ended, connected });
    }

    pub fn connects(&self) -> Vec<Connect> {
        self.inner().connects.clone()
    }

    pub fn ledger(&self) -> Vec<(u64, String, u32)> {
        self.inner().ledger.clone()
    }

    pub fn lines(&self) -> Vec<String> {
        self.inner().lines.clone()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for line in &self.inner().lines {
            let _ = writeln!(out, "{line}");
        }
        out
    }
}
