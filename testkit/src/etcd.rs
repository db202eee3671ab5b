//! A real etcd for tests and examples: the `etcd` binary (Debian's `etcd-server`, installed by
//! `scripts/setup-etcd`) started on free 127.0.0.1 ports with its data in a temporary
//! directory, stopped by PID. It never touches an etcd the system runs (port 2379).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The binary: `$GRPC_POOL_ETCD`, or `etcd` on the PATH.
pub fn etcd_binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("GRPC_POOL_ETCD") {
        return Ok(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join("etcd");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err("the `etcd` binary is not on the PATH: run `scripts/setup-etcd` (it installs Debian's \
         `etcd-server` package: `apt-get install -y etcd-server`), or set GRPC_POOL_ETCD to an \
         etcd 3.4+ binary"
        .to_owned())
}

/// One etcd member on 127.0.0.1, killed (SIGKILL) and its directory removed on drop. On
/// Linux it also dies with the thread that started it (`PR_SET_PDEATHSIG`): start it on the
/// test's own thread, not on a thread that ends before the test does.
pub struct EtcdServer {
    binary: PathBuf,
    dir: PathBuf,
    client: SocketAddr,
    peer: SocketAddr,
    child: Option<Child>,
}

static INSTANCES: AtomicUsize = AtomicUsize::new(0);

fn free_port() -> SocketAddr {
    let probe = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    probe.local_addr().expect("local address")
}

impl EtcdServer {
    /// Starts etcd and waits until it answers `/health`; panics with instructions when the
    /// binary is missing or etcd does not come up within 30 s.
    pub fn start() -> EtcdServer {
        let binary = etcd_binary().unwrap_or_else(|e| panic!("{e}"));
        let n = INSTANCES.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("grpc-pool-etcd-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("etcd data directory");
        let mut server = EtcdServer { binary, dir, client: free_port(), peer: free_port(), child: None };
        server.spawn();
        server
    }

    /// `http://127.0.0.1:port`, for clients.
    pub fn uri(&self) -> String {
        format!("http://{}", self.client)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills etcd (SIGKILL) and waits for it to exit; the data stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports and data, and waits until it is healthy.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    fn spawn(&mut self) {
        let client = format!("http://{}", self.client);
        let peer = format!("http://{}", self.peer);
        let log = std::fs::File::create(self.dir.join("etcd.log")).expect("etcd log file");
        let mut command = Command::new(&self.binary);
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: prctl is async-signal-safe and touches only the child being started.
            // etcd gets SIGKILL when the thread that started it ends, so a test process
            // killed from outside (a timeout, ^C) leaves no etcd behind.
            unsafe {
                command.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = command
            .arg("--name=test")
            .arg(format!("--data-dir={}", self.dir.join("data").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .arg("--initial-cluster-state=new")
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.binary.display()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.healthy() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                let log = std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default();
                panic!("etcd exited with {status} at start:\n{log}");
            }
            assert!(Instant::now() < deadline, "etcd at {client} not healthy within 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether `/health` answers `"health":"true"`.
    fn healthy(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect_timeout(&self.client, Duration::from_millis(500)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let request = format!("GET /health HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", self.client);
        if stream.write_all(request.as_bytes()).is_err() {
            return false;
        }
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer.contains("\"health\":\"true\"")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
