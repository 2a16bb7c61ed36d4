//! Dialing a peer: one dial per peer, which outlives the callers that give up on it.
//!
//! A node RPC (`QuicNetwork::call`) has a short limit, dialing included. When each caller's
//! limit cut its dial short, a peer whose handshake took longer than that limit could never be
//! reached by those callers, and every caller sent a new first packet. The dial now runs in a
//! task of its own; callers wait on it and leave it running when they give up.
//!
//! The peer here is a real QUIC endpoint with the node PKI, reached through a UDP relay on
//! loopback that can hold back the handshake's packets (QUIC's long-header packets) by a
//! fixed delay: later packets (short headers) pass at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use openraft::raft::AppendEntriesResponse;
use spaced_raft::network::{
    QuicNetwork, RaftReply, RaftRequest, RaftRpc, RpcError, WireReply, abandoned_by_dialer,
};
use spaced_raft::{Member, codec, frame};
use tokio::net::UdpSocket;

mod common;
use common::{dialer, pki_for, tls};

/// The limit of each node RPC in the first test: shorter than the relayed handshake.
const CALL_TTL: Duration = Duration::from_millis(50);
/// What the relay holds back each handshake packet, each way.
const HANDSHAKE_DELAY: Duration = Duration::from_millis(150);

/// What a test peer saw of its incoming connections.
#[derive(Default)]
struct Seen {
    /// Connections accepted.
    accepted: AtomicUsize,
    /// Handshakes the dialer gave up (`abandoned_by_dialer`).
    abandoned: AtomicUsize,
    /// Every other failed handshake's error.
    failed: std::sync::Mutex<Vec<String>>,
}

/// A peer presenting `name`'s certificate on loopback, answering every request at once; and
/// what it saw of its incoming connections.
fn peer(dir: &std::path::Path, name: &str) -> (SocketAddr, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let counted = seen.clone();
    let cfg = tls(dir, name)
        .server_config(spaced_raft::network::transport_config())
        .expect("a server config");
    let ep = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().expect("an address"))
        .expect("a loopback endpoint");
    let addr = ep.local_addr().expect("its address");
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let conn = match incoming.await {
                    Ok(conn) => conn,
                    Err(e) if abandoned_by_dialer(&e) => {
                        counted.abandoned.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    Err(e) => {
                        let mut failed = counted.failed.lock().unwrap_or_else(|p| p.into_inner());
                        failed.push(e.to_string());
                        return;
                    }
                };
                counted.accepted.fetch_add(1, Ordering::SeqCst);
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        let Ok(Some(bytes)) = frame::read_frame(&mut recv, frame::MAX_FRAME).await
                        else {
                            return;
                        };
                        let Ok(_req) = codec::decode::<RaftRequest>(&bytes) else {
                            return;
                        };
                        let reply: WireReply =
                            Ok(RaftReply::Append(AppendEntriesResponse::Success));
                        let Ok(reply) = codec::encode(&reply) else {
                            return;
                        };
                        let _ = frame::write_frame(&mut send, &reply).await;
                        let _ = send.finish();
                        let _ = send.stopped().await;
                    });
                }
            });
        }
    });
    (addr, seen)
}

/// A UDP relay to `server` that delays each QUIC long-header packet (the handshake's) by
/// `delay`, each way, and passes the others at once, while `open`; closed, it drops every
/// packet. Its address is the peer's for the client.
async fn relay(server: SocketAddr, delay: Duration, open: Arc<AtomicBool>) -> SocketAddr {
    let front = Arc::new(
        UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("the relay's front socket"),
    );
    let back = Arc::new(
        UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("the relay's back socket"),
    );
    back.connect(server).await.expect("the relay's back socket");
    let addr = front.local_addr().expect("the relay's address");
    let client = Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
    // How long to hold a packet back, or `None` to drop it.
    let hold = move |packet: &[u8]| {
        if !open.load(Ordering::SeqCst) {
            None
        } else if packet.first().is_some_and(|b| b & 0x80 != 0) {
            Some(delay)
        } else {
            Some(Duration::ZERO)
        }
    };
    {
        let (front, back, client, hold) =
            (front.clone(), back.clone(), client.clone(), hold.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = front.recv_from(&mut buf).await {
                *client.lock().unwrap_or_else(|p| p.into_inner()) = Some(from);
                let packet = buf[..n].to_vec();
                let Some(wait) = hold(&packet) else { continue };
                let back = back.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    let _ = back.send(&packet).await;
                });
            }
        });
    }
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok(n) = back.recv(&mut buf).await {
            let Some(to) = *client.lock().unwrap_or_else(|p| p.into_inner()) else {
                continue;
            };
            let packet = buf[..n].to_vec();
            let Some(wait) = hold(&packet) else { continue };
            let front = front.clone();
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                let _ = front.send_to(&packet, to).await;
            });
        }
    });
    addr
}

fn probe() -> RaftRpc {
    RaftRpc::Append(openraft::raft::AppendEntriesRequest {
        vote: spaced_raft::types::Vote::new_committed(1, 1),
        prev_log_id: None,
        leader_commit: None,
        entries: Vec::new(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_slower_than_each_callers_limit_still_connects() {
    let dir = pki_for(&["n1", "n2"]);
    let (addr, seen) = peer(dir.path(), "n2");
    let slow = relay(addr, HANDSHAKE_DELAY, Arc::new(AtomicBool::new(true))).await;
    let member = Member {
        name: "n2".into(),
        addr: slow.to_string(),
    };
    let net = dialer(dir.path());
    // Callers as a lease renewal makes them: each gives up at CALL_TTL, and the handshake
    // (two delayed flights, 300 ms) is longer. When each caller's limit cut its dial short,
    // none of these was ever answered.
    let started = Instant::now();
    let mut timed_out = 0;
    let answered = loop {
        match net.call(2, &member, probe(), CALL_TTL).await {
            Ok(reply) => break reply,
            Err(RpcError::Timeout { .. }) => timed_out += 1,
            Err(e) => panic!("a call failed otherwise than by its limit: {e}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no call answered in 10 s ({timed_out} timed out): the dial did not outlive its callers"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        matches!(answered, RaftReply::Append(AppendEntriesResponse::Success)),
        "{answered:?}"
    );
    assert!(
        timed_out >= 1,
        "the first call should have given up before the delayed handshake ended"
    );
    // The dial's spare attempts (one every 100 ms while the first had no answer) were given
    // up once it connected, and the peer tells that from a failed handshake.
    let waited = Instant::now();
    while seen.abandoned.load(Ordering::SeqCst) == 0 && waited.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        seen.abandoned.load(Ordering::SeqCst) >= 1,
        "no spare attempt was seen given up"
    );
    let failed = seen.failed.lock().unwrap_or_else(|p| p.into_inner());
    assert!(failed.is_empty(), "handshakes failed otherwise: {failed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_refuses_the_handshake_ends_the_dial_with_its_reason() {
    // The peer presents n3's certificate where n2's is expected: the TLS check refuses it.
    let dir = pki_for(&["n1", "n3"]);
    let (wrong, _) = peer(dir.path(), "n3");
    let member = Member {
        name: "n2".into(),
        addr: wrong.to_string(),
    };
    let net = dialer(dir.path());
    let err = net
        .call(2, &member, probe(), Duration::from_secs(10))
        .await
        .expect_err("a peer with another node's certificate was accepted");
    let text = err.to_string();
    assert!(
        matches!(err, RpcError::Dial { .. }) && !text.contains("timed out"),
        "the refusal should end the dial with its reason, not wait it out: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_silent_across_unanswered_requests_gets_a_fresh_one_beside_it() {
    let dir = pki_for(&["n1", "n2"]);
    let (addr, seen) = peer(dir.path(), "n2");
    let accepted = &seen.accepted;
    let open = Arc::new(AtomicBool::new(true));
    let wire = relay(addr, Duration::ZERO, open.clone()).await;
    let member = Member {
        name: "n2".into(),
        addr: wire.to_string(),
    };
    let net = dialer(dir.path());
    net.call(2, &member, probe(), Duration::from_secs(5))
        .await
        .expect("the peer answers through the open relay");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);

    // A partition shorter than the idle timeout (1 s): the connection outlives it, but after
    // it sends only when QUIC's doubled probe timer fires. Requests go on meanwhile, as a
    // leader's heartbeats do.
    open.store(false, Ordering::SeqCst);
    calls_go_unanswered_for(
        &net,
        &member,
        Duration::from_millis(600),
        Duration::from_millis(20),
    )
    .await;
    open.store(true, Ordering::SeqCst);
    let healed = Instant::now();
    loop {
        if net.call(2, &member, probe(), CALL_TTL).await.is_ok()
            && accepted.load(Ordering::SeqCst) >= 2
        {
            break;
        }
        assert!(
            healed.elapsed() < Duration::from_secs(10),
            "no fresh connection was dialed beside the silent one ({} accepted)",
            accepted.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_path_probe_runs_before_each_attempt_but_the_first_with_the_peers_address() {
    let dir = pki_for(&["n1", "n2"]);
    let (addr, _) = peer(dir.path(), "n2");
    // A relay that drops everything: no attempt is ever answered.
    let wire = relay(addr, Duration::ZERO, Arc::new(AtomicBool::new(false))).await;
    let member = Member {
        name: "n2".into(),
        addr: wire.to_string(),
    };
    let probed: Arc<std::sync::Mutex<Vec<(SocketAddr, Instant)>>> = Arc::default();
    let net = dialer(dir.path()).with_path_probe({
        let probed = probed.clone();
        Arc::new(move |to| {
            probed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((to, Instant::now()));
            Box::pin(async {})
        })
    });
    let started = Instant::now();
    calls_go_unanswered_for(&net, &member, Duration::from_millis(600), Duration::ZERO).await;
    let probed = probed.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert!(
        probed.len() >= 2,
        "the probe ran {} times in 600 ms of unanswered attempts (one every 100 ms)",
        probed.len()
    );
    assert!(
        probed.iter().all(|(to, _)| *to == wire),
        "the probe was given another address than the peer's: {probed:?}"
    );
    // The dial's first attempt goes out at once, without the probe; the second, 100 ms later
    // by the dialer's own clock, runs it first.
    let first = probed[0].1.duration_since(started);
    assert!(
        first >= Duration::from_millis(90),
        "the probe ran {first:?} after the dial began: before its first attempt"
    );
}

/// Calls `member` (node 2) for `during`, `pause` apart (none: back to back), each of which must time out: the relay
/// in front of it is closed.
async fn calls_go_unanswered_for(
    net: &QuicNetwork,
    member: &Member,
    during: Duration,
    pause: Duration,
) {
    let began = Instant::now();
    while began.elapsed() < during {
        let reply = net.call(2, member, probe(), CALL_TTL).await;
        assert!(
            matches!(reply, Err(RpcError::Timeout { .. })),
            "answered through a closed relay: {reply:?}"
        );
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
}
