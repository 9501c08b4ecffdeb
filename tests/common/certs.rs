//! A CA and the certificates the TLS tests run with, made fresh by each test
//! (rcgen) and written to a temporary directory.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
};
use tempfile::TempDir;

/// PEM files: a CA, a server certificate it signed for `127.0.0.1` and
/// `localhost`, a client certificate it signed, and a client certificate of
/// another CA (which the servers refuse).
pub struct Certs {
    dir: TempDir,
}

impl Certs {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("quorumlock-certs-")
            .tempdir()
            .expect("temporary directory");
        let certs = Self { dir };
        let ca = authority("quorumlock test CA");
        certs.write("ca.crt", &ca.pem);
        let server = leaf(&ca, "redis-server", &["127.0.0.1", "localhost"]);
        certs.write("server.crt", &server.0);
        certs.write("server.key", &server.1);
        let client = leaf(&ca, "quorumlock client", &["client.quorumlock.test"]);
        certs.write("client.crt", &client.0);
        certs.write("client.key", &client.1);
        let other = authority("another CA");
        certs.write("other-ca.crt", &other.pem);
        let stranger = leaf(&other, "stranger", &["stranger.quorumlock.test"]);
        certs.write("stranger.crt", &stranger.0);
        certs.write("stranger.key", &stranger.1);
        certs
    }

    fn write(&self, name: &str, pem: &str) {
        std::fs::write(self.dir.path().join(name), pem).expect("write PEM");
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn ca(&self) -> PathBuf {
        self.path("ca.crt")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A server with these certificates, on a TLS port beside its plain one.
    /// `auth_clients`: Redis's `tls-auth-clients` (client certificates required).
    pub fn server(&self, auth_clients: bool) -> quorumlock::testing::RedisServerBuilder {
        quorumlock::testing::RedisServer::builder()
            .tls(self.path("server.crt"), self.path("server.key"), self.ca())
            .arg("--tls-auth-clients")
            .arg(if auth_clients { "yes" } else { "no" })
    }
}

struct Authority {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn named(common_name: &str, names: &[&str]) -> CertificateParams {
    let mut params = CertificateParams::new(
        names
            .iter()
            .map(|name| name.to_string())
            .collect::<Vec<_>>(),
    )
    .expect("certificate parameters");
    // Distinct subjects: a leaf named like its CA would look self-signed to
    // OpenSSL, which then refuses it as an unknown CA.
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params
}

fn authority(common_name: &str) -> Authority {
    let key = KeyPair::generate().expect("CA key");
    let mut params = named(common_name, &[]);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let pem = params.self_signed(&key).expect("CA certificate").pem();
    Authority {
        pem,
        issuer: Issuer::new(params, key),
    }
}

/// A certificate and its key, signed by `ca`.
fn leaf(ca: &Authority, common_name: &str, names: &[&str]) -> (String, String) {
    let key = KeyPair::generate().expect("key");
    let cert = named(common_name, names)
        .signed_by(&key, &ca.issuer)
        .expect("certificate");
    (cert.pem(), key.serialize_pem())
}
