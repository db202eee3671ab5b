//! A connector of the user's: any `tower::Service<http::Uri>` that returns a byte stream, as
//! tonic's `Endpoint::connect_with_connector` takes. The pool runs HTTP/2 over what it
//! returns: a proxy tunnel, an in-memory pipe, a socket with options of its own, a TLS stream
//! made by the connector; or, when the pool has TLS settings, TLS over it to `https://`
//! endpoints first.

use std::fmt;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tower_service::Service;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A byte stream from a [`Connector`].
pub(crate) trait ConnectedIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> ConnectedIo for T {}

type Connecting = Pin<Box<dyn Future<Output = Result<Box<dyn ConnectedIo>, BoxError>> + Send>>;

/// Opens the byte streams the pool's connections run over, instead of the pool's own TCP
/// (or Unix socket) connect: see `Builder::connector`.
///
/// It is called with the endpoint's URI (`http://host:port`; for an endpoint found by DNS,
/// the address it resolved to in place of the name), once per connection. Its stream is used
/// as it is (`TCP_NODELAY` and `TCP_USER_TIMEOUT` are the connector's to set), but when the
/// pool has TLS settings (`tls`), the pool runs TLS over it to `https://` endpoints, as tonic
/// runs `tls_config` over `connect_with_connector`'s streams; without them, TLS is the
/// connector's too. `connect_timeout` still bounds each connect. (An example is at the
/// facade's `Builder::connector`.)
#[derive(Clone)]
pub struct Connector {
    connect: Arc<dyn Fn(http::Uri) -> Connecting + Send + Sync>,
}

impl Connector {
    /// Wraps `service`, which is cloned for each connect (as tower services are) and polled
    /// ready before it is called.
    pub fn new<S>(service: S) -> Connector
    where
        S: Service<http::Uri> + Clone + Send + Sync + 'static,
        S::Response: AsyncRead + AsyncWrite + Send + Unpin + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        let connect = move |uri: http::Uri| -> Connecting {
            let mut service = service.clone();
            Box::pin(async move {
                poll_fn(|cx| service.poll_ready(cx)).await.map_err(Into::into)?;
                let io = service.call(uri).await.map_err(Into::into)?;
                Ok(Box::new(io) as Box<dyn ConnectedIo>)
            })
        };
        Connector { connect: Arc::new(connect) }
    }

    pub(crate) async fn connect(&self, uri: http::Uri) -> Result<Box<dyn ConnectedIo>, BoxError> {
        (self.connect)(uri).await
    }
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Connector(..)")
    }
}
