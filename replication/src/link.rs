//! The disaster-recovery link: a QUIC endpoint on its own port whose TLS trusts only the peer
//! site's CA, so a peer site's certificate opens this link and nothing else (not Raft, not
//! admin). One request and one reply per stream, in spaced's frames.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use spaced_raft::frame::{FrameError, MAX_FRAME, read_frame, write_frame};
use spaced_raft::pki::{NODE_DOMAIN, TlsMaterial};
use spaced_raft::{codec, network};

use crate::protocol::{ALPN_DR, DrReply, DrRequest, MAX_REQUEST};

/// QUIC settings of the link: a lost peer site is noticed within a few seconds.
fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_millis(500)));
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(
        3_000,
    ))));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(64));
    Arc::new(t)
}

/// Why a link could not be bound, or a request got no reply. Timeouts and failures on an
/// established connection name the peer as given (`addr`); a failed resolution names it
/// itself; a failed dial or connection says only what went wrong.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// This node's TLS material does not make a QUIC configuration.
    #[error("DR link TLS: {0}")]
    Tls(#[source] spaced_raft::pki::PkiError),
    /// The listening address could not be bound.
    #[error("DR link: bind {listen}: {source}")]
    Bind {
        /// The address.
        listen: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The peer's address does not resolve.
    #[error(transparent)]
    Resolve(#[from] network::ResolveError),
    /// The peer could not be dialed (a bad address, the endpoint closed).
    #[error("{0}")]
    Dial(#[source] quinn::ConnectError),
    /// The connection to the peer failed (a protocol mismatch says so, see
    /// [`spaced_raft::pki::explain_connection_error`]).
    #[error("{}", spaced_raft::pki::explain_connection_error(.0, ALPN_DR))]
    Connect(#[source] quinn::ConnectionError),
    /// The peer did not answer the dial in time.
    #[error("{addr}: no answer within {within:?}")]
    ConnectTimeout {
        /// The peer.
        addr: String,
        /// The time it had.
        within: Duration,
    },
    /// The peer did not reply in time (the connection is dropped: dialed afresh next time).
    #[error("{addr}: no reply within {within:?}")]
    ReplyTimeout {
        /// The peer.
        addr: String,
        /// The time it had.
        within: Duration,
    },
    /// No stream could be opened on the connection.
    #[error("{addr}: {source}")]
    Stream {
        /// The peer.
        addr: String,
        /// Why.
        source: quinn::ConnectionError,
    },
    /// The request does not encode, or the reply does not decode.
    #[error("{addr}: {source}")]
    Codec {
        /// The peer.
        addr: String,
        /// Why.
        source: codec::CodecError,
    },
    /// The request could not be sent.
    #[error("{addr}: {source}")]
    Send {
        /// The peer.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The reply could not be read.
    #[error("{addr}: {source}")]
    Receive {
        /// The peer.
        addr: String,
        /// Why.
        source: FrameError,
    },
    /// The stream ended without a reply.
    #[error("{addr}: the stream ended before a reply")]
    NoReply {
        /// The peer.
        addr: String,
    },
}

/// What serves the peer's requests (the node's watchdog).
pub trait Serve: Send + Sync + 'static {
    /// The reply to `request`.
    fn serve(
        self: Arc<Self>,
        request: DrRequest,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = DrReply> + Send>>;
}

/// This node's end of the link: it serves the peer site and dials it.
pub struct Link {
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    connections: Mutex<HashMap<SocketAddr, quinn::Connection>>,
}

impl Link {
    /// Binds `listen` with `material` (this node's certificate, trusting the peer site's CA:
    /// see [`TlsMaterial::trusting`]).
    pub fn bind(listen: SocketAddr, material: &TlsMaterial) -> Result<Arc<Link>, LinkError> {
        let server = material
            .server_config_for(transport(), &[ALPN_DR])
            .map_err(LinkError::Tls)?;
        let client = material
            .client_config(ALPN_DR, transport())
            .map_err(LinkError::Tls)?;
        let endpoint = spaced_raft::udp::endpoint(listen, Some(server))
            .map_err(|source| LinkError::Bind { listen, source })?;
        Ok(Arc::new(Link {
            endpoint,
            client,
            connections: Mutex::default(),
        }))
    }

    /// The address the link listens on.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// Serves the peer site until the endpoint closes.
    pub async fn serve<S: Serve>(self: Arc<Self>, service: Arc<S>) {
        while let Some(incoming) = self.endpoint.accept().await {
            let service = service.clone();
            tokio::spawn(async move {
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "DR link: handshake failed");
                        return;
                    }
                };
                let peer = spaced_raft::pki::peer_identity(&conn)
                    .map(|i| i.to_string())
                    .unwrap_or_else(|_| "?".into());
                tracing::debug!(%peer, remote = %conn.remote_address(), "DR link: peer connected");
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let service = service.clone();
                    tokio::spawn(async move {
                        let reply = match read_frame(&mut recv, MAX_REQUEST).await {
                            Ok(Some(bytes)) => match codec::decode::<DrRequest>(&bytes) {
                                Ok(req) => service.serve(req).await,
                                Err(e) => DrReply::Refused(format!("bad request: {e}")),
                            },
                            Ok(None) => return,
                            Err(e) => DrReply::Refused(format!("bad request: {e}")),
                        };
                        let bytes = match codec::encode(&reply) {
                            Ok(b) if b.len() <= MAX_FRAME => b,
                            Ok(b) => codec::encode(&DrReply::Refused(format!(
                                "reply of {} bytes exceeds the frame limit",
                                b.len()
                            )))
                            .unwrap_or_default(),
                            Err(e) => {
                                tracing::error!(error = %e, "DR link: reply does not encode");
                                return;
                            }
                        };
                        if write_frame(&mut send, &bytes).await.is_ok() {
                            let _ = send.finish();
                            // Wait for the peer to read it before the stream goes.
                            let _ = send.stopped().await;
                        }
                    });
                }
            });
        }
    }

    /// One request to the peer node at `addr`, within `timeout` (dialing included).
    pub async fn call(
        &self,
        addr: &str,
        request: &DrRequest,
        timeout: Duration,
    ) -> Result<DrReply, LinkError> {
        self.call_within(addr, request, timeout, timeout).await
    }

    /// One request to the peer node at `addr`: dialing within `connect` (a peer that is down
    /// counts as not answering that soon), the whole exchange within `reply` (a whole
    /// projection over a long link takes some round trips; the connection's keep-alive
    /// notices a peer that dies meanwhile within seconds).
    pub async fn call_within(
        &self,
        addr: &str,
        request: &DrRequest,
        connect: Duration,
        reply: Duration,
    ) -> Result<DrReply, LinkError> {
        let start = tokio::time::Instant::now();
        let to = network::resolve(addr).await?;
        let conn = tokio::time::timeout(connect, self.connection(to))
            .await
            .map_err(|_| LinkError::ConnectTimeout {
                addr: addr.to_string(),
                within: connect,
            })??;
        let left = reply.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, self.exchange(addr, to, conn, request)).await {
            Ok(result) => result,
            Err(_) => {
                // A peer that restarted never answers on the old connection (nothing tells
                // this side it is gone until the idle timeout): dial afresh next time.
                self.forget(to);
                Err(LinkError::ReplyTimeout {
                    addr: addr.to_string(),
                    within: reply,
                })
            }
        }
    }

    fn forget(&self, to: SocketAddr) {
        self.connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&to);
    }

    async fn exchange(
        &self,
        addr: &str,
        to: SocketAddr,
        conn: quinn::Connection,
        request: &DrRequest,
    ) -> Result<DrReply, LinkError> {
        let addr = || addr.to_string();
        let result = async {
            let (mut send, mut recv) =
                conn.open_bi().await.map_err(|source| LinkError::Stream {
                    addr: addr(),
                    source,
                })?;
            let bytes = codec::encode(request).map_err(|source| LinkError::Codec {
                addr: addr(),
                source,
            })?;
            write_frame(&mut send, &bytes)
                .await
                .map_err(|source| LinkError::Send {
                    addr: addr(),
                    source,
                })?;
            let _ = send.finish();
            let reply = read_frame(&mut recv, MAX_FRAME)
                .await
                .map_err(|source| LinkError::Receive {
                    addr: addr(),
                    source,
                })?
                .ok_or_else(|| LinkError::NoReply { addr: addr() })?;
            codec::decode::<DrReply>(&reply).map_err(|source| LinkError::Codec {
                addr: addr(),
                source,
            })
        }
        .await;
        if result.is_err() {
            self.forget(to);
        }
        result
    }

    async fn connection(&self, to: SocketAddr) -> Result<quinn::Connection, LinkError> {
        if let Some(c) = self
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&to)
            .filter(|c| c.close_reason().is_none())
        {
            return Ok(c.clone());
        }
        let conn = self
            .endpoint
            .connect_with(self.client.clone(), to, NODE_DOMAIN)
            .map_err(LinkError::Dial)?
            .await
            .map_err(LinkError::Connect)?;
        self.connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(to, conn.clone());
        Ok(conn)
    }

    /// Closes the endpoint (the serve loop ends).
    pub fn close(&self) {
        self.endpoint.close(quinn::VarInt::from_u32(0), b"stopping");
    }
}
