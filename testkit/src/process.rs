//! For benches that measure the client alone: their servers run in a child process (the
//! same binary, started again with [`SERVER_ENV`] set), and the client reads its own CPU time
//! and memory from `/proc`.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};

use crate::TestServer;

/// Set in the child process that serves.
pub const SERVER_ENV: &str = "GRPC_POOL_BENCH_SERVER";

/// Whether this process is the serving child.
pub fn is_server_process() -> bool {
    std::env::var_os(SERVER_ENV).is_some()
}

/// In the child: starts `count` echo servers on a one-worker runtime, prints their ports on
/// one line, and serves until the parent closes our stdin.
pub fn serve_until_stdin_closes(count: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("server runtime");
    rt.block_on(async {
        let mut servers = Vec::new();
        for _ in 0..count {
            servers.push(TestServer::start().await);
        }
        let ports: Vec<String> = servers.iter().map(|s| s.addr().port().to_string()).collect();
        println!("{}", ports.join(" "));
        std::io::stdout().flush().expect("write ports");
        tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            while std::io::stdin().read_line(&mut line).map(|n| n > 0).unwrap_or(false) {}
        })
        .await
        .expect("stdin watcher");
    });
}

/// In the parent: starts this binary again as the serving child and returns it with the
/// `http://127.0.0.1:port` URIs it serves. Drop the child's stdin to stop it.
pub fn start_server_process() -> (Child, Vec<String>) {
    spawn_server_process("1")
}

/// This binary again, with [`SERVER_ENV`] set to `value`; returns it once it printed its
/// ports, with their URIs.
fn spawn_server_process(value: &str) -> (Child, Vec<String>) {
    let mut child = Command::new(std::env::current_exe().expect("current executable"))
        .env(SERVER_ENV, value)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the server process");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("child stdout")).read_line(&mut line).expect("ports");
    let uris = line.split_whitespace().map(|port| format!("http://127.0.0.1:{port}")).collect();
    (child, uris)
}

/// In a child started by [`start_server_processes`]: the number of servers it is to start.
pub fn server_process_count() -> Option<usize> {
    std::env::var(SERVER_ENV).ok().and_then(|count| count.parse().ok())
}

/// In the parent: `total` echo servers over as many children (this binary again) as it
/// takes at `per_process` each (file descriptors: a listener and a connection a server),
/// with the URIs they serve, in order. Each child serves until its stdin is dropped; its
/// `main` must call [`serve_until_stdin_closes`] with [`server_process_count`].
pub fn start_server_processes(total: usize, per_process: usize) -> (Vec<Child>, Vec<String>) {
    let mut children = Vec::new();
    let mut uris = Vec::new();
    let mut left = total;
    while left > 0 {
        let count = left.min(per_process.max(1));
        let (child, served) = spawn_server_process(&count.to_string());
        uris.extend(served);
        children.push(child);
        left -= count;
    }
    assert_eq!(uris.len(), total, "every server process printed its ports");
    (children, uris)
}

/// (user, kernel) CPU seconds of this process so far.
pub fn cpu_seconds() -> (f64, f64) {
    // utime and stime, fields 14 and 15 of /proc/self/stat, in clock ticks (100 per second).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / 100.0;
    (ticks(11), ticks(12))
}

/// Resident memory of this process, in bytes.
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 4096
}
