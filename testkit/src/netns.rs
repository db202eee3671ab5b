//! A peer behind a link that can be made a black hole: packets sent to it vanish, nothing
//! answers, nothing is refused, as when a host dies or a firewall starts dropping a flow.
//! Only the kernel's timers (`TCP_USER_TIMEOUT`, retransmission) and the pool's PINGs can
//! notice.
//!
//! The peer lives in a network namespace of its own, joined to this one by a veth pair on a
//! private /30 (in 198.18.0.0/15, the range set aside for network tests). A listener bound
//! there (by a thread that enters the namespace) serves from this process as any other.
//! [`BlackHoleLink::black_hole`] puts a `blackhole` queueing discipline on this side's end of
//! the pair: everything this side sends is dropped, so the peer never sees data and never
//! ACKs. The namespace and the pair are named after this process and a counter, and removed
//! when the [`BlackHoleLink`] is dropped (on a panic too); ones left by a process that was
//! killed are removed by the next test that makes one.
//!
//! It needs root, or `CAP_NET_ADMIN` and `CAP_SYS_ADMIN`, and iproute2 (`ip`, `tc`).
//! [`BlackHoleLink::create`] panics with what to do when they are missing, unless
//! [`SKIP_ENV`] is set, when it returns `None` and the test passes without running.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Set (to anything) to skip the tests that need a network namespace, where they cannot run
/// (no root, no iproute2, a kernel without namespaces or the `blackhole` qdisc).
pub const SKIP_ENV: &str = "GRPC_POOL_SKIP_NETNS_TESTS";

/// The namespaces this module makes are named `NAME_PREFIX<pid>-<n>`.
const NAME_PREFIX: &str = "grpc-pool-bh-";

/// A namespace joined to this one by a veth pair whose near end can drop everything.
#[derive(Debug)]
pub struct BlackHoleLink {
    namespace: String,
    /// Our end of the pair, in this namespace.
    near: String,
    /// The peer's end of the pair, in the namespace.
    far: String,
    /// The peer's address, in the namespace.
    peer: Ipv4Addr,
}

impl BlackHoleLink {
    /// Makes the namespace and the link, or returns `None` when [`SKIP_ENV`] is set. Panics
    /// with what to do when this process may not make them.
    pub fn create() -> Option<BlackHoleLink> {
        if std::env::var_os(SKIP_ENV).is_some() {
            eprintln!("{SKIP_ENV} is set: skipping a test that needs a network namespace");
            return None;
        }
        let missing = missing_capabilities();
        if !missing.is_empty() {
            panic!(
                "this test black-holes a peer in a network namespace, which needs root (it lacks {}): \
                 run it as root (or with CAP_NET_ADMIN and CAP_SYS_ADMIN), or set {SKIP_ENV}=1 to skip it",
                missing.join(" and ")
            );
        }
        remove_stale_namespaces();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // A /30 of 198.18.0.0/15 per process and link: 2^15 of them.
        let index = pid.wrapping_mul(8).wrapping_add(n) % (1 << 15);
        let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + index * 4;
        let (near_addr, peer) = (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2));
        let link = BlackHoleLink {
            namespace: format!("{NAME_PREFIX}{pid}-{n}"),
            // Interface names have at most 15 bytes.
            near: format!("gpbh{pid}n{n}"),
            far: format!("gpbh{pid}f{n}"),
            peer,
        };
        let far = link.far.clone();
        let ns = link.namespace.clone();
        // From here on, a failure drops `link`, which removes what was made.
        ip(&["netns", "add", &ns]);
        ip(&["link", "add", &link.near, "type", "veth", "peer", "name", &far]);
        ip(&["link", "set", &far, "netns", &ns]);
        ip(&["addr", "add", &format!("{near_addr}/30"), "dev", &link.near]);
        ip(&["link", "set", &link.near, "up"]);
        ip(&["-n", &ns, "addr", "add", &format!("{peer}/30"), "dev", &far]);
        ip(&["-n", &ns, "link", "set", &far, "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        Some(link)
    }

    /// A listener on the peer's address (a free port), in the namespace.
    pub fn listen(&self) -> tokio::net::TcpListener {
        let path = format!("/var/run/netns/{}", self.namespace);
        let peer = self.peer;
        // Entering a namespace moves only the calling thread: a thread of our own, so that no
        // runtime thread changes namespace. The socket stays in it for good.
        let listener = std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns on a namespace file we hold open; it changes only this thread.
            let entered = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(entered, 0, "setns({path}): {}", std::io::Error::last_os_error());
            let listener = std::net::TcpListener::bind((peer, 0)).expect("bind in the namespace");
            listener.set_nonblocking(true).expect("non-blocking listener");
            listener
        })
        .join()
        .expect("the thread binding in the namespace");
        tokio::net::TcpListener::from_std(listener).expect("a tokio listener")
    }

    /// From now on, every packet this side sends to the peer is dropped without a trace.
    pub fn black_hole(&self) {
        tc(&["qdisc", "add", "dev", &self.near, "root", "blackhole"]);
    }

    /// From now on, every packet either side sends is dropped: the flow is gone both ways, as
    /// when a NAT or load balancer forgets it. (With [`black_hole`](Self::black_hole) alone,
    /// the peer's retransmissions still arrive, and each counts as news for this side's TCP.)
    pub fn cut_both_ways(&self) {
        tc(&["qdisc", "add", "dev", &self.near, "root", "blackhole"]);
        tc(&["-n", &self.namespace, "qdisc", "add", "dev", &self.far, "root", "blackhole"]);
    }

    /// Packets flow again (after [`black_hole`](Self::black_hole)).
    pub fn restore(&self) {
        tc(&["qdisc", "del", "dev", &self.near, "root"]);
    }
}

impl Drop for BlackHoleLink {
    fn drop(&mut self) {
        // Deleting our end deletes the pair at once; the namespace itself lives on until the
        // last socket in it closes, without a name.
        quietly("ip", &["link", "del", &self.near]);
        quietly("ip", &["netns", "del", &self.namespace]);
    }
}

/// Runs `program` (as [`run`] finds it) and ignores how it went: for cleaning up, in a
/// `Drop` that may run while a test panics, so it never panics itself.
fn quietly(program: &str, args: &[&str]) {
    let _ = output(program, args);
}

fn ip(args: &[&str]) {
    run("ip", args);
}

fn tc(args: &[&str]) {
    run("tc", args);
}

fn run(program: &str, args: &[&str]) {
    let output = output(program, args).unwrap_or_else(|e| {
        panic!("cannot run `{program}` (iproute2): {e}; install it, or set {SKIP_ENV}=1 to skip this test")
    });
    assert!(
        output.status.success(),
        "`{program} {}` failed: {}(set {SKIP_ENV}=1 to skip the tests that need a network namespace)",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `program`'s output, found on the PATH or, since a sudo or CI environment's PATH may lack
/// them, in /usr/sbin or /sbin.
fn output(program: &str, args: &[&str]) -> std::io::Result<std::process::Output> {
    for path in [program.to_owned(), format!("/usr/sbin/{program}"), format!("/sbin/{program}")] {
        match Command::new(&path).args(args).output() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            other => return other,
        }
    }
    Err(std::io::ErrorKind::NotFound.into())
}

/// Which of the capabilities the link needs this process lacks.
fn missing_capabilities() -> Vec<&'static str> {
    const NEEDED: [(u32, &str); 2] = [(12, "CAP_NET_ADMIN"), (21, "CAP_SYS_ADMIN")];
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    NEEDED.iter().filter(|(bit, _)| effective & (1 << bit) == 0).map(|(_, name)| *name).collect()
}

/// Namespaces and links of ours whose process is gone (killed before it could drop its
/// link). Deleting a namespace is not enough: sockets the dead process left in it (a
/// connection still retransmitting) keep it, and the pair, alive for minutes.
fn remove_stale_namespaces() {
    let gone = |pid: &str| !std::path::Path::new(&format!("/proc/{pid}")).exists();
    if let Ok(links) = std::fs::read_dir("/sys/class/net") {
        for link in links.flatten() {
            let name = link.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix("gpbh").and_then(|rest| rest.split(['n', 'f']).next()) else {
                continue;
            };
            if gone(pid) {
                quietly("ip", &["link", "del", &name]);
            }
        }
    }
    let Ok(entries) = std::fs::read_dir("/var/run/netns") else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(NAME_PREFIX).and_then(|rest| rest.split('-').next()) else {
            continue;
        };
        if gone(pid) {
            quietly("ip", &["netns", "del", &name]);
        }
    }
}
