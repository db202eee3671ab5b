//! What keepalive costs at scale: 10,000 idle members PINGed every 10 s.
//!
//! Runs: the pool with its defaults, with keepalive 10 s/5 s, without keepalive, and two floors
//! to compare with: as many bare `h2` connections, each PINGed every 10 s by a task of its own;
//! and the same PING frames written and read with bare system calls from one thread (epoll, no
//! runtime, no HTTP/2 state), what the kernel alone costs.
//! CPU is split into user and kernel time; on loopback the kernel time includes the server
//! side's TCP receive work, which runs in the sender's system call.
//!
//! Run: `cargo bench --bench health_task [-- --members N --seconds S --only ROWS]` (ROWS: any
//! of `defaults,keepalive,none,bare,syscalls`; all by default). The servers run in a
//! child process (this same binary, re-executed), so that the numbers are the client's
//! alone: process CPU time over a quiet window (PINGs, PONGs and the health task's timer
//! queue, all of it), once with keepalive at 10 s and once without, and resident memory per
//! idle member.

use std::time::{Duration, Instant};

use grpc_pool::{Keepalive, Pool};
use grpc_pool_testkit::process;

const PORTS: usize = 10;

/// Measures CPU over `window`: "X% of one core (user Y%, kernel Z%)".
async fn cpu_over(window: Duration) -> String {
    let ((user0, sys0), t0) = (process::cpu_seconds(), Instant::now());
    tokio::time::sleep(window).await;
    let (user1, sys1) = process::cpu_seconds();
    let wall = t0.elapsed().as_secs_f64();
    let (user, sys) = (100.0 * (user1 - user0) / wall, 100.0 * (sys1 - sys0) / wall);
    format!("CPU {:.2}% of one core (user {user:.2}%, kernel {sys:.2}%) over {wall:.0}s", user + sys)
}

async fn measure(
    label: &str,
    builder: grpc_pool::Builder,
    uris: &[String],
    members: usize,
    window: Duration,
) {
    let rss_before = process::rss_bytes();
    let started = Instant::now();
    let pool = builder.build_lazy(uris).unwrap();
    while pool.state().members() < members {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "only {} members after 300 s",
            pool.state().members()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connect_time = started.elapsed();
    // Let connection setup settle, then watch a quiet window.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = process::rss_bytes();
    let cpu = cpu_over(window).await;
    let pinged = pool
        .state()
        .endpoints
        .iter()
        .flat_map(|e| e.members.iter())
        .filter(|m| m.last_ping_rtt.is_some())
        .count();
    println!(
        "{label:<18} {members} members up in {:.1}s; {cpu}; {:.1} KiB RSS per member; {pinged} members answered a PING",
        connect_time.as_secs_f64(),
        (rss_after.saturating_sub(rss_before)) as f64 / members as f64 / 1024.0,
    );
    pool.close().await;
}

/// The floor: the same number of bare `h2` connections, each PINGed every `keepalive` by a
/// task of its own (a sleep and a PING in a loop), with no pool and no health task. What the
/// pool costs above this is the price of its bookkeeping; the rest is HTTP/2 and TCP.
async fn measure_bare_h2(uris: &[String], members: usize, keepalive: Duration, window: Duration) {
    let rss_before = process::rss_bytes();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for i in 0..members {
        let addr = uris[i % uris.len()].trim_start_matches("http://").to_owned();
        // Opened one endpoint-batch at a time, as the pool's connect pacing does.
        let tcp = tokio::net::TcpStream::connect(&addr).await.expect("connect");
        let _ = tcp.set_nodelay(true);
        let (_send, mut connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
        let mut ping_pong = connection.ping_pong().expect("ping_pong");
        let answered = answered.clone();
        tasks.spawn(async move {
            let _send = _send;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            // Spread like the pool's first PINGs: somewhere in the second half of the period.
            let phase = keepalive.mul_f64(0.5 + 0.5 * (i as f64 / members as f64));
            tokio::time::sleep(phase).await;
            loop {
                if ping_pong.ping(h2::Ping::opaque()).await.is_err() {
                    return;
                }
                answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(keepalive).await;
            }
        });
    }
    let connect_time = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = process::rss_bytes();
    let cpu = cpu_over(window).await;
    println!(
        "{:<18} {members} connections up in {:.1}s; {cpu}; {:.1} KiB RSS per connection; {} PINGs answered",
        "bare h2, 10s PING",
        connect_time.as_secs_f64(),
        (rss_after.saturating_sub(rss_before)) as f64 / members as f64 / 1024.0,
        answered.load(std::sync::atomic::Ordering::Relaxed),
    );
    tasks.shutdown().await;
}

/// An HTTP/2 PING frame: length 8, type 6, no flags, stream 0, 8 bytes of payload.
const PING_FRAME: [u8; 17] = [0, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];

/// The floor under any client: as many connections to the same servers, each sent the same
/// 17-byte PING frame every `keepalive` (on the pool's 50 ms grid, spread like its first
/// PINGs), and every PONG read, with nothing but `write`, `epoll_wait` and `read` on one
/// thread. What is measured is the kernel's share (loopback TCP on both sides of each write)
/// and the system call boundary; no design of the pool can cost less.
fn measure_syscalls(uris: &[String], members: usize, keepalive: Duration, window: Duration) {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;

    let started = Instant::now();
    let mut streams = Vec::with_capacity(members);
    for i in 0..members {
        let addr = uris[i % uris.len()].trim_start_matches("http://");
        let mut tcp = std::net::TcpStream::connect(addr).expect("connect");
        let _ = tcp.set_nodelay(true);
        // The client's preface and an empty SETTINGS frame; then the server's SETTINGS (its
        // first frame) read and acknowledged, as a client must before anything else.
        tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").expect("preface");
        let mut head = [0u8; 9];
        tcp.read_exact(&mut head).expect("the server's SETTINGS");
        assert_eq!(head[3], 4, "the server's first frame is SETTINGS");
        let mut payload = vec![0u8; usize::from(head[1]) << 8 | usize::from(head[2])];
        tcp.read_exact(&mut payload).expect("the server's SETTINGS");
        tcp.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).expect("SETTINGS ACK");
        tcp.set_nonblocking(true).expect("nonblocking");
        streams.push(tcp);
    }
    let connect_time = started.elapsed();
    // SAFETY: plain system calls on descriptors this function owns; the epoll descriptor is
    // closed at the end, the streams when dropped.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(epoll >= 0, "epoll_create1");
    for (i, tcp) in streams.iter().enumerate() {
        let mut event = libc::epoll_event { events: libc::EPOLLIN as u32, u64: i as u64 };
        let added = unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, tcp.as_raw_fd(), &mut event) };
        assert_eq!(added, 0, "epoll_ctl");
    }
    let grid = Duration::from_millis(50);
    let t0 = Instant::now();
    // Member i is first due somewhere in the second half of the period, like the pool's.
    let mut due: Vec<Duration> =
        (0..members).map(|i| keepalive.mul_f64(0.5 + 0.5 * (i as f64 / members as f64))).collect();
    let mut next = 0usize;
    let (mut pongs, mut buf) = (0u64, [0u8; 4096]);
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut cpu_start = None;
    let settle = Duration::from_secs(2);
    let mut pongs_at_start = 0;
    loop {
        let now = t0.elapsed();
        if cpu_start.is_none() && now >= settle {
            cpu_start = Some((process::cpu_seconds(), Instant::now()));
            pongs_at_start = pongs;
        }
        if now >= settle + window {
            break;
        }
        // Every member due by this grid slot: a PING each. `due` rises with i within a
        // period, so the due ones are a run from `next`.
        while due[next] <= now {
            let written = (&streams[next]).write(&PING_FRAME).expect("write a PING");
            assert_eq!(written, PING_FRAME.len());
            due[next] += keepalive;
            next = (next + 1) % members;
        }
        let slot_end = (now.as_nanos() / grid.as_nanos() + 1) * grid.as_nanos();
        let wait_ms = ((slot_end - now.as_nanos()) / 1_000_000).max(1) as i32;
        let ready = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), events.len() as i32, wait_ms) };
        for event in &events[..ready.max(0) as usize] {
            let index = event.u64 as usize;
            match (&streams[index]).read(&mut buf) {
                Ok(0) => panic!("the server closed connection {index}"),
                Ok(n) => pongs += (n / PING_FRAME.len()) as u64,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("read: {e}"),
            }
        }
    }
    let ((user0, sys0), wall0) = cpu_start.expect("measured");
    let (user1, sys1) = process::cpu_seconds();
    let wall = wall0.elapsed().as_secs_f64();
    let (user, sys) = (100.0 * (user1 - user0) / wall, 100.0 * (sys1 - sys0) / wall);
    unsafe { libc::close(epoll) };
    println!(
        "{:<18} {members} connections up in {:.1}s; CPU {:.2}% of one core (user {user:.2}%, kernel {sys:.2}%) over {wall:.0}s; {} PONGs read in it",
        "syscalls only",
        connect_time.as_secs_f64(),
        user + sys,
        pongs - pongs_at_start,
    );
}

fn main() {
    if process::is_server_process() {
        return process::serve_until_stdin_closes(PORTS);
    }
    let mut members = 10_000usize;
    let mut seconds = 20u64;
    // Which rows to run (all by default): any of defaults, keepalive, none, bare.
    let mut only: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--members" => members = args.next().and_then(|v| v.parse().ok()).expect("--members N"),
            "--seconds" => seconds = args.next().and_then(|v| v.parse().ok()).expect("--seconds S"),
            "--only" => only = Some(args.next().expect("--only defaults,keepalive,none,bare,syscalls")),
            _ => {} // cargo bench passes --bench
        }
    }
    let (mut child, uris) = process::start_server_process();
    let per_endpoint = members.div_ceil(uris.len());
    let members = per_endpoint * uris.len();

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let runs = |row: &str| only.as_deref().is_none_or(|only| only.split(',').any(|o| o == row));
    rt.block_on(async {
        let base = || {
            Pool::builder()
                .min_connections(per_endpoint)
                .max_connections(per_endpoint)
                .connect_timeout(Duration::from_secs(60))
                .idle_timeout(None)
        };
        let window = Duration::from_secs(seconds);
        // The defaults: idle members are not PINGed (they are checked before use instead).
        if runs("defaults") {
            measure("defaults (keepalive 20s/10s with calls in flight)", base(), &uris, members, window)
                .await;
        }
        // Idle members PINGed every 10 s, as servers that permit it allow.
        let idle_pings = {
            let mut v = Keepalive::new(Duration::from_secs(10), Duration::from_secs(5));
            v.permit_without_stream = true;
            v.max_pings_without_data = 0;
            v
        };
        if runs("keepalive") {
            let builder = base().keepalive(Some(idle_pings));
            measure("keepalive 10s/5s, idle members too", builder, &uris, members, window).await;
        }
        if runs("none") {
            measure("no keepalive", base().keepalive(None), &uris, members, window).await;
        }
        if runs("bare") {
            measure_bare_h2(&uris, members, Duration::from_secs(10), window).await;
        }
    });
    if runs("syscalls") {
        measure_syscalls(&uris, members, Duration::from_secs(10), Duration::from_secs(seconds));
    }
    drop(child.stdin.take());
    let _ = child.wait();
}
