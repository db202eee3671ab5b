//! TLS for `https://` endpoints, with rustls (ring): ALPN `h2` required, SNI from the
//! endpoint's host (or an override), the system's roots or given CAs, an optional client
//! certificate. Certificates are verified unless `insecure_skip_verify` says otherwise, and a
//! pool built that way says so in a warning.

use std::sync::Arc;

use tokio_rustls::rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use tokio_rustls::rustls::crypto::{self, CryptoProvider};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_rustls::TlsConnector;

use crate::endpoint::Endpoint;
use crate::error::Error;

/// How the pool's `https://` connections are secured.
///
/// The default verifies servers against the operating system's root certificates and sends
/// no client certificate. [`TlsConfig::rustls`] takes a whole `rustls::ClientConfig` of your
/// own instead (your verifier, key logging, session cache, crypto provider).
///
/// With the `serde` feature it reads from a file section that names PEM files (`ca_file`,
/// `cert_file` with `key_file`, `server_name`, `insecure_skip_verify`); the files are read
/// as the section is, and a missing one is named in the error.
///
/// ```no_run
/// # fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let mut tls = grpc_pool_core::TlsConfig::default();
/// tls.ca_pem = Some(std::fs::read("ca.pem")?);
/// tls.client_identity = Some(grpc_pool_core::ClientIdentity::new(
///     std::fs::read("client.pem")?,
///     std::fs::read("client.key")?,
/// ));
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
#[cfg_attr(feature = "serde", derive(serde::Deserialize), serde(try_from = "TlsFiles"))]
#[non_exhaustive]
pub struct TlsConfig {
    /// PEM certificates of the CAs to trust, instead of the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// A client certificate and key, for servers that require one (mTLS).
    pub client_identity: Option<ClientIdentity>,
    /// The name to verify the server's certificate against and send as SNI, instead of each
    /// endpoint's host: for endpoints given as addresses.
    pub server_name: Option<String>,
    /// Accept any certificate. For tests against self-signed servers only: it makes the
    /// connection open to anyone in the path. Logged as a warning when the pool is built.
    pub insecure_skip_verify: bool,
    /// Take a server that agrees to no protocol in the handshake (no ALPN) to speak HTTP/2,
    /// as tonic's `ClientTlsConfig::assume_http2`: for TLS terminators that do not do ALPN.
    /// A server that picks another protocol (`http/1.1`) is still refused.
    pub assume_http2: bool,
    /// A whole rustls configuration of the user's, which the fields above do not touch.
    pub(crate) rustls: Option<Arc<ClientConfig>>,
}

impl TlsConfig {
    /// Your own rustls client configuration, used as it is but for ALPN, which the pool sets
    /// to `h2` (gRPC is HTTP/2 only). `server_name` still overrides each endpoint's host;
    /// `ca_pem`, `client_identity` and `insecure_skip_verify` are yours to set in `config`.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use grpc_pool_core::rustls;
    /// let roots = rustls::RootCertStore::empty(); // yours: webpki-roots, a private CA...
    /// let provider = Arc::new(rustls::crypto::ring::default_provider());
    /// let config = rustls::ClientConfig::builder_with_provider(provider)
    ///     .with_safe_default_protocol_versions()
    ///     .unwrap()
    ///     .with_root_certificates(roots)
    ///     .with_no_client_auth();
    /// let tls = grpc_pool_core::TlsConfig::rustls(Arc::new(config));
    /// ```
    pub fn rustls(config: Arc<ClientConfig>) -> TlsConfig {
        TlsConfig { rustls: Some(config), ..TlsConfig::default() }
    }
}

/// A client certificate chain and its private key, in PEM.
#[derive(Clone)]
#[non_exhaustive]
pub struct ClientIdentity {
    /// The certificate, then any intermediates.
    pub cert_chain_pem: Vec<u8>,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: Vec<u8>,
}

impl ClientIdentity {
    /// A certificate chain and its key, both PEM.
    pub fn new(cert_chain_pem: Vec<u8>, key_pem: Vec<u8>) -> ClientIdentity {
        ClientIdentity { cert_chain_pem, key_pem }
    }
}

/// The file form of [`TlsConfig`]: paths, read when the section is.
#[cfg(feature = "serde")]
#[derive(serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
#[derive(Default)]
struct TlsFiles {
    ca_file: Option<std::path::PathBuf>,
    cert_file: Option<std::path::PathBuf>,
    key_file: Option<std::path::PathBuf>,
    server_name: Option<String>,
    insecure_skip_verify: bool,
    assume_http2: bool,
}

#[cfg(feature = "serde")]
impl TryFrom<TlsFiles> for TlsConfig {
    type Error = String;

    fn try_from(files: TlsFiles) -> Result<TlsConfig, String> {
        let read = |field: &str, path: &std::path::PathBuf| {
            std::fs::read(path).map_err(|e| format!("`tls.{field}`: cannot read {} ({e})", path.display()))
        };
        let ca_pem = files.ca_file.as_ref().map(|p| read("ca_file", p)).transpose()?;
        let client_identity = match (&files.cert_file, &files.key_file) {
            (Some(cert), Some(key)) => {
                Some(ClientIdentity::new(read("cert_file", cert)?, read("key_file", key)?))
            }
            (None, None) => None,
            _ => {
                return Err("`tls.cert_file` and `tls.key_file`: give both files, or neither".to_owned());
            }
        };
        Ok(TlsConfig {
            ca_pem,
            client_identity,
            server_name: files.server_name,
            insecure_skip_verify: files.insecure_skip_verify,
            assume_http2: files.assume_http2,
            rustls: None,
        })
    }
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("ca_pem", &self.ca_pem.as_ref().map(|p| format!("{} bytes", p.len())))
            .field("client_identity", &self.client_identity.as_ref().map(|_| "set"))
            .field("server_name", &self.server_name)
            .field("insecure_skip_verify", &self.insecure_skip_verify)
            .field("assume_http2", &self.assume_http2)
            .field("rustls", &self.rustls.as_ref().map(|_| "set"))
            .finish()
    }
}

/// A built TLS client: one rustls configuration shared by every connection.
pub(crate) struct Tls {
    connector: TlsConnector,
    server_name: Option<ServerName<'static>>,
    assume_http2: bool,
}

impl Tls {
    /// Checks and loads `config`; errors name the field.
    pub(crate) fn new(config: &TlsConfig, pool: &str) -> Result<Tls, Error> {
        let server_name = match &config.server_name {
            Some(name) => Some(
                ServerName::try_from(name.clone())
                    .map_err(|_| Error::config("tls.server_name", name, "a DNS name or an IP address"))?,
            ),
            None => None,
        };
        if let Some(theirs) = &config.rustls {
            let mut client = ClientConfig::clone(theirs);
            client.alpn_protocols = vec![b"h2".to_vec()];
            let connector = TlsConnector::from(Arc::new(client));
            return Ok(Tls { connector, server_name, assume_http2: config.assume_http2 });
        }
        let provider = Arc::new(crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::config("tls", &e.to_string(), "TLS 1.2 or 1.3 with the ring provider"))?;
        let builder = if config.insecure_skip_verify {
            tracing::warn!(pool, "TLS certificate verification is OFF (insecure_skip_verify): any server, or anyone in the path, is trusted");
            builder.dangerous().with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
        } else {
            builder.with_root_certificates(roots(config)?)
        };
        let mut client = match &config.client_identity {
            Some(identity) => {
                let chain: Vec<CertificateDer<'static>> =
                    CertificateDer::pem_slice_iter(&identity.cert_chain_pem)
                        .collect::<Result<_, _>>()
                        .map_err(|e| {
                            Error::config(
                                "tls.client_identity.cert_chain_pem",
                                &e.to_string(),
                                "PEM certificates",
                            )
                        })?;
                if chain.is_empty() {
                    return Err(Error::config(
                        "tls.client_identity.cert_chain_pem",
                        "no certificate in it",
                        "PEM with one or more CERTIFICATE blocks",
                    ));
                }
                let key = PrivateKeyDer::from_pem_slice(&identity.key_pem).map_err(|e| {
                    Error::config(
                        "tls.client_identity.key_pem",
                        &e.to_string(),
                        "a PEM private key (PKCS#8, PKCS#1 or SEC1)",
                    )
                })?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    Error::config(
                        "tls.client_identity",
                        &e.to_string(),
                        "a certificate and the private key that matches it",
                    )
                })?
            }
            None => builder.with_no_client_auth(),
        };
        // gRPC is HTTP/2 only: offer nothing else, and insist on it after the handshake.
        client.alpn_protocols = vec![b"h2".to_vec()];
        let connector = TlsConnector::from(Arc::new(client));
        Ok(Tls { connector, server_name, assume_http2: config.assume_http2 })
    }

    /// The TLS handshake over `tcp`; fails unless the server agrees to HTTP/2 (or agrees to
    /// nothing, with `assume_http2`).
    pub(crate) async fn connect<IO>(
        &self,
        endpoint: &Endpoint,
        tcp: IO,
    ) -> Result<tokio_rustls::client::TlsStream<IO>, Error>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let label = endpoint.to_string();
        let name = match &self.server_name {
            Some(name) => name.clone(),
            None => ServerName::try_from(endpoint.host().to_owned())
                .map_err(|_| Error::connect(&label, "the host is not a valid TLS server name", None))?,
        };
        let stream = self
            .connector
            .connect(name, tcp)
            .await
            .map_err(|e| Error::connect(&label, "TLS handshake", Some(Box::new(e))))?;
        match stream.get_ref().1.alpn_protocol() {
            Some(b"h2") => {}
            None if self.assume_http2 => {}
            None => {
                return Err(Error::connect(
                    &label,
                    "the server did not agree to HTTP/2 in the TLS handshake (ALPN h2); it may speak only \
                     HTTP/1.1 (`assume_http2` takes a server without ALPN to speak HTTP/2)",
                    None,
                ))
            }
            Some(other) => {
                return Err(Error::connect(
                    &label,
                    &format!(
                        "the server chose `{}` instead of HTTP/2 in the TLS handshake (ALPN h2)",
                        String::from_utf8_lossy(other)
                    ),
                    None,
                ))
            }
        }
        Ok(stream)
    }
}

fn roots(config: &TlsConfig) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    match &config.ca_pem {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert =
                    cert.map_err(|e| Error::config("tls.ca_pem", &e.to_string(), "PEM certificates"))?;
                roots.add(cert).map_err(|e| {
                    Error::config("tls.ca_pem", &e.to_string(), "CA certificates rustls can use")
                })?;
            }
            if roots.is_empty() {
                return Err(Error::config(
                    "tls.ca_pem",
                    "no certificate in it",
                    "PEM with one or more CERTIFICATE blocks",
                ));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(Error::config(
                    "tls",
                    "no root certificate found in the system's store",
                    "a CA in tls.ca_pem, or a system certificate store",
                ));
            }
        }
    }
    Ok(roots)
}

/// `insecure_skip_verify`: takes any certificate, but still checks that the handshake was
/// signed by the key in it.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, tokio_rustls::rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, tokio_rustls::rustls::Error> {
        crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, tokio_rustls::rustls::Error> {
        crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
