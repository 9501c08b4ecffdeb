//! A crypto provider the program installed before building the locker is the
//! one TLS connections use: quorumlock installs ring only when there is none.
//! In a file of its own: the process default is set once per process.
#![cfg(feature = "tls")]

#[path = "common/certs.rs"]
mod certs;

use std::sync::Arc;
use std::time::Duration;

use quorumlock::testing::RedisCluster;
use quorumlock::QuorumLocker;
use rustls::crypto::CryptoProvider;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_programs_own_provider_stays() {
    // The program's choice: ring with one TLS 1.3 cipher suite only, to tell
    // it from the default ring provider quorumlock would install.
    let mut own = rustls::crypto::ring::default_provider();
    own.cipher_suites
        .retain(|suite| suite.suite() == rustls::CipherSuite::TLS13_AES_256_GCM_SHA384);
    own.install_default().expect("no provider installed yet");
    let installed = Arc::clone(CryptoProvider::get_default().unwrap());

    let certs = certs::Certs::new();
    let cluster = RedisCluster::start_with(1, &certs.server(false)).unwrap();
    let locker = QuorumLocker::builder()
        .urls(cluster.tls_urls())
        .tls_ca_file(certs.ca())
        .instance_timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    let lock = locker
        .acquire("job", Duration::from_secs(10))
        .await
        .unwrap();
    lock.release().await.unwrap();

    let after = CryptoProvider::get_default().unwrap();
    assert!(Arc::ptr_eq(&installed, after), "the provider was replaced");
    assert_eq!(after.cipher_suites.len(), 1);
}
