//! What the QUIC tests share: a throwaway node PKI and node 1's dialer.

use spaced_raft::network::QuicNetwork;
use spaced_raft::pki::{self, ALPN_RAFT, TlsMaterial, TlsPaths};

/// `name`'s TLS material from the PKI in `dir`.
pub fn tls(dir: &std::path::Path, name: &str) -> TlsMaterial {
    TlsMaterial::load(&TlsPaths {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    })
    .expect("the test's certificates load")
}

/// A temporary directory holding a CA and a certificate for each of `names`.
pub fn pki_for(names: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary directory");
    pki::init_ca(dir.path()).expect("a CA");
    for name in names {
        pki::issue(dir.path(), name, false).expect("a node certificate");
    }
    dir
}

/// Node 1's dialer ("n1"'s certificate), on a loopback endpoint of its own.
pub fn dialer(dir: &std::path::Path) -> QuicNetwork {
    let cfg = tls(dir, "n1")
        .client_config(ALPN_RAFT, spaced_raft::network::transport_config())
        .expect("a client config");
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("an address"))
        .expect("a client endpoint");
    QuicNetwork::new(1, ep, cfg)
}
