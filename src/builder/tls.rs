//! The builder's TLS settings (cargo feature `tls`).

use std::path::PathBuf;

use super::Builder;
use crate::tls::Pem;

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
    /// [`build`](Self::build) fails with [`Error::InvalidConfig`](crate::Error::InvalidConfig) (setting
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
        self.tls.add_ca("tls_ca_file", Pem::File(path.into()));
        self
    }

    /// Trusts these PEM CA certificates instead of the platform's roots; as
    /// [`tls_ca_file`](Self::tls_ca_file), with the PEM in memory.
    ///
    /// # Errors
    ///
    /// [`build`](Self::build) fails with [`Error::InvalidConfig`](crate::Error::InvalidConfig) (setting
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
        self.tls.add_ca("tls_ca_pem", Pem::Bytes(pem.into()));
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
    /// [`build`](Self::build) fails with [`Error::InvalidConfig`](crate::Error::InvalidConfig) (setting
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
        self.tls.set_client(
            "tls_client_cert_files",
            Pem::File(cert.into()),
            Pem::File(key.into()),
        );
        self
    }

    /// Presents this client certificate and private key, both PEM in memory;
    /// as [`tls_client_cert_files`](Self::tls_client_cert_files).
    ///
    /// # Errors
    ///
    /// [`build`](Self::build) fails with [`Error::InvalidConfig`](crate::Error::InvalidConfig) (setting
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
        self.tls.set_client(
            "tls_client_cert",
            Pem::Bytes(cert.into()),
            Pem::Bytes(key.into()),
        );
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
    /// [`build`](Self::build) fails with [`Error::InvalidConfig`](crate::Error::InvalidConfig) (setting
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
        self.tls.set_insecure(accept);
        self
    }
}
