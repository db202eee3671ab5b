//! TLS against tonic TLS servers, with certificates made here by `rcgen`: a good chain, and
//! each way a chain can be wrong, which must fail with an error that says which.

use std::time::Duration;

use bytes::Bytes;
use grpc_pool::{ClientIdentity, Pool, TlsConfig};
use grpc_pool_testkit::echo::echo_client::EchoClient;
use grpc_pool_testkit::echo::EchoRequest;
use grpc_pool_testkit::{Ca, ServerOptions, ServerTls, TestServer};
use rustls_pki_types::pem::PemObject;

async fn tls_server(tls: ServerTls) -> TestServer {
    TestServer::start_with(ServerOptions { tls: Some(tls), ..Default::default() }).await
}

fn trusting(ca: &Ca) -> TlsConfig {
    {
        let mut v = TlsConfig::default();
        v.ca_pem = Some(ca.pem().into_bytes());
        v
    }
}

async fn echo(pool: &Pool) {
    let mut client = EchoClient::new(pool.clone());
    let reply = client
        .unary_echo(EchoRequest { message: Bytes::from_static(b"over tls"), repeat: 0, delay_ms: 0 })
        .await
        .unwrap();
    assert_eq!(reply.into_inner().message, Bytes::from_static(b"over tls"));
}

/// The build's error, which carries each endpoint's connect error.
async fn build_error(tls: TlsConfig, uri: String) -> String {
    let builder = Pool::builder().tls(tls).connect_timeout(Duration::from_secs(5));
    builder.build([uri]).await.unwrap_err().to_string()
}

#[tokio::test]
async fn a_good_chain_carries_calls() {
    let ca = Ca::new("good CA");
    let server = tls_server(ca.server(&["127.0.0.1"], false, None)).await;
    assert!(server.uri().starts_with("https://"));
    let pool = Pool::builder().tls(trusting(&ca)).build([server.uri()]).await.unwrap();
    echo(&pool).await;
    assert_eq!(server.calls(), 1);
}

#[tokio::test]
async fn a_rustls_config_of_ones_own_carries_calls_with_alpn_h2_added() {
    use grpc_pool::rustls;
    let ca = Ca::new("their CA");
    let server = tls_server(ca.server(&["127.0.0.1"], false, None)).await;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca.pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    // No ALPN set: the pool offers h2 itself, and the server insists on it.
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    assert!(config.alpn_protocols.is_empty());
    let tls = TlsConfig::rustls(std::sync::Arc::new(config.clone()));
    let pool = Pool::builder().tls(tls).build([server.uri()]).await.unwrap();
    echo(&pool).await;
    assert_eq!(server.calls(), 1);
    // The same configuration without the CA: refused, so it was the one in use.
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let empty = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let err = build_error(TlsConfig::rustls(std::sync::Arc::new(empty)), server.uri()).await;
    assert!(err.contains("UnknownIssuer"), "{err}");
}

#[tokio::test]
async fn a_certificate_from_an_unknown_ca_is_refused() {
    let (ca, other) = (Ca::new("server's CA"), Ca::new("some other CA"));
    let server = tls_server(ca.server(&["127.0.0.1"], false, None)).await;
    let err = build_error(trusting(&other), server.uri()).await;
    assert!(err.contains("TLS handshake") && err.contains("UnknownIssuer"), "{err}");
    assert_eq!(server.calls(), 0);
}

#[tokio::test]
async fn a_certificate_for_another_name_is_refused() {
    let ca = Ca::new("CA");
    let server = tls_server(ca.server(&["orders.example"], false, None)).await;
    let err = build_error(trusting(&ca), server.uri()).await;
    assert!(err.contains("TLS handshake") && err.contains("certificate not valid for name"), "{err}");
    // The same certificate is good when the name to check is given.
    let tls = {
        let mut v = trusting(&ca);
        v.server_name = Some("orders.example".to_owned());
        v
    };
    let pool = Pool::builder().tls(tls).build([server.uri()]).await.unwrap();
    echo(&pool).await;
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let ca = Ca::new("CA");
    let server = tls_server(ca.server(&["127.0.0.1"], true, None)).await;
    let err = build_error(trusting(&ca), server.uri()).await;
    assert!(err.contains("TLS handshake") && err.contains("certificate expired"), "{err}");
}

#[tokio::test]
async fn a_server_that_requires_a_client_certificate_gets_one_or_refuses() {
    let (ca, clients) = (Ca::new("server CA"), Ca::new("client CA"));
    let server = tls_server(ca.server(&["127.0.0.1"], false, Some(&clients))).await;
    // Without one: the server's alert is in the error.
    let err = build_error(trusting(&ca), server.uri()).await;
    assert!(err.contains("CertificateRequired"), "{err}");
    assert_eq!(server.calls(), 0);
    // With one from the CA it trusts: calls go through.
    let (cert_pem, key_pem) = clients.issue(&["client"], false);
    let identity = { ClientIdentity::new(cert_pem.into_bytes(), key_pem.into_bytes()) };
    let tls = {
        let mut v = trusting(&ca);
        v.client_identity = Some(identity);
        v
    };
    let pool = Pool::builder().tls(tls).build([server.uri()]).await.unwrap();
    echo(&pool).await;
    assert_eq!(server.calls(), 1);
}

#[tokio::test]
async fn skipping_verification_must_be_asked_for_and_then_trusts_any_certificate() {
    let (ca, other) = (Ca::new("CA"), Ca::new("other CA"));
    let server = tls_server(ca.server(&["127.0.0.1"], false, None)).await;
    let tls = {
        let mut v = trusting(&other);
        v.insecure_skip_verify = true;
        v
    };
    let pool = Pool::builder().tls(tls).build([server.uri()]).await.unwrap();
    echo(&pool).await;
}

#[tokio::test]
async fn bad_certificate_files_fail_the_build_naming_the_field() {
    let tls = {
        let mut v = TlsConfig::default();
        v.ca_pem = Some(b"not a certificate".to_vec());
        v
    };
    let err = Pool::builder().tls(tls).build_lazy(["https://127.0.0.1:1"]).unwrap_err().to_string();
    assert!(err.contains("`tls.ca_pem`"), "{err}");
    let ca = Ca::new("CA");
    let (cert_pem, _) = ca.issue(&["client"], false);
    let identity = { ClientIdentity::new(cert_pem.into_bytes(), b"no key".to_vec()) };
    let tls = {
        let mut v = trusting(&ca);
        v.client_identity = Some(identity);
        v
    };
    let err = Pool::builder().tls(tls).build_lazy(["https://127.0.0.1:1"]).unwrap_err().to_string();
    assert!(err.contains("`tls.client_identity.key_pem`"), "{err}");
}

#[tokio::test]
async fn a_plaintext_endpoint_named_https_fails_the_handshake_clearly() {
    let server = TestServer::start().await;
    let uri = server.uri().replace("http://", "https://");
    let err = build_error(TlsConfig::default(), uri).await;
    assert!(err.contains("TLS handshake"), "{err}");
}

/// A TLS server at the address returned that agrees to no protocol (no ALPN), as HTTP/1.1-only
/// servers and some TLS terminators do; behind it, an HTTP/2 echo when `h2`, else a sink.
async fn tls_server_without_alpn(ca: &Ca, h2: bool) -> std::net::SocketAddr {
    let (cert_pem, key_pem) = ca.issue(&["127.0.0.1"], false);
    let certs: Vec<_> =
        rustls_pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes()).map(Result::unwrap).collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                if h2 {
                    grpc_pool_testkit::serve_echo(tls).await;
                } else {
                    let mut sink = Vec::new();
                    let _ = tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut sink).await;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_tls_server_that_does_not_agree_to_http2_is_refused_clearly() {
    // A TLS server without ALPN, as an HTTP/1.1-only server is: the handshake succeeds, and
    // the pool must not then speak HTTP/2 at it.
    let ca = Ca::new("CA");
    let addr = tls_server_without_alpn(&ca, false).await;
    let err = build_error(trusting(&ca), format!("https://{addr}")).await;
    assert!(err.contains("did not agree to HTTP/2") && err.contains("ALPN h2"), "{err}");
    assert!(err.contains("assume_http2"), "the error says what would take it: {err}");
}

#[tokio::test]
async fn assume_http2_takes_a_tls_server_without_alpn_to_speak_it_as_tonic_does() {
    let ca = Ca::new("CA");
    let addr = tls_server_without_alpn(&ca, true).await;
    let mut tls = trusting(&ca);
    tls.assume_http2 = true;
    let pool =
        Pool::builder().tls(tls).build([format!("https://{addr}")]).await.expect("connects without ALPN");
    echo(&pool).await;
}

/// Resolves every name to one address.
struct ResolvesTo(std::net::SocketAddr);

impl grpc_pool::dns::Resolve for ResolvesTo {
    fn resolve(&self, _host: &str, _port: u16) -> grpc_pool::dns::Resolving {
        let address = self.0;
        Box::pin(async move { Ok(vec![address]) })
    }
}

#[tokio::test]
async fn endpoints_from_dns_keep_tls_and_check_the_certificate_against_the_host_name() {
    // The certificate names the service, not the address DNS gives for it.
    let ca = Ca::new("CA");
    let server = tls_server(ca.server(&["orders.example"], false, None)).await;
    let pool = Pool::builder().tls(trusting(&ca)).build_lazy(Vec::<String>::new()).unwrap();
    let dns = grpc_pool::dns::DnsDiscover::new(
        "https://orders.example:443",
        Duration::from_secs(60),
        ResolvesTo(server.addr()),
    )
    .unwrap();
    pool.discover(dns);
    grpc_pool_testkit::wait_until(Duration::from_secs(10), "the resolved endpoint is in the pool", || {
        !pool.state().endpoints.is_empty()
    })
    .await;
    let endpoint = pool.state().endpoints[0].endpoint.clone();
    assert_eq!(endpoint.to_string(), format!("https://orders.example:443 ({})", server.addr()));
    assert_eq!(endpoint.authority().as_str(), "orders.example:443");
    echo(&pool).await;
    assert_eq!(server.calls(), 1);
}

#[tokio::test]
async fn tls_settings_with_a_connector_run_tls_over_its_stream_as_tonic_does() {
    let ca = Ca::new("CA");
    let server = tls_server(ca.server(&["orders.test"], false, None)).await;
    let target = server.addr();
    // A tunnel of sorts: whatever the endpoint names, the connector dials the server.
    let tunnel = tower::service_fn(move |_uri: http::Uri| tokio::net::TcpStream::connect(target));
    let pool = Pool::builder()
        .connector(tunnel)
        .tls(trusting(&ca))
        .build(["https://orders.test:443"])
        .await
        .expect("TLS over the connector's stream, checked against the endpoint's host");
    echo(&pool).await;
    assert_eq!(server.calls(), 1);

    // Without TLS settings the stream is used as it is: HTTP/2 in the clear at a TLS server.
    let err = Pool::builder()
        .name("connector-without-tls")
        .connector(tunnel)
        .connect_timeout(Duration::from_secs(5))
        .build(["https://orders.test:443"])
        .await
        .unwrap_err();
    assert!(!err.to_string().contains("TLS handshake"), "no TLS was tried: {err}");
}
