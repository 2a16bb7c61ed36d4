//! Admin client: dials any node with an admin certificate and follows redirects to the leader.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use spaced_raft::network::resolve;
use spaced_raft::pki::{self, ALPN_ADMIN, NODE_DOMAIN, TlsMaterial, TlsPaths};
use spaced_raft::{codec, frame, proof};

use crate::admin::{AdminReply, AdminRequest, MAX_ADMIN_FRAME, SignedRequest};

/// How long dialing a node may take before the endpoint counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Dialing a node another node named as leader: it answered its peers a moment ago, so be brief.
const REDIRECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one call may take (adding a node waits for it to catch up).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to keep looking for a leader (elections, redirects) before giving up.
const LEADER_WAIT: Duration = Duration::from_secs(10);

/// Why an admin call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The PKI directory lacks usable admin credentials.
    #[error("pki {dir}: {problem}")]
    Pki {
        /// The directory.
        dir: String,
        /// What is missing or wrong.
        problem: String,
    },
    /// The node could not be reached or the connection broke.
    #[error("cannot reach spaced at {endpoint}: {problem}")]
    Unreachable {
        /// The endpoint as given.
        endpoint: String,
        /// Why.
        problem: String,
    },
    /// The node answered something that makes no sense.
    #[error("spaced at {endpoint}: {problem}")]
    Protocol {
        /// The endpoint.
        endpoint: String,
        /// What was wrong.
        problem: String,
    },
    /// The node refused or failed the operation.
    #[error("{0}")]
    Failed(String),
}

/// Admin credentials found in a PKI directory.
pub struct AdminCredentials {
    /// CA, admin certificate and key.
    material: TlsMaterial,
}

impl AdminCredentials {
    /// Loads `ca.pem` and an admin certificate from `dir`: `admin-<name>.pem` for `name`, or
    /// the only (else the first, by name) `admin-*.pem` there.
    pub fn load(dir: &Path, name: Option<&str>) -> Result<Self, ClientError> {
        let err = |problem: String| ClientError::Pki {
            dir: dir.display().to_string(),
            problem,
        };
        let cert = match name {
            Some(n) => dir.join(format!("admin-{n}.pem")),
            None => {
                let rd = std::fs::read_dir(dir)
                    .map_err(|e| err(format!("cannot read directory: {e}")))?;
                let mut certs: Vec<PathBuf> = rd
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.file_name()
                            .and_then(|f| f.to_str())
                            .is_some_and(|f| f.starts_with("admin-") && f.ends_with(".pem"))
                    })
                    .collect();
                certs.sort();
                certs.into_iter().next().ok_or_else(|| {
                    err("no admin certificate (admin-<name>.pem); create one with `spacectl pki issue --admin`".into())
                })?
            }
        };
        let key = cert.with_extension("key");
        let material = TlsMaterial::load(&TlsPaths {
            ca: dir.join("ca.pem"),
            cert,
            key,
        })
        .map_err(|e| err(e.to_string()))?;
        Ok(AdminCredentials { material })
    }
}

/// A connection to one node, re-pointed at the leader when a mutation is redirected.
pub struct AdminClient {
    /// Local QUIC endpoint.
    endpoint: quinn::Endpoint,
    /// TLS with the admin certificate, ALPN [`ALPN_ADMIN`].
    config: quinn::ClientConfig,
    /// `host:port` currently talked to.
    target: String,
    /// Open connection to `target`.
    conn: quinn::Connection,
    /// The admin's certificate and key, to sign each request.
    tls: TlsMaterial,
}

async fn dial(
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    target: &str,
    within: Duration,
) -> Result<quinn::Connection, ClientError> {
    let unreachable = |problem: String| ClientError::Unreachable {
        endpoint: target.to_string(),
        problem,
    };
    let addr = resolve(target)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let connecting = endpoint
        .connect_with(config.clone(), addr, NODE_DOMAIN)
        .map_err(|e| unreachable(e.to_string()))?;
    match tokio::time::timeout(within, connecting).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(unreachable(pki::explain_connection_error(&e, ALPN_ADMIN))),
        Err(_) => Err(unreachable(format!(
            "no answer within {} ms",
            within.as_millis()
        ))),
    }
}

impl AdminClient {
    /// Dials `target` (`host:port`).
    pub async fn connect(target: &str, creds: &AdminCredentials) -> Result<Self, ClientError> {
        let config = creds
            .material
            .client_config(ALPN_ADMIN, spaced_raft::network::transport_config())
            .map_err(|e| ClientError::Failed(e.to_string()))?;
        let bind: SocketAddr = if resolve(target).await.is_ok_and(|a| a.is_ipv6()) {
            "[::]:0"
                .parse()
                .map_err(|_| ClientError::Failed("bad bind address".into()))?
        } else {
            "0.0.0.0:0"
                .parse()
                .map_err(|_| ClientError::Failed("bad bind address".into()))?
        };
        let endpoint = quinn::Endpoint::client(bind)
            .map_err(|e| ClientError::Failed(format!("local UDP socket: {e}")))?;
        let conn = dial(&endpoint, &config, target, CONNECT_TIMEOUT).await?;
        Ok(AdminClient {
            endpoint,
            config,
            target: target.to_string(),
            conn,
            tls: creds.material.clone(),
        })
    }

    /// The endpoint currently talked to.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// A handle on the current connection that many tasks may call through at once (each
    /// call its own stream), as `spacectl check perf` does.
    pub fn caller(&self) -> Caller {
        Caller {
            conn: self.conn.clone(),
            tls: self.tls.clone(),
            target: self.target.clone(),
            signed: true,
        }
    }

    /// One request to the current node, no redirects.
    pub async fn call(&mut self, req: &AdminRequest) -> Result<AdminReply, ClientError> {
        self.caller().call(req).await
    }

    /// Re-points the client at another node.
    pub async fn redirect(&mut self, target: &str) -> Result<(), ClientError> {
        self.conn = dial(&self.endpoint, &self.config, target, REDIRECT_TIMEOUT).await?;
        self.target = target.to_string();
        Ok(())
    }

    /// Sends a leader-only request, following redirects and waiting out elections.
    pub async fn call_leader(&mut self, req: &AdminRequest) -> Result<AdminReply, ClientError> {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        let origin = self.target.clone();
        loop {
            let reply = match self.call(req).await {
                Ok(r) => r,
                // The node we were redirected to may have died: start over from the origin.
                Err(ClientError::Unreachable { .. })
                    if self.target != origin && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    self.redirect(&origin).await?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            match reply {
                AdminReply::NotLeader {
                    addr: Some(addr), ..
                } if addr != self.target => {
                    if let Err(e) = self.redirect(&addr).await {
                        // The leader it named may just have died: ask the origin again.
                        if tokio::time::Instant::now() >= deadline {
                            return Err(e);
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        self.redirect(&origin).await?;
                    }
                }
                AdminReply::NotLeader { leader, .. } => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(ClientError::Failed(match leader {
                            Some(l) => {
                                format!("node {l} is leader but not reachable from {}", self.target)
                            }
                            None => format!("no leader elected after {} s", LEADER_WAIT.as_secs()),
                        }));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return Ok(other),
            }
        }
    }

    /// Cluster status, preferably from the leader (which knows last contacts).
    pub async fn status(&mut self) -> Result<crate::admin::StatusReport, ClientError> {
        let first = match self.call(&AdminRequest::Status).await? {
            AdminReply::Status(s) => s,
            other => return Err(unexpected(&self.target, &other)),
        };
        if first.leader.is_none() || first.leader == Some(first.served_by) {
            return Ok(first);
        }
        let Some(addr) = first.leader_addr.clone() else {
            return Ok(first);
        };
        if self.redirect(&addr).await.is_err() {
            return Ok(first);
        }
        match self.call(&AdminRequest::Status).await {
            Ok(AdminReply::Status(s)) => Ok(s),
            _ => Ok(first),
        }
    }

    /// Closes the connection politely.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"bye");
        // The close frame is sent at once; waiting for the endpoint to go idle would wait out
        // QUIC's draining period (three probe timeouts: about 90 ms even on loopback), which
        // was most of every spacectl call. A few milliseconds let the endpoint's driver send
        // it; a server that misses it drops the connection at its idle timeout (1 s).
        let _ = tokio::time::timeout(CLOSE_FLUSH, self.endpoint.wait_idle()).await;
    }
}

/// Calls on one connection; cloning shares it.
#[derive(Clone)]
pub struct Caller {
    conn: quinn::Connection,
    tls: TlsMaterial,
    target: String,
    /// Whether requests carry the admin's signature (see [`Caller::unsigned`]).
    signed: bool,
}

impl Caller {
    /// The node this calls.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Whether the connection has closed (the node closed it, it timed out idle, or it
    /// broke): every call on it fails from now on, so a long-lived caller opens another.
    pub fn is_closed(&self) -> bool {
        self.conn.close_reason().is_some()
    }

    /// This caller with requests that carry no signature, for a caller that writes straight
    /// to the node it knows leads (`check perf`): the node carries them out on the
    /// connection's proof (the admin's certificate, verified at the handshake), as it does
    /// every request an admin sends it, but cannot hand them to another leader, which would
    /// need the signature; so a node that no longer leads answers "not the leader" instead.
    /// Signing costs the client an ECDSA signature per request, on cores the cluster shares.
    pub fn unsigned(self) -> Caller {
        Caller {
            signed: false,
            ..self
        }
    }

    /// `req` encoded and signed with the admin's key (see [`spaced_raft::proof`]), or
    /// encoded with an empty signature for an [unsigned](Self::unsigned) caller.
    fn sign(&self, req: &AdminRequest) -> Result<Vec<u8>, ClientError> {
        let failed = |e: &dyn std::fmt::Display| ClientError::Failed(e.to_string());
        let request = codec::encode(req).map_err(|e| failed(&e))?;
        if !self.signed {
            return codec::encode(&SignedRequest {
                request,
                at_ms: 0,
                nonce: 0,
                signature: proof::Signature {
                    scheme: 0,
                    bytes: Vec::new(),
                },
            })
            .map_err(|e| failed(&e));
        }
        let at_ms = crate::now_millis();
        let nonce = proof::nonce(&self.tls).map_err(|e| failed(&e))?;
        let signature = proof::sign(&self.tls, &proof::message(at_ms, nonce, &request))
            .map_err(|e| failed(&e))?;
        codec::encode(&SignedRequest {
            request,
            at_ms,
            nonce,
            signature,
        })
        .map_err(|e| failed(&e))
    }

    /// One request on its own stream, no redirects.
    pub async fn call(&self, req: &AdminRequest) -> Result<AdminReply, ClientError> {
        let target = &self.target;
        let broken = |problem: String| ClientError::Unreachable {
            endpoint: target.clone(),
            problem,
        };
        let fut = async {
            let (mut send, mut recv) = self
                .conn
                .open_bi()
                .await
                .map_err(|e| broken(e.to_string()))?;
            let bytes = self.sign(req)?;
            frame::write_frame(&mut send, &bytes)
                .await
                .map_err(|e| broken(e.to_string()))?;
            send.finish().map_err(|e| broken(e.to_string()))?;
            let reply = frame::read_frame(&mut recv, MAX_ADMIN_FRAME)
                .await
                .map_err(|e| broken(e.to_string()))?
                .ok_or_else(|| broken("connection closed without a reply".into()))?;
            codec::decode::<AdminReply>(&reply).map_err(|e| ClientError::Protocol {
                endpoint: target.clone(),
                problem: e.to_string(),
            })
        };
        match tokio::time::timeout(CALL_TIMEOUT, fut).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Unreachable {
                endpoint: target.clone(),
                problem: format!("no reply within {} s", CALL_TIMEOUT.as_secs()),
            }),
        }
    }
}

/// How long [`AdminClient::close`] lets the endpoint send its close frame.
const CLOSE_FLUSH: std::time::Duration = std::time::Duration::from_millis(3);

/// Error for a reply of the wrong kind.
pub fn unexpected(target: &str, reply: &AdminReply) -> ClientError {
    match reply {
        AdminReply::Failed(e) => ClientError::Failed(e.clone()),
        other => ClientError::Protocol {
            endpoint: target.to_string(),
            problem: format!("unexpected reply {other:?}"),
        },
    }
}

/// Shared so callers can hold credentials across tasks.
pub type SharedCredentials = Arc<AdminCredentials>;
