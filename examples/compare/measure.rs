//! What the comparison reads around each measured window, and the server process it reads
//! them from: CPU time of the client and server processes (`/proc/<pid>/stat`), the machine's
//! TCP segments sent (`/proc/net/snmp`), the client's own sockets' segments (`ss -ti`) and
//! the client's writes (the counting socket, or `/proc/<pid>/io` for h2load).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// Clock ticks per second, for `/proc/<pid>/stat` (`getconf CLK_TCK`; 100 if that fails,
/// which is what Linux uses everywhere but a few old architectures).
fn ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// User + system CPU seconds of a process (all its threads) so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command name's closing parenthesis: field 3 onwards; utime and stime are
    // fields 14 and 15.
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / ticks_per_second()
}

/// Write system calls of a process so far (`syscw` of `/proc/<pid>/io`: write, writev and
/// the like; not sendmsg).
pub fn write_syscalls(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines().find_map(|l| l.strip_prefix("syscw:")).and_then(|v| v.trim().parse().ok())
}

/// TCP segments sent by the whole machine so far (`Tcp: OutSegs`). On loopback both
/// directions of every connection count, and so does everyone else's traffic.
fn out_segments() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else { return 0 };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "OutSegs")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Segments sent so far by the established sockets whose `side` port (`dport` for the
/// clients' sockets, `sport` for the server's) is one of `ports`, from `ss -ti`.
fn socket_segments(side: &str, ports: &[u16]) -> u64 {
    let filter: Vec<String> = ports.iter().map(|p| format!("{side} = :{p}")).collect();
    let output = Command::new("ss")
        .args(["-tinH", "state", "established"])
        .arg(format!("( {} )", filter.join(" or ")))
        .output();
    let Ok(output) = output else { return 0 };
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .filter_map(|t| t.strip_prefix("segs_out:"))
        .filter_map(|v| v.parse::<u64>().ok())
        .sum()
}

/// Where a cell's client writes are counted.
#[derive(Clone, Copy)]
pub enum Writes {
    /// The counting socket in this process.
    Counted,
    /// `syscw` of another process (h2load).
    Syscalls(u32),
    /// Not counted (tonic's `balance_list` takes no connector).
    None,
}

/// The readings at one end of a measured window.
#[derive(Clone, Copy, Default)]
pub struct Sample {
    client_cpu: f64,
    server_cpu: f64,
    out_segs: u64,
    client_segs: u64,
    server_segs: u64,
    writes: Option<u64>,
    flushes: Option<u64>,
}

/// Per call, over a window.
#[derive(Clone, Copy)]
pub struct PerCall {
    pub client_cpu_us: f64,
    pub server_cpu_us: f64,
    /// Every TCP segment the machine sent, both directions.
    pub segments: f64,
    pub client_segments: f64,
    pub server_segments: f64,
    pub client_writes: f64,
    pub client_flushes: f64,
}

/// Reads the client process, the server process and the sockets between them.
#[derive(Clone)]
pub struct Probe {
    pub client: u32,
    pub server: u32,
    pub ports: Vec<u16>,
    pub writes: Writes,
}

impl Probe {
    /// At a window's start: the slow readings (`ss` forks) first, CPU last.
    pub fn start(&self) -> Sample {
        let (client_segs, server_segs) = self.sockets();
        let out_segs = out_segments();
        let (writes, flushes) = self.writes();
        Sample {
            client_cpu: cpu_seconds(self.client),
            server_cpu: cpu_seconds(self.server),
            out_segs,
            client_segs,
            server_segs,
            writes,
            flushes,
        }
    }

    /// At a window's end: CPU first, so that neither window counts the forks.
    pub fn end(&self) -> Sample {
        let (client_cpu, server_cpu) = (cpu_seconds(self.client), cpu_seconds(self.server));
        let (writes, flushes) = self.writes();
        let out_segs = out_segments();
        let (client_segs, server_segs) = self.sockets();
        Sample { client_cpu, server_cpu, out_segs, client_segs, server_segs, writes, flushes }
    }

    fn sockets(&self) -> (u64, u64) {
        (socket_segments("dport", &self.ports), socket_segments("sport", &self.ports))
    }

    fn writes(&self) -> (Option<u64>, Option<u64>) {
        match self.writes {
            Writes::Counted => {
                let (writes, flushes) = super::counting::counts();
                (Some(writes), Some(flushes))
            }
            Writes::Syscalls(pid) => (write_syscalls(pid), None),
            Writes::None => (None, None),
        }
    }
}

/// The differences between two samples, divided by `calls`.
pub fn per_call(start: Sample, end: Sample, calls: f64) -> PerCall {
    let per = |a: f64, b: f64| if calls > 0.0 { (b - a) / calls } else { f64::NAN };
    let counted = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => per(a as f64, b as f64),
        _ => f64::NAN,
    };
    PerCall {
        client_cpu_us: per(start.client_cpu, end.client_cpu) * 1e6,
        server_cpu_us: per(start.server_cpu, end.server_cpu) * 1e6,
        segments: per(start.out_segs as f64, end.out_segs as f64),
        client_segments: per(start.client_segs as f64, end.client_segs as f64),
        server_segments: per(start.server_segs as f64, end.server_segs as f64),
        client_writes: counted(start.writes, end.writes),
        client_flushes: counted(start.flushes, end.flushes),
    }
}

/// The hidden `--serve N single|multi [PORT,...|-] [SLOW_MS]`: in the child, starts N echo
/// servers (on the ports given, or any; the first slower by SLOW_MS) on a runtime of the layout's shape, prints their ports on one
/// line, and serves until stdin closes (then shuts down gracefully: GOAWAY on every
/// connection) or the parent kills it.
pub fn serve(ports: usize, single: bool, on: Option<Vec<u16>>, slow: Option<Duration>) {
    let rt = super::runtime(single);
    rt.block_on(async {
        let mut servers = Vec::new();
        for i in 0..ports {
            let port = on.as_ref().and_then(|p| p.get(i).copied());
            // The first server is the slow one, when there is one.
            let slow = slow.filter(|_| i == 0);
            let options = grpc_pool_testkit::ServerOptions { port, slow, ..Default::default() };
            servers.push(grpc_pool_testkit::TestServer::start_with(options).await);
        }
        let line: Vec<String> = servers.iter().map(|s| s.addr().port().to_string()).collect();
        println!("{}", line.join(" "));
        tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            while std::io::stdin().read_line(&mut line).map(|n| n > 0).unwrap_or(false) {}
        })
        .await
        .expect("stdin watcher");
        for server in servers {
            server.shutdown().await;
        }
    });
}

/// The echo server in a process of its own, so that its CPU time is its own.
pub struct ServerProcess {
    pub child: Child,
    pub ports: Vec<u16>,
}

impl ServerProcess {
    pub fn start(ports: usize, single: bool, slow: Option<Duration>) -> ServerProcess {
        ServerProcess::start_on(ports, single, None, slow)
    }

    /// Starts it on the given ports (a restart of one that stopped), or on any; the first
    /// server slower than the others by `slow`.
    pub fn start_on(ports: usize, single: bool, on: Option<&[u16]>, slow: Option<Duration>) -> ServerProcess {
        ServerProcess::start_in(ports, if single { "single" } else { "multi" }, on, slow)
    }

    /// Starts it in a layout (`multi`, `single` or `pinned`: one worker thread on the second CPU).
    pub fn start_in(ports: usize, layout: &str, on: Option<&[u16]>, slow: Option<Duration>) -> ServerProcess {
        let on = match on {
            Some(p) => p.iter().map(u16::to_string).collect::<Vec<_>>().join(","),
            None => "-".to_owned(),
        };
        let slow = slow.map(|s| s.as_millis().to_string()).unwrap_or_else(|| "0".into());
        let mut child = Command::new(std::env::current_exe().expect("this executable"))
            .args(["--serve", &ports.to_string(), layout, &on, &slow])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the server process");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("its stdout")).read_line(&mut line).expect("its ports");
        let ports = line.split_whitespace().map(|p| p.parse().expect("a port")).collect();
        ServerProcess { child, ports }
    }

    /// Graceful stop: stdin closed, so the servers send GOAWAY, finish their calls and exit;
    /// returns when the process has.
    pub fn stop(mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }

    pub fn uris(&self) -> Vec<String> {
        self.ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // By its PID (std's kill is SIGKILL to this child), then reaped.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Keeps the calling thread (and the threads and processes it starts from then on) on one CPU,
/// or, given `None`, lets it run on every CPU again.
pub fn pin_this_thread(cpu: Option<usize>) {
    // The machine's CPUs, not this thread's share (available_parallelism's answer, which
    // shrinks while the thread is pinned).
    // SAFETY: sysconf only reads.
    let cpus = usize::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }).unwrap_or(1).max(1);
    // SAFETY: a zeroed cpu_set_t is the empty set, CPU_SET writes inside it, and
    // sched_setaffinity reads it; pid 0 is the calling thread.
    let result = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for c in (0..cpus).filter(|c| cpu.is_none_or(|only| only == *c)) {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(result, 0, "sched_setaffinity: {}", std::io::Error::last_os_error());
}
