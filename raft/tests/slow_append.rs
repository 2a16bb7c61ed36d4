//! An append that carries entries gets more time than a heartbeat.
//!
//! openraft gives every append the heartbeat interval (25 ms by default) as its time limit. A
//! follower answers an append of a batch only once it has fsynced it, and on a loaded host
//! that takes longer: each append given up on ended the replication stream, the batch was
//! sent again, and the writes waiting for it stalled (hundreds of such errors a minute at
//! 8,000 writes/s on 2 cores, and half the throughput). `QuicNetwork::with_append_timeout`
//! gives appends with entries a longer limit; heartbeats keep the short one.
//!
//! The follower here is a real QUIC endpoint with the node PKI that answers every append after
//! `FOLLOWER_DELAY`, over the wire format the nodes speak.

use std::time::{Duration, Instant};

use openraft::entry::RaftEntry;
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};
use spaced_fabric::Command;
use spaced_raft::network::{QuicNetwork, RaftReply, RaftRequest, RaftRpc, WireReply};

mod common;
use common::{dialer, pki_for, tls};
use spaced_raft::types::{Entry, Vote};
use spaced_raft::{Member, TypeConfig, codec, frame};

/// How long the follower takes to answer an append: longer than the heartbeat interval.
const FOLLOWER_DELAY: Duration = Duration::from_millis(80);
/// openraft's limit for an append: the heartbeat interval of the default timings.
const HEARTBEAT: Duration = Duration::from_millis(25);
/// The longer limit for appends with entries (the default election timeout's upper end).
const APPEND_LIMIT: Duration = Duration::from_millis(400);

/// A follower "n2" on loopback answering every append with success after `FOLLOWER_DELAY`.
fn slow_follower(dir: &std::path::Path) -> std::net::SocketAddr {
    let cfg = tls(dir, "n2")
        .server_config(spaced_raft::network::transport_config())
        .unwrap();
    let ep = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = ep.local_addr().unwrap();
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        let Ok(Some(bytes)) = frame::read_frame(&mut recv, frame::MAX_FRAME).await
                        else {
                            return;
                        };
                        let req: RaftRequest = codec::decode(&bytes).unwrap();
                        assert!(matches!(req.rpc, RaftRpc::Append(_)), "{:?}", req.rpc);
                        tokio::time::sleep(FOLLOWER_DELAY).await;
                        let reply: WireReply =
                            Ok(RaftReply::Append(AppendEntriesResponse::Success));
                        let _ =
                            frame::write_frame(&mut send, &codec::encode(&reply).unwrap()).await;
                        let _ = send.finish();
                        let _ = send.stopped().await;
                    });
                }
            });
        }
    });
    addr
}

fn append(entries: u64) -> AppendEntriesRequest<TypeConfig> {
    let leader = openraft::impls::leader_id_adv::LeaderId {
        term: 1,
        node_id: 1,
    };
    AppendEntriesRequest {
        vote: Vote::new_committed(1, 1),
        prev_log_id: None,
        leader_commit: None,
        entries: (1..=entries)
            .map(|i| {
                Entry::new_normal(
                    openraft::LogId::new(leader, i),
                    Command::Probe {
                        bytes: vec![0; 1_280],
                    },
                )
            })
            .collect(),
    }
}

/// The time `net` gives an append of `entries` entries to the slow follower, and its outcome.
async fn send(
    net: &mut QuicNetwork,
    follower: &Member,
    entries: u64,
) -> (Duration, Result<(), String>) {
    let mut peer = net.new_client(2, follower).await;
    let started = Instant::now();
    let res = peer
        .append_entries(append(entries), RPCOption::new(HEARTBEAT))
        .await;
    (
        started.elapsed(),
        res.map(|r| assert!(matches!(r, AppendEntriesResponse::Success)))
            .map_err(|e| e.to_string()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_with_entries_wait_for_a_slow_follower_and_heartbeats_do_not() {
    let dir = pki_for(&["n1", "n2"]);
    let addr = slow_follower(dir.path());
    let follower = Member {
        name: "n2".into(),
        addr: addr.to_string(),
    };
    let client = || dialer(dir.path());

    // Without the longer limit (openraft's alone), the batch is given up on at 25 ms.
    let mut plain = client();
    // Dial first, so the handshake does not count against the limits below.
    let _ = send(&mut plain, &follower, 0).await;
    let (_, res) = send(&mut plain, &follower, 100).await;
    let err = res.expect_err("a follower slower than the heartbeat answered within it");
    assert!(err.contains("no reply within 25ms"), "{err}");

    // With it, the batch is answered.
    let mut patient = client().with_append_timeout(APPEND_LIMIT);
    let _ = send(&mut patient, &follower, 0).await;
    let (took, res) = send(&mut patient, &follower, 100).await;
    res.expect("an append of entries given the longer limit");
    assert!(took >= FOLLOWER_DELAY, "answered in {took:?}");

    // A heartbeat (no entries) keeps openraft's limit: a silent follower is noticed as soon.
    let (took, res) = send(&mut patient, &follower, 0).await;
    let err = res.expect_err("a heartbeat waited past the heartbeat interval");
    assert!(err.contains("no reply within 25ms"), "{err}");
    assert!(took < FOLLOWER_DELAY, "the heartbeat took {took:?}");
}
