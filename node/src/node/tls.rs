//! The node's key material and the QUIC configs made from it.

use spaced_raft::network::transport_config;
use spaced_raft::pki::{ALPNS_RAFT, Identity, TlsMaterial, TlsPaths};

use super::error::StartError;
use crate::ops::config::NodeConfig;

/// The node's key material, checked to be for this node's name.
pub(super) fn load_tls(cfg: &NodeConfig) -> Result<TlsMaterial, StartError> {
    let tls = TlsMaterial::load(&TlsPaths {
        ca: cfg.tls.ca.clone(),
        cert: cfg.tls.cert.clone(),
        key: cfg.tls.key.clone(),
    })
    .map_err(|e| StartError::input(cfg, "tls", e))?;
    match tls.identity() {
        Identity::Node(n) if *n == cfg.name => Ok(tls),
        other => Err(StartError::input(
            cfg,
            "tls.cert",
            format!("certificate is for {other:?}, not node {:?}", cfg.name),
        )),
    }
}

/// The QUIC server config (Raft and admin) and the Raft client config of `tls`.
pub(super) fn quic_configs(
    tls: &TlsMaterial,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), StartError> {
    let transport = transport_config();
    let server = tls
        .server_config(transport.clone())
        .map_err(StartError::system)?;
    let client = tls
        .client_config_for(ALPNS_RAFT, transport)
        .map_err(StartError::system)?;
    Ok((server, client))
}
