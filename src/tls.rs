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

use crate::builder::Builder;
use crate::error::Error;

/// PEM text, given as bytes or as a file read when the locker is built.
#[derive(Clone)]
enum Pem {
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

/// TLS settings (cargo feature `tls`). They apply to every `rediss://` and
/// `valkeys://` instance; without any, TLS instances trust the platform's root
/// certificates and present no client certificate.
///
/// rustls needs a crypto provider: the first TLS instance built installs
/// *ring* as the process default, unless the program installed one before
/// (to use aws-lc-rs, install it before building the locker).
impl Builder {
    /// Trusts the CA certificates in this PEM file (one or more `-----BEGIN
    /// CERTIFICATE-----` blocks) instead of the platform's roots: for servers
    /// with self-signed certificates or a private CA. Calls add up. The file is
    /// read, and checked, by [`build`](Self::build).
    ///
    /// # Errors
    ///
    /// [`build`](Self::build) fails with [`Error::InvalidConfig`] (setting
    /// `tls_ca_file`) when the file cannot be read or holds no CA certificate,
    /// and when no instance uses TLS.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn f() -> quorumlock::Result<()> {
    /// use quorumlock::QuorumLocker;
    ///
    /// let locker = QuorumLocker::builder()
    ///     .urls(["rediss://redis-a:6380", "rediss://redis-b:6380", "rediss://redis-c:6380"])
    ///     .tls_ca_file("/etc/redis/tls/ca.crt")
    ///     // With `tls-auth-clients yes` on the servers:
    ///     .tls_client_cert_files("/etc/app/tls/client.crt", "/etc/app/tls/client.key")
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn tls_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls.ca.push(Given {
            setting: "tls_ca_file",
            pem: Pem::File(path.into()),
        });
        self
    }

    /// Trusts these PEM CA certificates instead of the platform's roots; as
    /// [`tls_ca_file`](Self::tls_ca_file), with the PEM in memory.
    ///
    /// # Errors
    ///
    /// [`build`](Self::build) fails with [`Error::InvalidConfig`] (setting
    /// `tls_ca_pem`) when the PEM holds no CA certificate.
    ///
    /// # Example
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// use quorumlock::{Error, QuorumLocker};
    ///
    /// let err = QuorumLocker::builder()
    ///     .url("rediss://127.0.0.1:6380")
    ///     .tls_ca_pem("not a certificate")
    ///     .build()
    ///     .await
    ///     .unwrap_err();
    /// assert!(matches!(err, Error::InvalidConfig { setting: "tls_ca_pem", .. }), "{err}");
    /// # });
    /// ```
    pub fn tls_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls.ca.push(Given {
            setting: "tls_ca_pem",
            pem: Pem::Bytes(pem.into()),
        });
        self
    }

    /// Presents this client certificate (PEM, the chain's leaf first) and
    /// private key (PEM: PKCS#8, PKCS#1 or SEC1) to servers that ask for one:
    /// mutual TLS, for servers run with `tls-auth-clients yes` (Redis's default
    /// when TLS is on) or `optional`. The files are read, and checked, by
    /// [`build`](Self::build).
    ///
    /// # Errors
    ///
    /// [`build`](Self::build) fails with [`Error::InvalidConfig`] (setting
    /// `tls_client_cert_files`) when a file cannot be read, holds no
    /// certificate or key, or the key is not the certificate's.
    ///
    /// # Example
    ///
    /// See [`tls_ca_file`](Self::tls_ca_file).
    pub fn tls_client_cert_files(
        mut self,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Self {
        let setting = "tls_client_cert_files";
        self.tls.client = Some((
            Given {
                setting,
                pem: Pem::File(cert.into()),
            },
            Given {
                setting,
                pem: Pem::File(key.into()),
            },
        ));
        self
    }

    /// Presents this client certificate and private key, both PEM in memory;
    /// as [`tls_client_cert_files`](Self::tls_client_cert_files).
    ///
    /// # Errors
    ///
    /// [`build`](Self::build) fails with [`Error::InvalidConfig`] (setting
    /// `tls_client_cert`) when the PEM holds no certificate or key, or the key
    /// is not the certificate's.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn f() -> quorumlock::Result<()> {
    /// # let (cert_pem, key_pem) = (String::new(), String::new());
    /// use quorumlock::QuorumLocker;
    ///
    /// // Say, from a secret store rather than from files.
    /// let locker = QuorumLocker::builder()
    ///     .url("rediss://redis-a:6380")
    ///     .tls_client_cert(cert_pem, key_pem)
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn tls_client_cert(mut self, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        let setting = "tls_client_cert";
        self.tls.client = Some((
            Given {
                setting,
                pem: Pem::Bytes(cert.into()),
            },
            Given {
                setting,
                pem: Pem::Bytes(key.into()),
            },
        ));
        self
    }

    /// **Turns certificate verification off** for every TLS instance: any
    /// certificate is accepted, for any host name, so anyone on the path can
    /// read and change the traffic, locks and passwords included. For a first
    /// test against a server with a self-signed certificate; give its CA with
    /// [`tls_ca_file`](Self::tls_ca_file) instead for anything that matters.
    /// Default: off.
    ///
    /// The redis-rs `#insecure` URL fragment does the same for one URL; the
    /// builder refuses it unless this is on, so that verification is never
    /// turned off by a URL alone.
    ///
    /// # Errors
    ///
    /// [`build`](Self::build) fails with [`Error::InvalidConfig`] (setting
    /// `danger_accept_invalid_certs`) when no instance uses TLS.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn f() -> quorumlock::Result<()> {
    /// use quorumlock::QuorumLocker;
    ///
    /// let locker = QuorumLocker::builder()
    ///     .url("rediss://127.0.0.1:6380")
    ///     .danger_accept_invalid_certs(true)
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn danger_accept_invalid_certs(mut self, accept: bool) -> Self {
        self.tls.insecure = accept;
        self
    }
}
