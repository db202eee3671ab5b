//! Opening one HTTP/2 connection: TCP with `TCP_NODELAY` (or a Unix domain socket), then the
//! `h2` client handshake with the pool's window, frame and header-list settings.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::frames::{ConnSignals, ObservedIo};
use super::ping::Pinger;
use super::settings::H2Config;
use crate::endpoint::Endpoint;
use crate::error::Error;
use crate::proto::connector::{ConnectedIo, Connector};
use crate::proto::tls::Tls;

/// The transport under every member.
pub(crate) type Io = ObservedIo<Transport>;

/// A member's socket: TCP, or a Unix domain socket for an endpoint on this machine.
pub(crate) enum Transport {
    Tcp(TcpStream),
    /// Boxed: the TLS state is large, and plaintext members should not pay for its size.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    #[cfg(unix)]
    Unix(tokio::net::UnixStream),
    /// What the user's connector returned.
    Custom(Box<dyn ConnectedIo>),
}

// Each method forwards to the socket; both are `Unpin`, so no pin projection is needed.
impl AsyncRead for Transport {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            #[cfg(unix)]
            Transport::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Custom(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            #[cfg(unix)]
            Transport::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Custom(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    // h2 writes frames as several buffers at once; without these it would copy them into
    // one or write them one system call each.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            #[cfg(unix)]
            Transport::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Transport::Custom(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Tcp(s) => s.is_write_vectored(),
            Transport::Tls(s) => s.is_write_vectored(),
            #[cfg(unix)]
            Transport::Unix(s) => s.is_write_vectored(),
            Transport::Custom(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            #[cfg(unix)]
            Transport::Unix(s) => Pin::new(s).poll_flush(cx),
            Transport::Custom(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            #[cfg(unix)]
            Transport::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Custom(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
/// The `h2` connection future that a member's driver task polls.
pub(crate) type Connection = h2::client::Connection<Io, Bytes>;

/// A fresh HTTP/2 connection whose preface has been queued. The server has not necessarily
/// answered yet: the caller drives `connection` and waits for `signals.settings_or_closed()`.
pub(crate) struct Handshaken {
    pub(crate) send: h2::client::SendRequest<Bytes>,
    pub(crate) connection: Connection,
    pub(crate) signals: Arc<ConnSignals>,
    pub(crate) pinger: Pinger,
}

/// What the pool sets on each TCP socket it opens, besides `TCP_NODELAY`.
#[derive(Debug, Clone, Default)]
pub(crate) struct SocketOptions {
    /// `TCP_USER_TIMEOUT` (Linux): how long written data may stay unacknowledged before the
    /// kernel gives up on the connection, so a write to a dead peer fails fast too.
    pub(crate) user_timeout: Option<Duration>,
    /// `SO_KEEPALIVE` and its timing: probes the kernel sends on a quiet socket, with no
    /// wake-up of the process and unseen by the server's HTTP/2 PING policy.
    pub(crate) keepalive: Option<socket2::TcpKeepalive>,
    /// The local address to connect from (its port chosen by the system).
    pub(crate) local_address: Option<std::net::IpAddr>,
}

impl SocketOptions {
    pub(crate) fn from_config(config: &crate::config::Config) -> SocketOptions {
        let keepalive = config.tcp_keepalive.map(|time| {
            probe_timing(
                socket2::TcpKeepalive::new().with_time(time),
                config.tcp_keepalive_interval,
                config.tcp_keepalive_retries,
            )
        });
        SocketOptions {
            user_timeout: config.tcp_user_timeout,
            keepalive,
            local_address: config.local_address,
        }
    }
}

/// The interval between keepalive probes and their count, where the pool sets them (Linux,
/// Android, FreeBSD, Apple's systems); elsewhere they are the system's.
#[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd", target_vendor = "apple"))]
fn probe_timing(
    keepalive: socket2::TcpKeepalive,
    interval: Option<Duration>,
    retries: Option<u32>,
) -> socket2::TcpKeepalive {
    let keepalive = match interval {
        Some(interval) => keepalive.with_interval(interval),
        None => keepalive,
    };
    match retries {
        Some(retries) => keepalive.with_retries(retries),
        None => keepalive,
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd", target_vendor = "apple")))]
fn probe_timing(
    keepalive: socket2::TcpKeepalive,
    _: Option<Duration>,
    _: Option<u32>,
) -> socket2::TcpKeepalive {
    keepalive
}

/// Opens the socket to `endpoint` and starts the HTTP/2 handshake. The caller bounds the
/// time.
pub(crate) async fn handshake(
    endpoint: &Endpoint,
    config: &H2Config,
    socket: &SocketOptions,
    tls: Option<&Tls>,
    connector: Option<&Connector>,
) -> Result<Handshaken, Error> {
    let transport = match connector {
        Some(connector) => connect_with(connector, endpoint, tls).await?,
        None => connect(endpoint, socket, tls).await?,
    };
    let signals = Arc::new(ConnSignals::new());
    let io = ObservedIo::new(transport, signals.clone());
    let mut builder = h2::client::Builder::new();
    builder
        .initial_window_size(config.initial_stream_window_size)
        .initial_connection_window_size(config.initial_connection_window_size)
        .max_frame_size(config.max_frame_size)
        .max_header_list_size(config.max_header_list_size)
        .max_concurrent_reset_streams(config.max_concurrent_reset_streams)
        .reset_stream_duration(config.reset_stream_duration)
        .max_local_error_reset_streams(Some(config.max_local_error_reset_streams))
        .enable_push(false);
    if config.header_table_size != super::settings::DEFAULT_HEADER_TABLE_SIZE {
        builder.header_table_size(config.header_table_size);
    }
    let (send, mut connection) = builder
        .handshake::<_, Bytes>(io)
        .await
        .map_err(|e| Error::connect(&endpoint.to_string(), "HTTP/2 handshake", Some(Box::new(e))))?;
    let pinger = Pinger::new(connection.ping_pong(), signals.clone());
    Ok(Handshaken { send, connection, signals, pinger })
}

/// Through the user's connector, with the endpoint's URI (its resolved address, if it has one).
/// Through the user's connector, with the endpoint's URI (its resolved address, if it has
/// one); with `tls` (a connector that leaves TLS to the pool), TLS over its stream.
async fn connect_with(
    connector: &Connector,
    endpoint: &Endpoint,
    tls: Option<&Tls>,
) -> Result<Transport, Error> {
    let authority = match endpoint.address() {
        Some(address) => address.to_string(),
        None => endpoint.authority().to_string(),
    };
    let uri = http::Uri::builder()
        .scheme(endpoint.scheme().clone())
        .authority(authority)
        .path_and_query("/")
        .build()
        .map_err(|e| {
            Error::connect(&endpoint.to_string(), "building the connector's URI", Some(Box::new(e)))
        })?;
    let io = connector
        .connect(uri)
        .await
        .map_err(|e| Error::connect(&endpoint.to_string(), "the connector failed", Some(e)))?;
    match tls {
        Some(tls) => Ok(Transport::Custom(Box::new(tls.connect(endpoint, io).await?))),
        None => Ok(Transport::Custom(io)),
    }
}

async fn connect(endpoint: &Endpoint, socket: &SocketOptions, tls: Option<&Tls>) -> Result<Transport, Error> {
    #[cfg(unix)]
    if let Some(path) = endpoint.unix_path() {
        let socket = tokio::net::UnixStream::connect(path).await.map_err(|e| {
            Error::connect(
                &endpoint.to_string(),
                &format!("Unix socket connect to {}", path.display()),
                Some(Box::new(e)),
            )
        })?;
        return Ok(Transport::Unix(socket));
    }
    let tcp = match (socket.local_address, endpoint.address()) {
        (Some(local), _) => connect_from(local, endpoint).await,
        (None, Some(address)) => TcpStream::connect(address).await,
        (None, None) => TcpStream::connect((endpoint.host(), endpoint.port())).await,
    };
    let tcp = tcp.map_err(|e| Error::connect(&endpoint.to_string(), "TCP connect", Some(Box::new(e))))?;
    // gRPC messages are small and latency-bound: never wait to coalesce them.
    tcp.set_nodelay(true)
        .map_err(|e| Error::connect(&endpoint.to_string(), "setting TCP_NODELAY", Some(Box::new(e))))?;
    if let Some(timeout) = socket.user_timeout {
        set_tcp_user_timeout(&tcp, timeout).map_err(|e| {
            Error::connect(&endpoint.to_string(), "setting TCP_USER_TIMEOUT", Some(Box::new(e)))
        })?;
    }
    if let Some(keepalive) = &socket.keepalive {
        socket2::SockRef::from(&tcp)
            .set_tcp_keepalive(keepalive)
            .map_err(|e| Error::connect(&endpoint.to_string(), "setting TCP keepalive", Some(Box::new(e))))?;
    }
    match tls {
        Some(tls) if endpoint.is_tls() => Ok(Transport::Tls(Box::new(tls.connect(endpoint, tcp).await?))),
        _ => Ok(Transport::Tcp(tcp)),
    }
}

/// A TCP connection from `local` (port chosen by the system) to the first of the endpoint's
/// addresses of the same family that takes it.
async fn connect_from(local: std::net::IpAddr, endpoint: &Endpoint) -> std::io::Result<TcpStream> {
    let addresses: Vec<std::net::SocketAddr> = match endpoint.address() {
        Some(address) => vec![address],
        None => tokio::net::lookup_host((endpoint.host(), endpoint.port())).await?.collect(),
    };
    let mut last_error = None;
    for address in addresses.into_iter().filter(|a| a.is_ipv4() == local.is_ipv4()) {
        let socket =
            if local.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.bind(std::net::SocketAddr::new(local, 0))?;
        match socket.connect(address).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        let family = if local.is_ipv4() { "IPv4" } else { "IPv6" };
        std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            format!("no {family} address to connect to from the local address {local}"),
        )
    }))
}

#[cfg(any(target_os = "linux", target_os = "android", target_os = "fuchsia"))]
fn set_tcp_user_timeout(tcp: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    socket2::SockRef::from(tcp).set_tcp_user_timeout(Some(timeout))
}

#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "fuchsia")))]
fn set_tcp_user_timeout(_tcp: &TcpStream, _timeout: Duration) -> std::io::Result<()> {
    Ok(()) // not available here; keepalive PINGs still find dead connections
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tcp_user_timeout_is_set_on_the_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        set_tcp_user_timeout(&tcp, Duration::from_millis(1_500)).unwrap();
        let read_back = socket2::SockRef::from(&tcp).tcp_user_timeout().unwrap();
        assert_eq!(read_back, Some(Duration::from_millis(1_500)));
    }

    /// The SETTINGS the handshake announces with `config`, as (id, value) pairs off the wire.
    async fn announced_settings(config: &H2Config) -> Vec<(u16, u32)> {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = Endpoint::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
        let config = config.clone();
        let client = tokio::spawn(async move {
            // The SETTINGS leave when the connection is polled.
            if let Ok(handshaken) = handshake(&endpoint, &config, &SocketOptions::default(), None, None).await
            {
                let _ = handshaken.connection.await;
            }
        });
        let (mut server, _) = listener.accept().await.unwrap();
        let mut head = [0u8; 24 + 9];
        server.read_exact(&mut head).await.unwrap();
        assert_eq!(&head[..24], b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        assert_eq!(head[24 + 3], 4, "SETTINGS first");
        let length = usize::from(head[24]) << 16 | usize::from(head[25]) << 8 | usize::from(head[26]);
        let mut payload = vec![0u8; length];
        server.read_exact(&mut payload).await.unwrap();
        client.abort();
        payload
            .chunks(6)
            .map(|c| (u16::from_be_bytes([c[0], c[1]]), u32::from_be_bytes([c[2], c[3], c[4], c[5]])))
            .collect()
    }

    #[tokio::test]
    async fn the_header_table_size_is_announced_only_when_it_is_not_the_protocols() {
        const HEADER_TABLE_SIZE: u16 = 1;
        let default = announced_settings(&H2Config::default()).await;
        assert!(!default.iter().any(|(id, _)| *id == HEADER_TABLE_SIZE), "{default:?}");
        let none = H2Config { header_table_size: 0, ..H2Config::default() };
        let settings = announced_settings(&none).await;
        assert!(settings.contains(&(HEADER_TABLE_SIZE, 0)), "{settings:?}");
    }

    #[tokio::test]
    async fn tcp_keepalive_is_set_on_the_pools_sockets_as_configured() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = Endpoint::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
        let mut config = crate::config::Config::default();
        let socket = SocketOptions::from_config(&config);
        let Transport::Tcp(plain) = connect(&endpoint, &socket, None).await.unwrap() else { panic!("TCP") };
        assert!(!socket2::SockRef::from(&plain).keepalive().unwrap(), "off unless configured");

        config.tcp_keepalive = Some(Duration::from_secs(45));
        config.tcp_keepalive_interval = Some(Duration::from_secs(7));
        config.tcp_keepalive_retries = Some(4);
        let socket = SocketOptions::from_config(&config);
        let Transport::Tcp(tcp) = connect(&endpoint, &socket, None).await.unwrap() else { panic!("TCP") };
        let read_back = socket2::SockRef::from(&tcp);
        assert!(read_back.keepalive().unwrap());
        assert_eq!(read_back.tcp_keepalive_time().unwrap(), Duration::from_secs(45));
        assert_eq!(read_back.tcp_keepalive_interval().unwrap(), Duration::from_secs(7));
        assert_eq!(read_back.tcp_keepalive_retries().unwrap(), 4);
    }
}
