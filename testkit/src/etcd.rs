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
    /// Flags of the test's own, after the ones every instance gets.
    args: Vec<String>,
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
        EtcdServer::start_with(&[])
    }

    /// The same, with more flags for etcd (`--auth-token-ttl=1`), kept for restarts.
    pub fn start_with(args: &[&str]) -> EtcdServer {
        let binary = etcd_binary().unwrap_or_else(|e| panic!("{e}"));
        let n = INSTANCES.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("grpc-pool-etcd-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("etcd data directory");
        let args = args.iter().map(|a| a.to_string()).collect();
        let mut server =
            EtcdServer { binary, dir, client: free_port(), peer: free_port(), args, child: None };
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
            .args(&self.args)
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

    /// Turns on etcd's authentication with a `root` user (password `root_password`) and, for
    /// each `(user, password, prefix)`, a user whose role may read and write the keys under
    /// `prefix`. Goes through etcd's JSON gateway, so the crate under test is not involved.
    /// Panics if etcd refuses any step.
    pub fn enable_auth(&self, root_password: &str, users: &[(&str, &str, &str)]) {
        self.post("/v3/auth/user/add", &format!(r#"{{"name":"root","password":"{root_password}"}}"#));
        self.post("/v3/auth/role/add", r#"{"name":"root"}"#);
        self.post("/v3/auth/user/grant", r#"{"user":"root","role":"root"}"#);
        for (user, password, prefix) in users {
            let role = format!("{user}-role");
            self.post("/v3/auth/user/add", &format!(r#"{{"name":"{user}","password":"{password}"}}"#));
            self.post("/v3/auth/role/add", &format!(r#"{{"name":"{role}"}}"#));
            // Every key under the prefix: up to the prefix with its last byte one higher
            // (the test prefixes end in `/`, far below 0xff).
            let mut end = prefix.as_bytes().to_vec();
            *end.last_mut().expect("a prefix of 1 or more bytes") += 1;
            let (key, end) = (base64(prefix.as_bytes()), base64(&end));
            // permType 2: READWRITE.
            self.post(
                "/v3/auth/role/grant",
                &format!(r#"{{"name":"{role}","perm":{{"permType":2,"key":"{key}","range_end":"{end}"}}}}"#),
            );
            self.post("/v3/auth/user/grant", &format!(r#"{{"user":"{user}","role":"{role}"}}"#));
        }
        self.post("/v3/auth/enable", "{}");
    }

    /// What etcd has logged so far (its `zap` lines, JSON).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }

    /// POSTs a JSON body to etcd's gateway; panics unless etcd answers 200.
    fn post(&self, path: &str, body: &str) -> String {
        let mut stream = TcpStream::connect_timeout(&self.client, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect to etcd at {}: {e}", self.client));
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.client,
            body.len()
        );
        stream.write_all(request.as_bytes()).unwrap_or_else(|e| panic!("POST {path} to etcd: {e}"));
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "etcd refused POST {path} {body}:\n{answer}");
        answer
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

/// Standard base64 with padding: how etcd's JSON gateway takes bytes fields.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_pads_like_the_standard() {
        assert_eq!(super::base64(b""), "");
        assert_eq!(super::base64(b"f"), "Zg==");
        assert_eq!(super::base64(b"fo"), "Zm8=");
        assert_eq!(super::base64(b"foo"), "Zm9v");
        assert_eq!(super::base64(b"svc/a/"), "c3ZjL2Ev");
    }
}
