//! Raft RPCs over QUIC: one connection per peer, one bidirectional stream per RPC, bincode frames.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::io::Cursor;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::TransferLeaderResponse;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use crate::codec;
use crate::frame::{self, FrameBudget, MAX_FRAME, STRANGER_FRAME};
use crate::pki::NODE_DOMAIN;
use crate::store::Snapshot;
use crate::types::{Member, NodeId, Raft, Response, SnapshotMeta, TypeConfig, Vote};
use spaced_fabric::Command;

/// A boxed future, for the object-safe [`NodeHooks`].
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Snapshot bytes travel in chunks of this size, each its own frame.
const SNAPSHOT_CHUNK: usize = 4 << 20;
/// Upper bound on a received snapshot, against a peer announcing absurd sizes (a fabric of
/// 100,000 devices snapshots to about 10 MB).
const MAX_SNAPSHOT: u64 = 1 << 30;

/// What the requests a node is receiving may hold in memory at once, from all its peers
/// together (see [`FrameBudget`]).
pub const RAFT_FRAME_BUDGET: usize = 256 << 20;
/// How long dialing a peer may take before it counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// While a dial has no answer, a fresh attempt starts this often (see
/// [`QuicNetwork::dial_attempts`]).
const REDIAL_EVERY: Duration = Duration::from_millis(100);

/// A connection that has received nothing for this long, across requests left unanswered,
/// gets a fresh one dialed beside it (see [`QuicNetwork::unanswered`]). A live peer
/// acknowledges within its ACK delay (25 ms) and sends keep-alives every 250 ms.
const SILENT_BEFORE_REDIAL: Duration = Duration::from_millis(150);

/// The longest a dial attempt waits for the path probe (see [`QuicNetwork::with_path_probe`])
/// before it goes out anyway.
const PATH_PROBE_LIMIT: Duration = Duration::from_millis(20);

/// Asks the host to find the way to a peer's address afresh, now (see
/// [`QuicNetwork::with_path_probe`]); done when the future it returns is.
pub type PathProbe =
    Arc<dyn Fn(SocketAddr) -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

/// QUIC transport settings for Raft and admin connections: a dead peer is noticed within
/// about a second.
pub fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_millis(250)));
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(
        1_000,
    ))));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(1024));
    Arc::new(t)
}

/// The lease arithmetic a node counts with: every node of a cluster must count with the same
/// (an owner whose leases ran longer than the leader's silence assumes could hold a VIP
/// after it was granted elsewhere). Renewals and silence questions carry the sender's, and a
/// voter answers only a sender whose terms equal its own; `node add` refuses a node whose
/// terms differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LeaseTerms {
    /// The lease, ms.
    pub duration_ms: u64,
    /// Renewals, ms apart (it shapes only the owner's pace, but a cluster uses one value).
    pub renew_every_ms: u64,
    /// The reaction margin, ms.
    pub margin_ms: u64,
    /// The clock drift bound, in parts per million.
    pub drift_ppm: u64,
}

impl std::fmt::Display for LeaseTerms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "lease {} ms, renewals every {} ms, margin {} ms, drift {} ppm",
            self.duration_ms, self.renew_every_ms, self.margin_ms, self.drift_ppm
        )
    }
}

/// What a node says about itself when asked (used by `node add` to check the target).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDescription {
    /// Raft node id from its config.
    pub id: NodeId,
    /// Name from its config.
    pub name: String,
    /// Roles from its config.
    pub roles: BTreeSet<String>,
    /// The lease terms it counts with.
    pub lease: LeaseTerms,
}

/// One Raft RPC.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRpc {
    /// Log replication and heartbeats.
    Append(AppendEntriesRequest<TypeConfig>),
    /// Election.
    Vote(VoteRequest<TypeConfig>),
    /// Pre-vote (does not disturb a healthy leader).
    PreVote(VoteRequest<TypeConfig>),
    /// Start of a snapshot transfer; `len` bytes follow in chunk frames.
    Snapshot {
        /// Leader's vote.
        vote: Vote,
        /// Snapshot metadata.
        meta: SnapshotMeta,
        /// Total data length.
        len: u64,
    },
    /// Leadership handover.
    TransferLeader(TransferLeaderRequest<TypeConfig>),
    /// Ask the node who it is.
    Describe,
    /// Owner → every voter: renew the leases on these placements at these epochs.
    Renew {
        /// Placements and epochs.
        held: Vec<(String, u64)>,
        /// The owner's lease terms.
        terms: LeaseTerms,
    },
    /// Leader → voter: how long (ms) since you heard from each (placement, epoch, owner)?
    Silence {
        /// The leases asked about.
        keys: Vec<(String, u64, NodeId)>,
        /// The leader's lease terms.
        terms: LeaseTerms,
    },
    /// Node → leader: propose a fabric command (agents releasing placements, for example).
    Propose(Command),
    /// Node → leader: I am shutting down; grant me nothing for a while.
    Leaving,
    /// Leader → owner: fence and release this placement now (a graceful move).
    Release {
        /// Placement name.
        name: String,
        /// Epoch the owner holds.
        epoch: u64,
    },
    /// Leader → node: could you hold this VIP (interface, subnet, capabilities)? Asked before
    /// `vip add` commits, so that an address no node can hold is refused up front.
    CheckVip {
        /// Address with prefix.
        address: String,
        /// Interface.
        interface: String,
    },
    /// Node → leader: how long does this site surely hold the active role at the DR
    /// witnesses? (The asker counts the answer from when it asked.)
    SiteHold,
    /// Node → leader: an admin request the node received and only the leader can carry out,
    /// forwarded so that `spacectl` may talk to any node.
    Admin {
        /// The admin's certificate chain as the node's TLS verified it (DER, leaf first): the
        /// leader checks the request's signature against it.
        chain: Vec<Vec<u8>>,
        /// The signed admin request as the admin sent it; the daemon defines its format.
        #[serde(with = "serde_bytes")]
        request: Vec<u8>,
    },
}

/// An RPC plus who claims to send it.
#[derive(Debug, Serialize, Deserialize)]
pub struct RaftRequest {
    /// Sender's node id; checked against its certificate name.
    pub from: NodeId,
    /// The call.
    pub rpc: RaftRpc,
}

/// Replies, one per `RaftRpc` variant.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftReply {
    /// Reply to `Append`.
    Append(AppendEntriesResponse<TypeConfig>),
    /// Reply to `Vote` and `PreVote`.
    Vote(VoteResponse<TypeConfig>),
    /// Reply to `Snapshot`.
    Snapshot(SnapshotResponse<TypeConfig>),
    /// Reply to `TransferLeader`.
    TransferLeader(TransferLeaderResponse<TypeConfig>),
    /// Reply to `Describe`.
    Describe(NodeDescription),
    /// Reply to `Renew`: the placements whose renewal this voter recorded.
    Renewed(Vec<(String, u64)>),
    /// Reply to `Silence`: milliseconds per asked lease, in order.
    Silences(Vec<u64>),
    /// Reply to `Propose`: the command's result once applied.
    Proposed(Response),
    /// Reply to `Release`: fenced and released.
    Released,
    /// Reply to `Leaving`.
    Noted,
    /// Reply to `CheckVip`: `None` when the node could hold the VIP, else why not.
    VipChecked(Option<String>),
    /// Reply to `Admin`: the encoded admin reply.
    Admin(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Reply to `SiteHold`: the site epoch and the ms the hold surely lasts, if this node
    /// leads an active site and holds the role at the witnesses.
    SiteHold(Option<(u64, u64)>),
}

/// Node-level handlers for the RPCs that are not Raft's own; provided by the daemon. Their
/// errors are text (`Result<_, String>`): they cross the wire in [`WireReply`], where the
/// caller only logs or relays them, and a typed error would tie both builds to one enum.
pub trait NodeHooks: Send + Sync + 'static {
    /// `Renew` from `from` (a known member): record receipt, return what was recorded.
    fn renew(
        &self,
        from: NodeId,
        held: Vec<(String, u64)>,
        terms: LeaseTerms,
    ) -> BoxFuture<'static, Result<Vec<(String, u64)>, String>>;
    /// `Silence` from the leader: this voter's silence per lease, in ms.
    fn silence(
        &self,
        from: NodeId,
        keys: Vec<(String, u64, NodeId)>,
        terms: LeaseTerms,
    ) -> BoxFuture<'static, Result<Vec<u64>, String>>;
    /// `Propose` from `from`: commit `cmd` (this node must lead).
    fn propose(&self, from: NodeId, cmd: Command) -> BoxFuture<'static, Result<Response, String>>;
    /// `Leaving` from `from`: it is shutting down and hands its placements over.
    fn leaving(&self, from: NodeId);
    /// `Release` from the leader: fence `name` at `epoch`, then release it through the leader.
    fn release(&self, name: String, epoch: u64) -> BoxFuture<'static, Result<(), String>>;
    /// `CheckVip`: `None` when this node could hold the VIP, else why not.
    fn check_vip(&self, address: String, interface: String) -> BoxFuture<'static, Option<String>>;
    /// `SiteHold` from a member: (site epoch, ms) the site surely holds the active role.
    fn site_hold(&self) -> Option<(u64, u64)>;
    /// `Admin` from `from`: carry out an admin request it forwarded, once the admin's proof
    /// over it checks out against `chain`; the encoded reply.
    fn admin(
        &self,
        from: NodeId,
        chain: Vec<Vec<u8>>,
        request: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, String>>;
}

/// What goes back on the wire: a reply or the reason there is none (text, see [`NodeHooks`]).
pub type WireReply = Result<RaftReply, String>;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Msg(String);

fn unreachable(msg: String) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::new(&Msg(msg)))
}
fn network(msg: String) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::new(&Msg(msg)))
}

/// QUIC application close code for a connection whose peer's certificate was revoked.
pub const REVOKED_CLOSE: u32 = 0x5e_01;
/// The QUIC close code for a peer refused because it speaks only the previous data format's
/// protocol after the cluster moved on (see [`QuicNetwork::refuse_previous`]).
pub const PREVIOUS_FORMAT_CLOSE: u32 = 0x5e_02;

/// Whether the peer of `conn` presented a certificate that `revoked` holds.
fn peer_revoked(conn: &quinn::Connection, revoked: &crate::pki::Revoked) -> bool {
    !revoked.is_empty() && peer_serial(conn).is_some_and(|s| revoked.contains(&s))
}

/// The serial of the certificate the peer of `conn` presented.
fn peer_serial(conn: &quinn::Connection) -> Option<String> {
    crate::pki::peer_chain(conn)
        .ok()
        .and_then(|chain| chain.into_iter().next())
        .and_then(|leaf| crate::pki::serial_of(&leaf).ok())
}

/// How a dial ended: the connection, or why there is none.
type DialOutcome = Result<quinn::Connection, String>;

/// One peer's cached connection, and the dial under way to it if there is none.
#[derive(Default)]
struct PeerSlot {
    /// The connection in use.
    conn: Option<quinn::Connection>,
    /// The dial under way: its outcome is published here (`None` until it ends).
    dial: Option<tokio::sync::watch::Receiver<Option<DialOutcome>>>,
    /// How many datagrams `conn` had received when a request on it was last left unanswered,
    /// and since when that count has not moved (see [`QuicNetwork::unanswered`]).
    heard: Option<(u64, std::time::Instant)>,
}

impl PeerSlot {
    /// The dial under way, if any. A dial whose task was dropped unfinished (its runtime shut
    /// down) is not: it will never publish.
    fn dial_under_way(&self) -> Option<&tokio::sync::watch::Receiver<Option<DialOutcome>>> {
        self.dial.as_ref().filter(|d| d.has_changed().is_ok())
    }
}

/// Dials peers and caches one connection per peer.
#[derive(Clone)]
pub struct QuicNetwork {
    /// This node's id, sent with every request.
    self_id: NodeId,
    /// Local QUIC endpoint (the same one that serves).
    endpoint: quinn::Endpoint,
    /// TLS + transport settings for Raft connections (ALPN [`crate::pki::ALPN_RAFT`]);
    /// replaced when the node's certificate is reloaded.
    client_config: Arc<std::sync::RwLock<quinn::ClientConfig>>,
    /// Live connections and dials under way, by peer (held only to look or to swap, never
    /// across an await).
    conns: Arc<std::sync::Mutex<HashMap<NodeId, PeerSlot>>>,
    /// Revoked certificates: a cached connection to a peer whose certificate was revoked
    /// since is closed instead of used (a new one fails in the handshake).
    revoked: crate::pki::Revoked,
    /// Whether a peer that speaks only the previous format's protocol is refused (every
    /// node of the cluster has recorded this build's format: see [`Self::refuse_previous`]).
    refuse_previous: Arc<std::sync::atomic::AtomicBool>,
    /// Peers that refused this node's Raft requests because it is not a member of the cluster
    /// they know, and when they last did (see [`Self::refused_as_stranger_by`]).
    strangers_to: Arc<std::sync::Mutex<HashMap<NodeId, std::time::Instant>>>,
    /// The least time an append that carries entries may take (see
    /// [`Self::with_append_timeout`]); zero: openraft's own, the heartbeat interval.
    append_ttl: Duration,
    /// Run before every dial attempt but a dial's first (see [`Self::with_path_probe`]).
    path_probe: Option<PathProbe>,
}

impl QuicNetwork {
    /// Creates the dialer; `client_config` must carry the Raft ALPN and this node's certificate.
    pub fn new(
        self_id: NodeId,
        endpoint: quinn::Endpoint,
        client_config: quinn::ClientConfig,
    ) -> Self {
        QuicNetwork {
            self_id,
            endpoint,
            client_config: Arc::new(std::sync::RwLock::new(client_config)),
            conns: Arc::default(),
            revoked: Default::default(),
            refuse_previous: Arc::default(),
            strangers_to: Arc::default(),
            append_ttl: Duration::ZERO,
            path_probe: None,
        }
    }

    /// The same dialer, running `probe` with the peer's address before every attempt of a
    /// dial but its first (for at most [`PATH_PROBE_LIMIT`]).
    ///
    /// The node's probe has the host resolve the peer's link-layer address again at once.
    /// After a partition a host's entry for a peer can sit unresolved: Linux asks ARP again
    /// only once a second (`retrans_time_ms`), holding every datagram to that peer meanwhile,
    /// so a healed cluster waited up to a second for its first packet through. An attempt
    /// that follows an unanswered one is the sign that the way may be lost.
    pub fn with_path_probe(mut self, probe: PathProbe) -> Self {
        self.path_probe = Some(probe);
        self
    }

    /// The same dialer, giving an append that carries entries at least `ttl` for its answer.
    ///
    /// openraft gives every append the heartbeat interval (25 ms by default). A heartbeat
    /// must be that quick, but an append of a batch waits for the follower's fsync, which on a
    /// loaded host takes longer: given up on, the batch counted as a network error, the
    /// replication stream ended and the entries were sent again, and the writes waiting on
    /// them stalled (hundreds of such errors a minute at 8,000 writes/s on 2 cores). Heartbeats
    /// (appends without entries) keep openraft's time; so does every other request.
    pub fn with_append_timeout(mut self, ttl: Duration) -> Self {
        self.append_ttl = ttl;
        self
    }

    /// From now on (`yes`), a peer that negotiates only [`crate::pki::ALPN_RAFT_PREVIOUS`] is
    /// refused when dialed: once every node has recorded this build's format, commands the
    /// previous build cannot decode may be in the log (the node flips this as its fabric
    /// says). Connections already open are closed on their next use.
    pub fn refuse_previous(&self, yes: bool) {
        self.refuse_previous
            .store(yes, std::sync::atomic::Ordering::Relaxed);
    }

    /// The peers that refused this node's Raft requests within `within` because this node is
    /// not a member of the cluster they know. A follower that was down (or cut off) while this
    /// node was added refuses it, and cannot learn better from it: only from a leader it knows
    /// (see [`admit`]). A leader that hears this hands leadership to an older voter.
    pub fn refused_as_stranger_by(&self, within: Duration) -> Vec<NodeId> {
        let mut by = self.strangers_to.lock().unwrap_or_else(|p| p.into_inner());
        by.retain(|_, at| at.elapsed() <= within);
        by.keys().copied().collect()
    }

    /// Notes `reply`'s refusal, if it is `peer` refusing this node as a stranger.
    fn note_refusal(&self, peer: NodeId, reply: &Result<RaftReply, RpcError>) {
        if let Err(RpcError::Refused(text)) = reply
            && is_stranger_refusal(text, self.self_id)
        {
            self.strangers_to
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(peer, std::time::Instant::now());
        }
    }

    /// Whether `conn` speaks only the previous format's protocol while that is refused.
    fn refused_as_previous(&self, conn: &quinn::Connection) -> bool {
        self.refuse_previous
            .load(std::sync::atomic::Ordering::Relaxed)
            && negotiated(conn).as_deref() == Some(crate::pki::ALPN_RAFT_PREVIOUS)
    }

    /// The config new connections are dialed with.
    fn client_config(&self) -> quinn::ClientConfig {
        self.client_config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Dials new connections with `config` from now on (a reloaded certificate); connections
    /// already open keep theirs.
    pub fn set_client_config(&self, config: quinn::ClientConfig) {
        *self
            .client_config
            .write()
            .unwrap_or_else(|p| p.into_inner()) = config;
    }

    /// The same dialer, refusing to reuse connections to peers whose certificates `revoked`
    /// holds (share the set the client config's verifier uses).
    pub fn with_revoked(mut self, revoked: crate::pki::Revoked) -> Self {
        self.revoked = revoked;
        self
    }

    /// The connection to `target`, dialed if there is none. One dial per peer is under way at
    /// a time, in a task of its own: a caller that gives up (its time-out, or openraft's)
    /// leaves it running for the next caller, instead of cutting it short and dialing again
    /// (see [`Self::dial`]).
    async fn connection(
        &self,
        target: NodeId,
        member: &Member,
    ) -> Result<quinn::Connection, RpcError> {
        let mut dialing = {
            let mut peers = self.conns.lock().unwrap_or_else(|p| p.into_inner());
            let slot = peers.entry(target).or_default();
            if let Some(c) = slot.conn.as_ref()
                && c.close_reason().is_none()
            {
                if peer_revoked(c, &self.revoked) {
                    c.close(REVOKED_CLOSE.into(), b"certificate revoked");
                } else if self.refused_as_previous(c) {
                    c.close(PREVIOUS_FORMAT_CLOSE.into(), b"previous data format");
                } else {
                    return Ok(c.clone());
                }
            }
            slot.conn = None;
            self.dialing(slot, target, member)
        };
        let outcome = dialing
            .wait_for(Option::is_some)
            .await
            .map_err(|_| "the dial was dropped (the node is stopping)".to_string())
            .and_then(|o| o.clone().unwrap_or_else(|| Err("no outcome".into())));
        outcome.map_err(|why| RpcError::Dial {
            node: target,
            member: member.to_string(),
            why,
        })
    }

    /// The dial to `target` under way, started if there is none.
    fn dialing(
        &self,
        slot: &mut PeerSlot,
        target: NodeId,
        member: &Member,
    ) -> tokio::sync::watch::Receiver<Option<DialOutcome>> {
        if let Some(dial) = slot.dial_under_way() {
            return dial.clone();
        }
        let (done, dial) = tokio::sync::watch::channel(None);
        slot.dial = Some(dial.clone());
        tokio::spawn(self.clone().dial(target, member.clone(), done));
        dial
    }

    /// A request to `target` was left unanswered within its limit. If its connection has
    /// received nothing for [`SILENT_BEFORE_REDIAL`] across such requests, a fresh connection
    /// is dialed beside it, and replaces it once made.
    ///
    /// After a short partition (shorter than the idle timeout) the old connection lives on but
    /// sends only when QUIC's probe timer fires, and that timer doubles with every probe lost:
    /// after a partition of a second the next probe can be half a second after the heal. A
    /// fresh dial's attempts reach the peer within [`REDIAL_EVERY`]. Requests in flight on the
    /// old connection keep it until they end: it is not closed under them.
    fn unanswered(&self, target: NodeId, member: &Member) {
        let mut peers = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let Some(slot) = peers.get_mut(&target) else {
            return;
        };
        if slot.dial_under_way().is_some() {
            return;
        }
        let Some(conn) = &slot.conn else { return };
        let heard = conn.stats().udp_rx.datagrams;
        let now = std::time::Instant::now();
        match slot.heard {
            Some((count, since)) if count == heard => {
                if now.duration_since(since) >= SILENT_BEFORE_REDIAL {
                    tracing::info!(
                        peer = target,
                        silent_ms = now.duration_since(since).as_millis() as u64,
                        "nothing heard from the peer across unanswered requests: dialing a \
                         fresh connection beside the silent one"
                    );
                    slot.heard = None;
                    drop(self.dialing(slot, target, member));
                }
            }
            _ => slot.heard = Some((heard, now)),
        }
    }

    /// Dials `target` (see [`Self::dial_attempts`]), caches the connection (in place of a
    /// silent one, see [`Self::unanswered`]), and publishes the outcome to every caller
    /// waiting on it.
    async fn dial(
        self,
        target: NodeId,
        member: Member,
        done: tokio::sync::watch::Sender<Option<DialOutcome>>,
    ) {
        let outcome = self.dial_attempts(&member).await;
        match &outcome {
            Ok(_) => tracing::debug!(peer = target, "dialed"),
            Err(why) => tracing::debug!(peer = target, %why, "dial failed"),
        }
        {
            let mut peers = self.conns.lock().unwrap_or_else(|p| p.into_inner());
            let slot = peers.entry(target).or_default();
            slot.dial = None;
            if let Ok(conn) = &outcome {
                slot.conn = Some(conn.clone());
                slot.heard = None;
            }
        }
        done.send_replace(Some(outcome));
    }

    /// Dials `member` within [`CONNECT_TIMEOUT`], starting a fresh attempt every
    /// [`REDIAL_EVERY`] while none has answered, the earlier ones still waiting; the first
    /// connection made wins and the others are dropped.
    ///
    /// One attempt alone would sit out QUIC's retransmission of its first packet (a second
    /// at the default initial RTT) after a partition heals; fresh attempts reach the peer
    /// within `REDIAL_EVERY` of the heal, while a slow path (a second site's) still has the
    /// whole `CONNECT_TIMEOUT` to answer the first. A peer that answers with a refusal (TLS,
    /// protocol, a closed endpoint) ends the dial at once with its reason. Every attempt but
    /// the first runs the path probe first, if there is one ([`Self::with_path_probe`]).
    async fn dial_attempts(&self, member: &Member) -> DialOutcome {
        use futures::StreamExt;
        let addr = resolve(&member.addr).await.map_err(|e| e.to_string())?;
        let server_name = format!("{}.{}", member.name, NODE_DOMAIN);
        let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        let mut attempts = futures::stream::FuturesUnordered::new();
        let mut next = tokio::time::Instant::now();
        let mut first = true;
        loop {
            if next <= tokio::time::Instant::now() && next < deadline {
                if !first && let Some(probe) = &self.path_probe {
                    let _ = tokio::time::timeout(PATH_PROBE_LIMIT, probe(addr)).await;
                }
                first = false;
                let connecting = self
                    .endpoint
                    .connect_with(self.client_config(), addr, &server_name)
                    .map_err(|e| e.to_string())?;
                attempts.push(tokio::time::timeout_at(deadline, connecting));
                next += REDIAL_EVERY;
            }
            let outcome = tokio::select! {
                Some(outcome) = attempts.next() => outcome,
                () = tokio::time::sleep_until(next), if next < deadline => continue,
                else => return Err("timed out".into()),
            };
            match outcome {
                Ok(Ok(conn)) => return self.admitted(conn),
                // Nothing came back from the peer: the others (and the next) may yet.
                Ok(Err(quinn::ConnectionError::TimedOut)) | Err(_) => {}
                Ok(Err(e)) => {
                    return Err(crate::pki::explain_connection_error(
                        &e,
                        crate::pki::ALPN_RAFT,
                    ));
                }
            }
        }
    }

    /// `conn`, unless it speaks only the previous format's protocol while that is refused.
    fn admitted(&self, conn: quinn::Connection) -> DialOutcome {
        if self.refused_as_previous(&conn) {
            conn.close(PREVIOUS_FORMAT_CLOSE.into(), b"previous data format");
            return Err(format!(
                "it speaks only {} (data format {}), and every node of this cluster has \
                 recorded data format {}: upgrade it to this build",
                String::from_utf8_lossy(crate::pki::ALPN_RAFT_PREVIOUS),
                crate::store::PREVIOUS_FORMAT,
                crate::store::DATA_FORMAT
            ));
        }
        Ok(conn)
    }

    /// The serial of the certificate `target` presented on the connection to it (dialing it
    /// if there is none), within `ttl`; `None` if it cannot be reached.
    pub async fn peer_serial(
        &self,
        target: NodeId,
        member: &Member,
        ttl: Duration,
    ) -> Option<String> {
        let conn = tokio::time::timeout(ttl, self.connection(target, member))
            .await
            .ok()?
            .ok()?;
        peer_serial(&conn)
    }

    /// Sends one request on a new stream and reads the reply, all within `ttl`, dialing
    /// included: a dead peer costs its callers `ttl`, not a connect timeout each (callers of
    /// one peer wait on its one dial, so those would add up: seconds of a leader asking a dead
    /// voter about leases before it could move a VIP). The dial goes on when a caller gives
    /// up; the next caller waits on it.
    pub async fn call(
        &self,
        target: NodeId,
        member: &Member,
        rpc: RaftRpc,
        ttl: Duration,
    ) -> Result<RaftReply, RpcError> {
        let req = RaftRequest {
            from: self.self_id,
            rpc,
        };
        let reply = tokio::time::timeout(ttl, async {
            let conn = self.connection(target, member).await?;
            call_on(&conn, &req, &[]).await
        })
        .await;
        if reply.is_err() {
            self.unanswered(target, member);
        }
        reply.map_err(|_| RpcError::Timeout { node: target, ttl })?
    }
}

/// Whether a handshake failed because the dialer gave it up: a dial's spare attempts are
/// dropped once one of them connects (see [`QuicNetwork::dial_attempts`]), and an attempt
/// dropped before its handshake ends closes with QUIC's `APPLICATION_ERROR`.
pub fn abandoned_by_dialer(e: &quinn::ConnectionError) -> bool {
    matches!(e, quinn::ConnectionError::ConnectionClosed(c)
        if c.error_code == quinn::TransportErrorCode::APPLICATION_ERROR)
}

/// The protocol (ALPN) `conn` negotiated.
pub fn negotiated(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol)
}

/// Why a host:port could not be resolved.
#[derive(Debug, thiserror::Error)]
#[error("resolve {addr}: {why}")]
pub struct ResolveError {
    /// The address as given.
    pub addr: String,
    /// What the lookup said.
    pub why: String,
}

/// Resolves `host:port` (an IP literal without a lookup).
pub async fn resolve(addr: &str) -> Result<SocketAddr, ResolveError> {
    if let Ok(a) = addr.parse() {
        return Ok(a);
    }
    let fail = |why: String| ResolveError {
        addr: addr.to_string(),
        why,
    };
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| fail(e.to_string()))?
        .next()
        .ok_or_else(|| fail("no address".into()))
}

/// Why a node-to-node call got no reply.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// The peer could not be dialed.
    #[error("dial node {node} ({member}): {why}")]
    Dial {
        /// The peer.
        node: NodeId,
        /// How it was dialed (`name@addr`).
        member: String,
        /// What went wrong.
        why: String,
    },
    /// No reply within the call's time limit (dialing included).
    #[error("node {node}: no reply within {ttl:?}")]
    Timeout {
        /// The peer.
        node: NodeId,
        /// The limit.
        ttl: Duration,
    },
    /// The request is larger than a frame may be.
    #[error("request of {0} bytes exceeds the frame limit")]
    TooLarge(usize),
    /// The stream failed: opening, sending, receiving or decoding the reply.
    #[error("{stage}: {why}")]
    Stream {
        /// `open stream`, `send` or `receive`.
        stage: &'static str,
        /// What went wrong.
        why: String,
    },
    /// The peer answered with a refusal (its own words; they cross the wire as text).
    #[error("peer refused: {0}")]
    Refused(String),
}

fn stream(stage: &'static str) -> impl Fn(&dyn std::fmt::Display) -> RpcError {
    move |e| RpcError::Stream {
        stage,
        why: e.to_string(),
    }
}

/// Opens a stream, writes the request (plus optional trailing chunk frames) and reads the reply.
async fn call_on(
    conn: &quinn::Connection,
    req: &RaftRequest,
    chunks: &[&[u8]],
) -> Result<RaftReply, RpcError> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| stream("open stream")(&e))?;
    let bytes = codec::encode(req).map_err(|e| stream("encode")(&e))?;
    if bytes.len() > MAX_FRAME {
        return Err(RpcError::TooLarge(bytes.len()));
    }
    frame::write_frame(&mut send, &bytes)
        .await
        .map_err(|e| stream("send")(&e))?;
    for c in chunks {
        frame::write_frame(&mut send, c)
            .await
            .map_err(|e| stream("send")(&e))?;
    }
    send.finish().map_err(|e| stream("send")(&e))?;
    let reply = frame::read_frame(&mut recv, MAX_FRAME)
        .await
        .map_err(|e| stream("receive")(&e))?
        .ok_or_else(|| stream("receive")(&"stream closed without a reply"))?;
    let reply: WireReply = codec::decode(&reply).map_err(|e| stream("receive")(&e))?;
    reply.map_err(RpcError::Refused)
}

impl RaftNetworkFactory<TypeConfig> for QuicNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> Self::Network {
        PeerClient {
            net: self.clone(),
            target,
            member: node.clone(),
        }
    }
}

/// openraft's handle on one peer.
pub struct PeerClient {
    /// Shared dialer and connection cache.
    net: QuicNetwork,
    /// Peer id.
    target: NodeId,
    /// Peer name and address.
    member: Member,
}

impl PeerClient {
    async fn rpc(&self, rpc: RaftRpc, ttl: Duration) -> Result<RaftReply, RPCError<TypeConfig>> {
        let conn = self
            .net
            .connection(self.target, &self.member)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let req = RaftRequest {
            from: self.net.self_id,
            rpc,
        };
        let reply = tokio::time::timeout(ttl, call_on(&conn, &req, &[])).await;
        if let Ok(r) = &reply {
            self.net.note_refusal(self.target, r);
        }
        match reply {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(network(format!("node {}: {e}", self.target))),
            Err(_) => {
                self.net.unanswered(self.target, &self.member);
                Err(network(format!(
                    "node {}: no reply within {ttl:?}",
                    self.target
                )))
            }
        }
    }
}

fn unexpected(reply: RaftReply) -> RPCError<TypeConfig> {
    network(format!("unexpected reply {reply:?}"))
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let ttl = if rpc.entries.is_empty() {
            option.hard_ttl()
        } else {
            option.hard_ttl().max(self.net.append_ttl)
        };
        match self.rpc(RaftRpc::Append(rpc), ttl).await? {
            RaftReply::Append(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.rpc(RaftRpc::Vote(rpc), option.hard_ttl()).await? {
            RaftReply::Vote(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.rpc(RaftRpc::PreVote(rpc), option.hard_ttl()).await? {
            RaftReply::Vote(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let conn = self
            .net
            .connection(self.target, &self.member)
            .await
            .map_err(|e| StreamingError::Unreachable(Unreachable::new(&Msg(e.to_string()))))?;
        let data = snapshot.snapshot.into_inner();
        let req = RaftRequest {
            from: self.net.self_id,
            rpc: RaftRpc::Snapshot {
                vote,
                meta: snapshot.meta,
                len: data.len() as u64,
            },
        };
        let chunks: Vec<&[u8]> = data.chunks(SNAPSHOT_CHUNK).collect();
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            reply = call_on(&conn, &req, &chunks) => match reply {
                Ok(RaftReply::Snapshot(r)) => Ok(r),
                Ok(other) => Err(StreamingError::Network(NetworkError::new(&Msg(format!("unexpected reply {other:?}"))))),
                Err(e) => Err(StreamingError::Network(NetworkError::new(&Msg(format!("node {}: {e}", self.target))))),
            },
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self
            .rpc(RaftRpc::TransferLeader(req), option.hard_ttl())
            .await?
        {
            RaftReply::TransferLeader(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }
}

/// The server half: answers Raft RPCs arriving on accepted connections.
#[derive(Clone)]
pub struct RaftService {
    /// The local Raft node.
    pub raft: Raft,
    /// What `Describe` answers.
    pub local: NodeDescription,
    /// Handlers for lease renewals, proposals and releases.
    pub hooks: Option<Arc<dyn NodeHooks>>,
    /// Memory the requests being received may hold, shared by every connection.
    pub budget: FrameBudget,
    /// Revoked certificates: a connection whose peer's certificate is revoked is closed at
    /// its next request.
    pub revoked: crate::pki::Revoked,
}

/// Why a node RPC was refused before it was looked at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The request carries another node's vote than the sender claims to be.
    #[error("request claims node {from} but carries the vote of node {vote_of}")]
    VoteOfOther {
        /// The claimed sender.
        from: NodeId,
        /// The node the vote names.
        vote_of: NodeId,
    },
    /// The certificate names another node than the member the request claims to come from.
    #[error("certificate names {cert:?} but request claims node {from} which is {member:?}")]
    NotThatNode {
        /// The name in the certificate.
        cert: String,
        /// The claimed sender.
        from: NodeId,
        /// That member's name.
        member: String,
    },
    /// The sender is not a member of this node's cluster.
    #[error("node {from} ({cert:?}) is not a member of this cluster")]
    NotMember {
        /// The claimed sender.
        from: NodeId,
        /// The name in its certificate.
        cert: String,
    },
}

/// The admission rule for every node RPC, given this node's membership (`members`: id and
/// name, voters and learners; empty on a node that has not joined a cluster yet):
///
/// - a request whose vote names another node than the claimed sender is refused;
/// - a member must present the certificate of its own name;
/// - a sender that is not a member may only ask `Describe` (id, name and roles, which the
///   leader asks a node before it adds it), except on a node that is not a voter in its own
///   membership (`learning`): one that has not joined yet, which takes log entries and a
///   snapshot from whoever adds it (the join itself), or a learner catching up, whose
///   membership is that of the log it has replayed so far and may predate the leader's
///   joining. A node that votes in nothing decides nothing by what it takes: the leader that
///   promotes it to voter first brings its log in line with its own.
///
/// So a certificate the CA issued to a node that is not (or no longer) a member can neither
/// vote, nor raise a term, nor replace the log or the fabric. A follower that missed the
/// change that added the current leader refuses that leader until another leader it knows
/// takes over (it cannot tell it from an impostor); the leader, told so (see
/// [`QuicNetwork::refused_as_stranger_by`]), hands leadership to a voter that joined before it.
pub fn admit(
    rpc: &RaftRpc,
    from: NodeId,
    cert: &str,
    members: &BTreeMap<NodeId, &str>,
    learning: bool,
) -> Result<(), Refusal> {
    if let Some(v) = voter_of(rpc)
        && v != from
    {
        return Err(Refusal::VoteOfOther { from, vote_of: v });
    }
    match members.get(&from) {
        Some(name) if *name == cert => Ok(()),
        Some(name) => Err(Refusal::NotThatNode {
            cert: cert.to_string(),
            from,
            member: name.to_string(),
        }),
        None => {
            let joining = learning && matches!(rpc, RaftRpc::Append(_) | RaftRpc::Snapshot { .. });
            if joining || matches!(rpc, RaftRpc::Describe) {
                Ok(())
            } else {
                Err(Refusal::NotMember {
                    from,
                    cert: cert.to_string(),
                })
            }
        }
    }
}

/// Whether a refusal's text (it crosses the wire as text) is [`Refusal::NotMember`] of node
/// `me`: the peer does not know `me` as a member.
pub fn is_stranger_refusal(text: &str, me: NodeId) -> bool {
    let probe = Refusal::NotMember {
        from: me,
        cert: String::new(),
    }
    .to_string();
    // "node 4 (\"\") is not a member…": the parts before and after the certificate's name.
    let (head, tail) = probe.split_once("\"\"").unwrap_or((probe.as_str(), ""));
    text.starts_with(head) && text.ends_with(tail) && text.len() > head.len() + tail.len()
}

/// The node id a request's vote names, which must equal the claimed sender.
fn voter_of(rpc: &RaftRpc) -> Option<NodeId> {
    match rpc {
        RaftRpc::Append(r) => Some(r.vote.leader_id.node_id),
        RaftRpc::Vote(r) | RaftRpc::PreVote(r) => Some(r.vote.leader_id.node_id),
        RaftRpc::Snapshot { vote, .. } => Some(vote.leader_id.node_id),
        RaftRpc::TransferLeader(r) => Some(r.from_leader().leader_id.node_id),
        RaftRpc::Describe
        | RaftRpc::Renew { .. }
        | RaftRpc::Silence { .. }
        | RaftRpc::Propose(_)
        | RaftRpc::Leaving
        | RaftRpc::Release { .. }
        | RaftRpc::CheckVip { .. }
        | RaftRpc::SiteHold
        | RaftRpc::Admin { .. } => None,
    }
}

impl RaftService {
    /// Serves every stream of one accepted connection whose certificate names node `peer_name`.
    pub async fn serve_connection(self, conn: quinn::Connection, peer_name: String) {
        let remote = conn.remote_address();
        let serial = peer_serial(&conn);
        loop {
            let (send, recv) = match conn.accept_bi().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(peer = %peer_name, %remote, error = %e, "raft connection closed");
                    return;
                }
            };
            if serial.as_ref().is_some_and(|s| self.revoked.contains(s)) {
                tracing::warn!(peer = %peer_name, %remote, "closing a connection: the peer's certificate is revoked");
                conn.close(REVOKED_CLOSE.into(), b"certificate revoked");
                return;
            }
            let svc = self.clone();
            let peer = peer_name.clone();
            tokio::spawn(async move {
                if let Err(e) = svc.serve_stream(send, recv, &peer).await {
                    if e.contains("stopped by peer") {
                        // The caller gave up waiting (its RPC timed out): not a refusal.
                        tracing::debug!(peer = %peer, %remote, error = %e, "raft reply not wanted any more");
                    } else {
                        tracing::warn!(peer = %peer, %remote, error = %e, "raft stream refused");
                    }
                }
            });
        }
    }

    /// The node-level handlers, for a sender that is a member (node RPCs come only from peers).
    /// (Its refusal is a [`WireReply`]'s text.)
    fn hooks_for(&self, from: NodeId) -> Result<&Arc<dyn NodeHooks>, String> {
        let hooks = self
            .hooks
            .as_ref()
            .ok_or("this node serves no node-level RPCs")?;
        if !self.is_member(from) {
            return Err(format!("node {from} is not a member"));
        }
        Ok(hooks)
    }

    /// Whether `id` is in the Raft membership this node knows.
    fn is_member(&self, id: NodeId) -> bool {
        self.raft
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .get_node(&id)
            .is_some()
    }

    /// The largest request a peer with this certificate may send: a frame from a node that is
    /// not a member is refused beyond what asking `Describe` needs, before it is read (a node
    /// that votes in nothing, not yet joined or a learner catching up, takes the full size,
    /// for the entries it is catching up on: see [`admit`]).
    fn frame_limit(&self, peer_name: &str) -> usize {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        let membership = m.membership_config.membership();
        let learning = self.learning(membership);
        if learning || membership.nodes().any(|(_, n)| n.name == peer_name) {
            MAX_FRAME
        } else {
            STRANGER_FRAME
        }
    }

    /// Whether this node votes in nothing in `membership` (not yet joined, or a learner):
    /// such a node takes entries from any certified sender (see [`admit`]).
    fn learning(&self, membership: &openraft::Membership<NodeId, Member>) -> bool {
        !membership.voter_ids().any(|v| v == self.local.id)
    }

    /// Whether the sender may make this request: see [`admit`].
    fn check_sender(&self, req: &RaftRequest, peer_name: &str) -> Result<(), Refusal> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        let membership = m.membership_config.membership();
        let members: BTreeMap<NodeId, &str> = membership
            .nodes()
            .map(|(id, n)| (*id, n.name.as_str()))
            .collect();
        let learning = self.learning(membership);
        admit(&req.rpc, req.from, peer_name, &members, learning)
    }

    /// Serves one request; the error is the text a refused or failed stream is logged with.
    async fn serve_stream(
        &self,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        peer_name: &str,
    ) -> Result<(), String> {
        let limit = self.frame_limit(peer_name);
        let frame = match frame::read_frame_within(&mut recv, limit, &self.budget).await {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(()),
            Err(e) => {
                let _ = recv.stop(1u32.into());
                let _ = send.reset(1u32.into());
                return Err(e.to_string());
            }
        };
        let req: RaftRequest = match codec::decode(&frame.bytes) {
            Ok(r) => r,
            Err(e) => {
                let _ = recv.stop(1u32.into());
                let _ = send.reset(1u32.into());
                return Err(format!("undecodable request: {e}"));
            }
        };
        if let Err(e) = self.check_sender(&req, peer_name) {
            let e = e.to_string();
            let reply: WireReply = Err(e.clone());
            if let Ok(b) = codec::encode(&reply) {
                let _ = frame::write_frame(&mut send, &b).await;
            }
            let _ = send.finish();
            return Err(e);
        }
        let reply: WireReply = match req.rpc {
            RaftRpc::Append(r) => self
                .raft
                .append_entries(r)
                .await
                .map(RaftReply::Append)
                .map_err(|e| e.to_string()),
            RaftRpc::Vote(r) => self
                .raft
                .vote(r)
                .await
                .map(RaftReply::Vote)
                .map_err(|e| e.to_string()),
            RaftRpc::PreVote(r) => self
                .raft
                .pre_vote(r)
                .await
                .map(RaftReply::Vote)
                .map_err(|e| e.to_string()),
            RaftRpc::TransferLeader(r) => self
                .raft
                .handle_transfer_leader(r)
                .await
                .map(RaftReply::TransferLeader)
                .map_err(|e| e.to_string()),
            RaftRpc::Describe => Ok(RaftReply::Describe(self.local.clone())),
            RaftRpc::Renew { held, terms } => {
                let h = self.hooks_for(req.from)?;
                h.renew(req.from, held, terms).await.map(RaftReply::Renewed)
            }
            RaftRpc::Silence { keys, terms } => {
                let h = self.hooks_for(req.from)?;
                h.silence(req.from, keys, terms)
                    .await
                    .map(RaftReply::Silences)
            }
            RaftRpc::Propose(cmd) => {
                let h = self.hooks_for(req.from)?;
                h.propose(req.from, cmd).await.map(RaftReply::Proposed)
            }
            RaftRpc::Leaving => {
                self.hooks_for(req.from)?.leaving(req.from);
                Ok(RaftReply::Noted)
            }
            RaftRpc::Release { name, epoch } => {
                let h = self.hooks_for(req.from)?;
                h.release(name, epoch).await.map(|()| RaftReply::Released)
            }
            RaftRpc::CheckVip { address, interface } => {
                let h = self.hooks_for(req.from)?;
                Ok(RaftReply::VipChecked(h.check_vip(address, interface).await))
            }
            RaftRpc::SiteHold => Ok(RaftReply::SiteHold(self.hooks_for(req.from)?.site_hold())),
            RaftRpc::Admin { chain, request } => {
                let h = self.hooks_for(req.from)?;
                h.admin(req.from, chain, request)
                    .await
                    .map(RaftReply::Admin)
            }
            RaftRpc::Snapshot { vote, meta, len } => {
                if len > MAX_SNAPSHOT {
                    return Err(format!("snapshot of {len} bytes exceeds the limit"));
                }
                let mut data = Vec::with_capacity(len.min(64 << 20) as usize);
                while (data.len() as u64) < len {
                    match frame::read_frame(&mut recv, SNAPSHOT_CHUNK).await {
                        Ok(Some(c)) if !c.is_empty() => data.extend_from_slice(&c),
                        Ok(_) => return Err("snapshot stream ended early".into()),
                        Err(e) => return Err(format!("snapshot stream: {e}")),
                    }
                }
                if data.len() as u64 != len {
                    return Err(format!("snapshot of {} bytes, announced {len}", data.len()));
                }
                let snap = Snapshot {
                    meta,
                    snapshot: Cursor::new(data),
                };
                self.raft
                    .install_full_snapshot(vote, snap)
                    .await
                    .map(RaftReply::Snapshot)
                    .map_err(|e| e.to_string())
            }
        };
        let bytes = codec::encode(&reply).map_err(|e| e.to_string())?;
        frame::write_frame(&mut send, &bytes)
            .await
            .map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vote_req(of: NodeId) -> RaftRpc {
        let vote = Vote::new(7, of);
        RaftRpc::Vote(VoteRequest::new(vote, None))
    }

    fn append(of: NodeId) -> RaftRpc {
        RaftRpc::Append(AppendEntriesRequest {
            vote: Vote::new_committed(7, of),
            prev_log_id: None,
            entries: Vec::new(),
            leader_commit: None,
        })
    }

    fn renew() -> RaftRpc {
        RaftRpc::Renew {
            held: Vec::new(),
            terms: LeaseTerms {
                duration_ms: 300,
                renew_every_ms: 75,
                margin_ms: 50,
                drift_ppm: 10_000,
            },
        }
    }

    #[test]
    fn only_members_may_vote_append_or_ask_node_rpcs() {
        let members: BTreeMap<NodeId, &str> = [(1, "n1"), (2, "n2"), (3, "n3")].into();
        let none: BTreeMap<NodeId, &str> = BTreeMap::new();
        type Case = (&'static str, RaftRpc, NodeId, &'static str, bool, bool);
        // (what, request, claimed sender, certificate, receiver has joined, admitted)
        let cases: Vec<Case> = vec![
            ("a member votes", vote_req(2), 2, "n2", true, true),
            ("a member leads", append(3), 3, "n3", true, true),
            ("a member renews", renew(), 2, "n2", true, true),
            ("a stranger votes", vote_req(4), 4, "n4", true, false),
            ("a stranger appends", append(4), 4, "n4", true, false),
            ("a stranger renews", renew(), 4, "n4", true, false),
            (
                "a stranger proposes",
                RaftRpc::Leaving,
                4,
                "n4",
                true,
                false,
            ),
            (
                "a stranger asks who we are",
                RaftRpc::Describe,
                4,
                "n4",
                true,
                true,
            ),
            (
                "a member's id with another cert",
                vote_req(2),
                2,
                "n4",
                true,
                false,
            ),
            ("another member's vote", vote_req(3), 2, "n2", true, false),
            (
                "the join: entries to a new node",
                append(1),
                1,
                "n1",
                false,
                true,
            ),
            ("a vote to a new node", vote_req(1), 1, "n1", false, false),
            (
                "a node RPC to a new node",
                RaftRpc::Leaving,
                1,
                "n1",
                false,
                false,
            ),
        ];
        for (what, rpc, from, cert, joined, admitted) in cases {
            let m = if joined { &members } else { &none };
            assert_eq!(
                admit(&rpc, from, cert, m, !joined).is_ok(),
                admitted,
                "{what}"
            );
        }
        assert!(matches!(
            admit(&vote_req(4), 4, "n4", &members, false),
            Err(Refusal::NotMember { from: 4, .. })
        ));
        // Found by the fault campaign: a node just added as a learner replays the log from
        // the start, whose membership then predates the leader's (n4's) joining. It takes
        // the leader's entries and snapshot; a voter does not, and nobody takes a stranger's
        // vote.
        assert!(admit(&append(4), 4, "n4", &members, true).is_ok());
        assert!(matches!(
            admit(&append(4), 4, "n4", &members, false),
            Err(Refusal::NotMember { from: 4, .. })
        ));
        assert!(admit(&vote_req(4), 4, "n4", &members, true).is_err());
    }

    #[test]
    fn a_refusal_as_stranger_is_told_from_other_refusals() {
        let text = |r: Refusal| r.to_string();
        let stranger = text(Refusal::NotMember {
            from: 4,
            cert: "n4".into(),
        });
        assert!(is_stranger_refusal(&stranger, 4));
        assert!(
            !is_stranger_refusal(&stranger, 14),
            "another node's refusal"
        );
        assert!(!is_stranger_refusal(&stranger, 1));
        let other = text(Refusal::NotThatNode {
            cert: "n5".into(),
            from: 4,
            member: "n4".into(),
        });
        assert!(!is_stranger_refusal(&other, 4));
        assert!(!is_stranger_refusal("node 4 is not a member", 4));
    }
}
