//! A certificate authority made for one test (rcgen): leaf certificates for the names a test
//! server answers to, expired ones, and the CA's PEM for clients to trust.

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

use crate::ServerTls;

/// A certificate authority for one test.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().expect("a key")).expect("a CA"),
        }
    }

    /// The CA's certificate, PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf certificate for `names`, valid now unless `expired`; (certificate, key) PEM.
    pub fn issue(&self, names: &[&str], expired: bool) -> (String, String) {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("leaf names");
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().expect("a key");
        let cert = params.signed_by(&key, &self.issuer).expect("a signed leaf");
        (cert.pem(), key.serialize_pem())
    }

    /// A server's TLS for `names`, requiring a client certificate from `client_ca` if given.
    pub fn server(&self, names: &[&str], expired: bool, client_ca: Option<&Ca>) -> ServerTls {
        let (cert_pem, key_pem) = self.issue(names, expired);
        ServerTls { cert_pem, key_pem, client_ca_pem: client_ca.map(Ca::pem) }
    }
}
