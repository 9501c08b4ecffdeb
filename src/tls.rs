//! TLS for `rediss://` and `valkeys://` instances (cargo feature `tls`): the
//! builder's settings, checked before anything connects, and the crypto
//! provider rustls needs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redis::{ClientTlsConfig, ConnectionAddr, ConnectionInfo, RedisResult, TlsCertificates};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

use crate::error::Error;

/// PEM text, given as bytes or as a file read when the locker is built.
#[derive(Clone)]
pub(crate) enum Pem {
    File(PathBuf),
    Bytes(Vec<u8>),
}

/// PEM and the builder method that gave it, for errors.
#[derive(Clone)]
struct Given {
    setting: &'static str,
    pem: Pem,
}

impl Given {
    fn read(&self) -> Result<Vec<u8>, Error> {
        match &self.pem {
            Pem::Bytes(bytes) => Ok(bytes.clone()),
            Pem::File(path) => std::fs::read(path).map_err(|err| self.invalid(path, err)),
        }
    }

    fn invalid(&self, path: &Path, err: impl std::fmt::Display) -> Error {
        Error::InvalidConfig {
            setting: self.setting,
            reason: format!("{}: {err}", path.display()),
        }
    }

    /// An error about the PEM's content, naming the file it came from.
    fn bad(&self, what: impl std::fmt::Display) -> Error {
        match &self.pem {
            Pem::File(path) => self.invalid(path, what),
            Pem::Bytes(_) => Error::InvalidConfig {
                setting: self.setting,
                reason: what.to_string(),
            },
        }
    }
}

/// What the builder was told about TLS.
#[derive(Clone, Default)]
pub(crate) struct TlsSettings {
    ca: Vec<Given>,
    client: Option<(Given, Given)>,
    insecure: bool,
}

impl TlsSettings {
    /// Trusts the CA certificates in `pem`, given by builder method `setting`.
    pub(crate) fn add_ca(&mut self, setting: &'static str, pem: Pem) {
        self.ca.push(Given { setting, pem });
    }

    /// Presents this client certificate and key, given by builder method
    /// `setting`.
    pub(crate) fn set_client(&mut self, setting: &'static str, cert: Pem, key: Pem) {
        self.client = Some((Given { setting, pem: cert }, Given { setting, pem: key }));
    }

    /// Verifies no certificate at all.
    pub(crate) fn set_insecure(&mut self, insecure: bool) {
        self.insecure = insecure;
    }

    /// A TLS setting that was made, if any, by its builder method's name.
    pub(crate) fn any_setting(&self) -> Option<&'static str> {
        let client = self.client.as_ref().map(|(cert, _)| cert);
        match self.ca.first().or(client) {
            Some(given) => Some(given.setting),
            None => self.insecure.then_some("danger_accept_invalid_certs"),
        }
    }

    /// Reads and checks the certificates and key: PEM that parses, CAs that
    /// are trust anchors, a key that belongs to its certificate.
    pub(crate) fn load(&self) -> Result<Tls, Error> {
        let root_cert = if self.ca.is_empty() {
            None
        } else {
            let mut bundle = Vec::new();
            for given in &self.ca {
                let pem = given.read()?;
                check_ca(given, &pem)?;
                bundle.extend_from_slice(&pem);
                bundle.push(b'\n');
            }
            Some(bundle)
        };
        let client_tls = match &self.client {
            None => None,
            Some((cert, key)) => {
                let (cert_pem, key_pem) = (cert.read()?, key.read()?);
                check_client_cert(cert, &cert_pem, key, &key_pem)?;
                Some(ClientTlsConfig {
                    client_cert: cert_pem,
                    client_key: key_pem,
                })
            }
        };
        let certificates =
            (root_cert.is_some() || client_tls.is_some()).then_some(TlsCertificates {
                client_tls,
                root_cert,
            });
        Ok(Tls {
            certificates,
            insecure: self.insecure,
        })
    }
}

/// The checked TLS settings, for each TLS instance's client.
pub(crate) struct Tls {
    certificates: Option<TlsCertificates>,
    insecure: bool,
}

impl Tls {
    pub(crate) fn insecure(&self) -> bool {
        self.insecure
    }

    pub(crate) fn has_client_cert(&self) -> bool {
        self.certificates
            .as_ref()
            .is_some_and(|certificates| certificates.client_tls.is_some())
    }

    /// A client for `info` (a TLS address) with these settings.
    pub(crate) fn client(&self, info: ConnectionInfo) -> RedisResult<redis::Client> {
        let client = match &self.certificates {
            Some(certificates) => redis::Client::build_with_tls(info, certificates.clone())?,
            None => redis::Client::open(info)?,
        };
        if !self.insecure {
            return Ok(client);
        }
        let info = client.get_connection_info().clone();
        let addr = match info.addr().clone() {
            ConnectionAddr::TcpTls {
                host,
                port,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host,
                port,
                insecure: true,
                tls_params,
            },
            other => other,
        };
        redis::Client::open(info.set_addr(addr))
    }
}

/// Makes ring the process's rustls provider unless the program chose one.
///
/// redis-rs builds its TLS configuration from the process default, and its
/// rustls features compile no provider, so without this the first `rediss://`
/// connection panics. A provider the program installed before (aws-lc-rs, a
/// FIPS build) stays; with two providers compiled and none installed, rustls
/// could not choose, and ring is installed.
pub(crate) fn install_provider() {
    if CryptoProvider::get_default().is_none() {
        // Fails only if another thread installed one meanwhile: that one stands.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

fn check_ca(given: &Given, pem: &[u8]) -> Result<(), Error> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|err| given.bad(format!("not PEM certificates: {err}")))?;
        roots
            .add(cert)
            .map_err(|err| given.bad(format!("not a CA certificate: {err}")))?;
    }
    if roots.is_empty() {
        return Err(given.bad("no PEM certificate (-----BEGIN CERTIFICATE-----) in it"));
    }
    Ok(())
}

fn check_client_cert(
    cert: &Given,
    cert_pem: &[u8],
    key: &Given,
    key_pem: &[u8],
) -> Result<(), Error> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| cert.bad(format!("not PEM certificates: {err}")))?;
    if chain.is_empty() {
        return Err(cert.bad("no PEM certificate (-----BEGIN CERTIFICATE-----) in it"));
    }
    let private_key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|err| key.bad(format!("no PEM private key in it: {err}")))?;
    // The configuration rustls will build at connect time, built now so that a
    // key of an unsupported type, or one that is not the certificate's, is
    // reported by `build` rather than by every connection.
    let provider = CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|config| {
            config
                .with_root_certificates(RootCertStore::empty())
                .with_client_auth_cert(chain, private_key)
        })
        .map(drop)
        .map_err(|err| {
            cert.bad(match err {
                rustls::Error::InconsistentKeys(_) => {
                    "the private key does not belong to the certificate".to_string()
                }
                other => format!("the certificate and key are not usable: {other}"),
            })
        })
}
