//! In-process clusters of real nodes on 127.0.0.1: election, replication, restarts, snapshots,
//! membership, leader transfer, and refusal of foreign or lying peers and garbage frames.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use openraft::async_runtime::WatchReceiver;
use spaced_fabric::Command;
use spaced_node::admin::{AdminReply, AdminRequest};
use spaced_node::ops::config::RaftTimings;
use spaced_raft::Member;
use spaced_raft::network::transport_config;
use spaced_raft::network::{QuicNetwork, RaftReply, RaftRpc};
use spaced_raft::pki::{self, ALPN_ADMIN, ALPN_RAFT, NODE_DOMAIN, TlsMaterial, TlsPaths};
use spaced_tests::{Cluster, devices, without_device_state};

const T: Duration = Duration::from_secs(20);

/// Sends `req` to the leader and fails unless it answers `Done`.
async fn expect_done(
    admin: &mut spaced_node::admin::client::AdminClient,
    req: &AdminRequest,
    what: &str,
) -> Result<()> {
    match admin.call_leader(req).await? {
        AdminReply::Done => Ok(()),
        other => bail!("{what}: {other:?}"),
    }
}

/// Removes node `victim` by name through the leader, then stops it.
async fn remove_and_stop(
    c: &mut Cluster,
    admin: &mut spaced_node::admin::client::AdminClient,
    victim: u64,
) -> Result<()> {
    let remove = AdminRequest::RemoveNode(format!("n{victim}"));
    match admin.call_leader(&remove).await? {
        // The node was running: its certificate was read and revoked.
        AdminReply::NodeRemoved { revoked: Some(_) } => {}
        other => bail!("remove: {other:?}"),
    }
    c.stop_node(victim).await;
    Ok(())
}

/// The Raft timings before the faster default profile (heartbeat 50 ms, elections
/// 200–400 ms): in-process clusters of a debug build, many tests at once on two cores,
/// elect again under the faster ones now and then, and these tests are not about election
/// times (the lab tests and the benches run the defaults with real processes).
fn timings() -> RaftTimings {
    RaftTimings {
        heartbeat_interval_ms: 50,
        election_timeout_min_ms: 200,
        election_timeout_max_ms: 400,
        ..RaftTimings::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_one_leader_and_agree() -> Result<()> {
    let mut c = Cluster::start(3, timings()).await?;
    let leader = c.wait_leader(T).await?;
    let leaders: Vec<_> = c
        .nodes
        .values()
        .filter(|n| n.raft().is_leader())
        .map(|n| n.id())
        .collect();
    assert_eq!(leaders, vec![leader]);
    let terms: BTreeSet<u64> = c
        .nodes
        .values()
        .map(|n| n.raft().metrics().borrow_watched().current_term)
        .collect();
    assert_eq!(terms.len(), 1, "nodes disagree on the term: {terms:?}");
    let s = c.admin(2).await?.status().await?;
    assert_eq!(s.leader, Some(leader));
    assert_eq!(s.nodes.len(), 3);
    assert!(
        s.nodes.iter().all(|n| n.voter),
        "all three should be voters: {s:?}"
    );
    assert!(
        s.nodes
            .iter()
            .all(|n| n.roles == vec!["app".to_string(), "ha".to_string()]),
        "{s:?}"
    );
    c.stop_all().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicates_10k_commands_to_every_node() -> Result<()> {
    let mut c = Cluster::start(3, timings()).await?;
    let leader = c.wait_leader(T).await?;
    let node = &c.nodes[&leader];
    // 10,000 separate commands, 64 in flight at a time.
    let all = devices("r", 10_000);
    let mut chunks = all
        .chunks(10_000 / 64 + 1)
        .map(|c| c.to_vec())
        .collect::<Vec<_>>();
    let mut tasks = Vec::new();
    let propose = Arc::new(node.proposer());
    for chunk in chunks.drain(..) {
        let p = propose.clone();
        tasks.push(tokio::spawn(async move {
            for d in chunk {
                p.propose(Command::AddDevices {
                    devices: vec![d],
                    at: 1,
                })
                .await
                .map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(())
        }));
    }
    for t in tasks {
        t.await?.map_err(anyhow::Error::msg)?;
    }
    let reference = c.agreed_fabric(T).await?;
    assert_eq!(reference.devices.len(), 10_000);
    // And through the admin API of a follower.
    let follower = *c.nodes.keys().find(|k| **k != leader).context("follower")?;
    match c
        .admin(follower)
        .await?
        .call(&AdminRequest::ListDevices)
        .await?
    {
        AdminReply::Devices(d) => assert_eq!(d.len(), 10_000),
        other => bail!("unexpected {other:?}"),
    }
    c.stop_all().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_cluster_restart_resumes_from_disk() -> Result<()> {
    let mut c = Cluster::start(3, timings()).await?;
    let mut admin = c.admin(1).await?;
    for batch in devices("p", 500).chunks(50) {
        match admin
            .call_leader(&AdminRequest::AddDevices(batch.to_vec()))
            .await?
        {
            AdminReply::Applied(_) => {}
            other => bail!("unexpected {other:?}"),
        }
    }
    admin.close().await;
    c.wait_converged(T).await?;
    let before = without_device_state(c.fabric_of(1)).context("fabric")?;
    c.stop_all().await;
    for id in 1..=3 {
        c.start_node(id, false).await?;
    }
    c.wait_leader(T).await?;
    c.wait_for(T, "every node re-applied its log", |c| {
        (1..=3).all(|id| without_device_state(c.fabric_of(id)).is_some_and(|f| f == before))
    })
    .await?;
    // Writable again.
    let mut admin = c.admin(2).await?;
    match admin
        .call_leader(&AdminRequest::AddDevices(devices("after", 1)))
        .await?
    {
        AdminReply::Applied(_) => {}
        other => bail!("unexpected {other:?}"),
    }
    admin.close().await;
    c.stop_all().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_is_refused_on_a_used_data_dir() -> Result<()> {
    let mut c = Cluster::start(1, timings()).await?;
    c.stop_all().await;
    let err = match c.start_node(1, true).await {
        Ok(()) => bail!("bootstrap on a used data dir was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("--bootstrap refused") && err.contains("data_dir"),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_added_after_snapshot_installs_it() -> Result<()> {
    let t = RaftTimings {
        snapshot_after_logs: 200,
        logs_kept_after_snapshot: 10,
        ..timings()
    };
    let mut c = Cluster::start(3, t).await?;
    let leader = c.wait_leader(T).await?;
    let p = c.nodes[&leader].proposer();
    for d in devices("s", 1000) {
        p.propose(Command::AddDevices {
            devices: vec![d],
            at: 1,
        })
        .await
        .map_err(anyhow::Error::msg)?;
    }
    c.wait_for(T, "leader purged logs behind a snapshot", |c| {
        c.nodes[&leader]
            .raft()
            .metrics()
            .borrow_watched()
            .purged
            .is_some()
    })
    .await?;
    let purged = c.nodes[&leader]
        .raft()
        .metrics()
        .borrow_watched()
        .purged
        .map(|l| l.index)
        .context("purged")?;
    c.start_node(4, false).await?;
    c.add_node(4).await?;
    c.wait_converged(T).await?;
    // Entries up to `purged` no longer exist as log: node 4 can only have them from the snapshot.
    let snap = c.nodes[&4]
        .raft()
        .metrics()
        .borrow_watched()
        .snapshot
        .map(|l| l.index)
        .context("node 4 has no snapshot")?;
    assert!(
        snap >= purged,
        "node 4 snapshot {snap} < leader purged {purged}"
    );
    assert_eq!(c.agreed_fabric(T).await?.devices.len(), 1000);
    c.stop_all().await;
    Ok(())
}

/// Removing the leader itself: it hands leadership to another voter first, and the new leader
/// carries the removal out (fabric record, certificate). A leader that removed itself could
/// commit nothing more once its followers applied the new membership (they refuse a node
/// that is not a member), so its removal from the fabric and the revocation of its
/// certificate never came, and the request hung until the client gave up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_the_leader_hands_leadership_over_first() -> Result<()> {
    let mut c = Cluster::start(3, timings()).await?;
    let leader = c.wait_leader(T).await?;
    let mut admin = c.admin(leader).await?;
    remove_and_stop(&mut c, &mut admin, leader).await?;
    let next = c.wait_leader(T).await?;
    assert_ne!(next, leader);
    // The client went back to the node it was made for, which is gone now.
    let mut admin = c.admin(next).await?;
    let s = admin.status().await?;
    let ids: BTreeSet<u64> = s.nodes.iter().map(|n| n.id).collect();
    assert!(!ids.contains(&leader), "removed leader still listed: {s:?}");
    assert_eq!(ids.len(), 2);
    for id in c.nodes.keys() {
        assert!(
            c.fabric_of(*id)
                .is_some_and(|f| !f.nodes.contains_key(&leader)),
            "node {id}'s fabric still lists the removed leader {leader}"
        );
    }
    match admin
        .call_leader(&AdminRequest::AddDevices(devices("rml", 3)))
        .await?
    {
        AdminReply::Applied(_) => {}
        other => bail!("write after removing the leader: {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_node_and_transfer_leadership() -> Result<()> {
    let mut c = Cluster::start(3, timings()).await?;
    let leader = c.wait_leader(T).await?;
    let mut admin = c.admin(leader).await?;

    // Transfer to a follower.
    let to = *c.nodes.keys().find(|k| **k != leader).context("follower")?;
    expect_done(
        &mut admin,
        &AdminRequest::TransferLeader(format!("n{to}")),
        "transfer",
    )
    .await?;
    c.wait_for(T, "all nodes follow the new leader", |c| {
        c.agreed_leader() == Some(to)
    })
    .await?;

    // Remove the third node by name.
    let victim = *c
        .nodes
        .keys()
        .find(|k| **k != leader && **k != to)
        .context("third node")?;
    remove_and_stop(&mut c, &mut admin, victim).await?;
    let s = admin.status().await?;
    let ids: BTreeSet<u64> = s.nodes.iter().map(|n| n.id).collect();
    assert!(!ids.contains(&victim), "removed node still listed: {s:?}");
    assert_eq!(ids.len(), 2);
    assert!(
        c.fabric_of(to)
            .is_some_and(|f| !f.nodes.contains_key(&victim))
    );
    // The two remaining nodes still commit.
    match admin
        .call_leader(&AdminRequest::AddDevices(devices("rm", 3)))
        .await?
    {
        AdminReply::Applied(_) => {}
        other => bail!("write after remove: {other:?}"),
    }
    // Unknown targets are refused with a clear message.
    match admin
        .call_leader(&AdminRequest::TransferLeader("n42".into()))
        .await?
    {
        AdminReply::Failed(e) => assert!(e.contains("n42"), "{e}"),
        other => bail!("transfer to unknown node: {other:?}"),
    }
    admin.close().await;
    c.stop_all().await;
    Ok(())
}

/// A QUIC client endpoint presenting the given certificate.
fn client(
    pki_dir: &std::path::Path,
    ca_dir: &std::path::Path,
    cert: &str,
    alpn: &[u8],
) -> Result<(quinn::Endpoint, quinn::ClientConfig)> {
    let m = TlsMaterial::load(&TlsPaths {
        ca: ca_dir.join("ca.pem"),
        cert: pki_dir.join(format!("{cert}.pem")),
        key: pki_dir.join(format!("{cert}.key")),
    })?;
    let cfg = m.client_config(alpn, transport_config())?;
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    Ok((ep, cfg))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_ca_and_lying_peers_are_refused() -> Result<()> {
    let mut c = Cluster::start(3, timings()).await?;
    let leader = c.wait_leader(T).await?;
    let addr = c.nodes[&1].listen_addr();

    // A node certificate from another CA: the handshake fails.
    let foreign = c.dir.path().join("foreign");
    pki::init_ca(&foreign)?;
    pki::issue(&foreign, "n2", false)?;
    let (ep, cfg) = client(&foreign, &foreign, "n2", ALPN_RAFT)?;
    let conn = ep
        .connect_with(cfg, addr, &format!("n1.{NODE_DOMAIN}"))?
        .await;
    let refused = match conn {
        Err(_) => true,
        // TLS 1.3: the client may finish before the server rejects its certificate.
        Ok(conn) => match conn.open_bi().await {
            Err(_) => true,
            Ok((mut s, mut r)) => {
                let _ = s.write_all(b"\0\0\0\x01x").await;
                let _ = s.finish();
                r.read_to_end(1024).await.is_err()
            }
        },
    };
    assert!(refused, "a certificate from a foreign CA was accepted");

    // A valid node certificate (n4, unknown to the cluster) that claims to be node 2.
    let pki_dir = c.pki_dir();
    let (ep, cfg) = client(&pki_dir, &pki_dir, "n4", ALPN_RAFT)?;
    let net = QuicNetwork::new(2, ep.clone(), cfg);
    let n1 = Member {
        name: "n1".into(),
        addr: addr.to_string(),
    };
    let vote = c.nodes[&1].raft().metrics().borrow_watched().vote;
    let mut fake = vote;
    fake.leader_id.node_id = 2;
    fake.leader_id.term += 5;
    let req = openraft::raft::VoteRequest::<spaced_raft::TypeConfig>::new(fake, None);
    let err = net
        .call(1, &n1, RaftRpc::Vote(req), Duration::from_secs(3))
        .await
        .expect_err("lying vote accepted")
        .to_string();
    assert!(err.contains("certificate names \"n4\""), "{err}");
    // The lie taints every request from that claim, even harmless ones...
    assert!(
        net.call(1, &n1, RaftRpc::Describe, Duration::from_secs(3))
            .await
            .is_err()
    );
    // ...while the same certificate, honest about its id, is served.
    let honest = QuicNetwork::new(
        4,
        ep.clone(),
        client(&pki_dir, &pki_dir, "n4", ALPN_RAFT)?.1,
    );
    match honest
        .call(1, &n1, RaftRpc::Describe, Duration::from_secs(3))
        .await
    {
        Ok(RaftReply::Describe(d)) => assert_eq!(d.name, "n1"),
        other => bail!("describe: {other:?}"),
    }

    // A peer that never answers (a UDP port that swallows the handshake) costs a call its
    // time limit, dialing included, not the 2 s connect timeout: the leader asks every voter
    // about leases with 100 ms calls, and a dead voter used to hold a VIP move up for seconds.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let nobody = Member {
        name: "n9".into(),
        addr: silent.local_addr()?.to_string(),
    };
    let err = honest
        .call(9, &nobody, RaftRpc::Describe, Duration::from_millis(100))
        .await
        .expect_err("a silent peer answered")
        .to_string();
    assert!(err.contains("no reply within 100ms"), "{err}");

    // A node or a spacectl of another protocol version is refused at the handshake, told why.
    let older = QuicNetwork::new(
        4,
        ep.clone(),
        client(&pki_dir, &pki_dir, "n4", b"spaced-raft/1")?.1,
    );
    let err = older
        .call(1, &n1, RaftRpc::Describe, Duration::from_secs(3))
        .await
        .expect_err("a node of another protocol version was served")
        .to_string();
    assert!(err.contains("another spaced build"), "{err}");
    let (ep_old, cfg_old) = client(&pki_dir, &pki_dir, "admin-test", b"spaced-admin/2")?;
    let refused = ep_old
        .connect_with(cfg_old, addr, NODE_DOMAIN)?
        .await
        .expect_err("a spacectl of another protocol version was served");
    assert!(pki::is_protocol_mismatch(&refused), "{refused:?}");

    // A node certificate on the admin protocol, and an admin certificate on the Raft protocol.
    let (ep2, cfg2) = client(&pki_dir, &pki_dir, "n4", ALPN_ADMIN)?;
    let conn = ep2.connect_with(cfg2, addr, NODE_DOMAIN)?.await?;
    let res = async {
        let (mut s, mut r) = conn.open_bi().await?;
        s.write_all(b"\0\0\0\x01\0").await?;
        s.finish()?;
        Ok::<_, anyhow::Error>(r.read_to_end(1 << 20).await?)
    }
    .await;
    assert!(
        res.is_err(),
        "node certificate was accepted for admin requests"
    );

    // The cluster is unharmed: same leader, still committing.
    assert_eq!(c.wait_leader(T).await?, leader);
    c.nodes[&leader]
        .propose(Command::AddDevices {
            devices: devices("ok", 1),
            at: 1,
        })
        .await
        .map_err(anyhow::Error::msg)?;
    c.stop_all().await;
    Ok(())
}

/// A certificate the cluster CA issued to a node that is not a member (never added, or
/// removed) can ask who a node is, and nothing else: its votes and entries of a higher term are
/// refused before Raft sees them, so it can neither depose the leader nor replace the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_is_not_a_member_cannot_vote_or_lead() -> Result<()> {
    let mut c = Cluster::start(3, timings()).await?;
    let leader = c.wait_leader(T).await?;
    let target = (1..=3).find(|id| *id != leader).context("a follower")?;
    let addr = c.nodes[&target].listen_addr();
    let member = Member {
        name: format!("n{target}"),
        addr: addr.to_string(),
    };
    let pki_dir = c.pki_dir();
    let (ep, cfg) = client(&pki_dir, &pki_dir, "n4", ALPN_RAFT)?;
    let stranger = QuicNetwork::new(4, ep.clone(), cfg);
    let before = c.nodes[&target].raft().metrics().borrow_watched().vote;
    let mut vote = before;
    vote.leader_id.node_id = 4;
    vote.leader_id.term += 10;
    let req = openraft::raft::VoteRequest::<spaced_raft::TypeConfig>::new(vote, None);
    let err = stranger
        .call(target, &member, RaftRpc::Vote(req), Duration::from_secs(3))
        .await
        .expect_err("a stranger's vote was taken")
        .to_string();
    assert!(err.contains("not a member"), "{err}");
    let mut lead = vote;
    lead.committed = true;
    let append = openraft::raft::AppendEntriesRequest::<spaced_raft::TypeConfig> {
        vote: lead,
        prev_log_id: None,
        entries: Vec::new(),
        leader_commit: None,
    };
    let err = stranger
        .call(
            target,
            &member,
            RaftRpc::Append(append),
            Duration::from_secs(3),
        )
        .await
        .expect_err("a stranger's entries were taken")
        .to_string();
    assert!(err.contains("not a member"), "{err}");
    let err = stranger
        .call(target, &member, RaftRpc::Leaving, Duration::from_secs(3))
        .await
        .expect_err("a stranger's node RPC was served")
        .to_string();
    assert!(err.contains("not a member"), "{err}");
    // Nothing changed: same term, same leader.
    let after = c.nodes[&target].raft().metrics().borrow_watched().vote;
    assert_eq!(
        after.leader_id.term, before.leader_id.term,
        "the term was raised"
    );
    assert_eq!(c.wait_leader(T).await?, leader);
    // Asking who a node is stays open (the leader asks a node before it adds it).
    match stranger
        .call(target, &member, RaftRpc::Describe, Duration::from_secs(3))
        .await
    {
        Ok(RaftReply::Describe(d)) => assert_eq!(d.id, target),
        other => bail!("describe: {other:?}"),
    }
    ep.close(0u32.into(), b"done");
    c.stop_all().await;
    Ok(())
}

/// Every node of a cluster must count leases alike: an owner with longer leases than the
/// leader's silence assumes could keep a VIP after it was granted elsewhere. `node add`
/// refuses a node with other `[lease]` settings, and a voter refuses renewals and silence
/// questions carrying other terms than its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_other_lease_terms_is_refused() -> Result<()> {
    let mut c = Cluster::start(3, timings()).await?;
    let mut cfg = spaced_tests::node_config(c.dir.path(), &c.pki_dir(), 4, timings());
    cfg.lease.duration_ms = 600;
    c.configs.insert(4, cfg);
    c.start_node(4, false).await?;
    let err = c
        .add_node(4)
        .await
        .expect_err("a node with longer leases was added")
        .to_string();
    assert!(err.contains("counts leases with lease 600 ms"), "{err}");
    c.stop_node(4).await;
    let leader = c.wait_leader(T).await?;
    let s = c.admin(leader).await?.status().await?;
    assert_eq!(s.nodes.len(), 3, "{s:?}");

    // A member's renewal with other terms (as a node started with other settings would send).
    let target = (1..=3).find(|id| *id != 2).context("a node")?;
    let member = Member {
        name: format!("n{target}"),
        addr: c.nodes[&target].listen_addr().to_string(),
    };
    let pki_dir = c.pki_dir();
    let (ep, cfg) = client(&pki_dir, &pki_dir, "n2", ALPN_RAFT)?;
    let n2 = QuicNetwork::new(2, ep.clone(), cfg);
    let terms = spaced_raft::network::LeaseTerms {
        duration_ms: 600,
        renew_every_ms: 75,
        margin_ms: 50,
        drift_ppm: 10_000,
    };
    for rpc in [
        RaftRpc::Renew {
            held: Vec::new(),
            terms,
        },
        RaftRpc::Silence {
            keys: Vec::new(),
            terms,
        },
    ] {
        let err = n2
            .call(target, &member, rpc, Duration::from_secs(3))
            .await
            .expect_err("other lease terms were answered")
            .to_string();
        assert!(err.contains("lease terms differ"), "{err}");
    }
    ep.close(0u32.into(), b"done");
    c.stop_all().await;
    Ok(())
}

/// A follower judges no node's proposal with its own fabric, which may lag the leader's (a
/// fence guard's release refused by a follower that had only just restarted left the
/// placement to wait out its lease): it says who leads, so the proposer asks the leader,
/// which judges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_leaves_a_nodes_proposal_to_the_leader() -> Result<()> {
    let mut c = Cluster::start(3, timings()).await?;
    let leader = c.wait_leader(T).await?;
    let follower = (1..=3).find(|id| *id != leader).context("a follower")?;
    let me = (1..=3)
        .find(|id| *id != leader && *id != follower)
        .context("a third node")?;
    let member = |id: u64| Member {
        name: format!("n{id}"),
        addr: c.nodes[&id].listen_addr().to_string(),
    };
    let pki_dir = c.pki_dir();
    let (ep, cfg) = client(&pki_dir, &pki_dir, &format!("n{me}"), ALPN_RAFT)?;
    let net = QuicNetwork::new(me, ep.clone(), cfg);
    // A release of a placement this node does not hold: not a node's to propose.
    let cmd = Command::ReleasePlacement {
        name: "nothing".into(),
        epoch: 1,
    };
    let to_follower = net
        .call(
            follower,
            &member(follower),
            RaftRpc::Propose(cmd.clone()),
            Duration::from_secs(3),
        )
        .await;
    let err = format!("{to_follower:?}");
    assert!(err.contains("not the leader"), "{err}");
    let to_leader = net
        .call(
            leader,
            &member(leader),
            RaftRpc::Propose(cmd),
            Duration::from_secs(3),
        )
        .await;
    let err = format!("{to_leader:?}");
    assert!(err.contains("proposes only its own"), "{err}");
    ep.close(0u32.into(), b"done");
    c.stop_all().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_garbage_frames_close_only_that_stream() -> Result<()> {
    let mut c = Cluster::start(3, timings()).await?;
    let leader = c.wait_leader(T).await?;
    let addr = c.nodes[&1].listen_addr();
    let pki_dir = c.pki_dir();
    let (ep, cfg) = client(&pki_dir, &pki_dir, "n5", ALPN_RAFT)?;
    let conn = ep
        .connect_with(cfg, addr, &format!("n1.{NODE_DOMAIN}"))?
        .await?;

    // 1 GiB announced: the node must refuse without waiting for (or allocating) the bytes.
    let (mut s, mut r) = conn.open_bi().await?;
    s.write_all(&(1u32 << 30).to_be_bytes()).await?;
    let got = tokio::time::timeout(Duration::from_secs(5), r.read_to_end(1024))
        .await
        .context("stream left hanging")?;
    assert!(
        got.is_err() || got.is_ok_and(|b| b.is_empty()),
        "oversized frame got a reply"
    );

    // Garbage that is not a request.
    let (mut s, mut r) = conn.open_bi().await?;
    s.write_all(&[0, 0, 0, 8, 0xff, 0xfe, 0xfd, 0xfc, 0xfb, 0xfa, 0xf9, 0xf8])
        .await?;
    s.finish()?;
    let got = tokio::time::timeout(Duration::from_secs(5), r.read_to_end(1024))
        .await
        .context("stream left hanging")?;
    assert!(
        got.is_err() || got.is_ok_and(|b| b.is_empty()),
        "garbage frame got a reply"
    );

    // The same connection still serves a proper request.
    let (mut s, mut r) = conn.open_bi().await?;
    let req = spaced_raft::network::RaftRequest {
        from: 5,
        rpc: RaftRpc::Describe,
    };
    let bytes = spaced_raft::codec::encode(&req)?;
    spaced_raft::frame::write_frame(&mut s, &bytes).await?;
    s.finish()?;
    let reply = spaced_raft::frame::read_frame(&mut r, 1 << 20)
        .await?
        .context("no reply")?;
    let reply: spaced_raft::network::WireReply = spaced_raft::codec::decode(&reply)?;
    assert!(matches!(reply, Ok(RaftReply::Describe(_))), "{reply:?}");

    // A member announcing a snapshot over the cap is refused before a byte of it is read.
    let (ep2, cfg2) = client(&pki_dir, &pki_dir, "n2", ALPN_RAFT)?;
    let member = ep2
        .connect_with(cfg2, addr, &format!("n1.{NODE_DOMAIN}"))?
        .await?;
    let (mut s, mut r) = member.open_bi().await?;
    let req = spaced_raft::network::RaftRequest {
        from: 2,
        rpc: RaftRpc::Snapshot {
            vote: openraft::Vote::new(1, 2),
            meta: Default::default(),
            len: 1 << 40,
        },
    };
    spaced_raft::frame::write_frame(&mut s, &spaced_raft::codec::encode(&req)?).await?;
    // The stream is closed without a reply (the refusal is the node's log line); no byte of
    // the announced terabyte was awaited, so it closes at once.
    let got = tokio::time::timeout(
        Duration::from_secs(5),
        spaced_raft::frame::read_frame(&mut r, 1 << 20),
    )
    .await
    .context("a huge snapshot left the stream hanging")?;
    assert!(
        got.is_err() || got.as_ref().is_ok_and(|f| f.is_none()),
        "a huge snapshot got a reply: {got:?}"
    );

    // At most 1024 streams open at once per connection (the refused snapshot's may still
    // count): opening more waits for one to close, instead of costing the node memory.
    let mut open = Vec::new();
    while open.len() < 1100 {
        match tokio::time::timeout(Duration::from_millis(500), member.open_bi()).await {
            Ok(stream) => open.push(stream?),
            Err(_) => break,
        }
    }
    assert!(
        (1000..=1024).contains(&open.len()),
        "{} streams opened at once",
        open.len()
    );
    drop(open);
    member.close(0u32.into(), b"done");

    // Garbage on the admin protocol gets an error reply, not a crash.
    let mut admin = c.admin(1).await?;
    assert!(admin.status().await.is_ok());
    c.nodes[&leader]
        .propose(Command::AddDevices {
            devices: devices("g", 1),
            at: 1,
        })
        .await
        .map_err(anyhow::Error::msg)?;
    admin.close().await;
    c.stop_all().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_commands_are_refused_and_change_nothing() -> Result<()> {
    let mut c = Cluster::start(3, timings()).await?;
    c.wait_leader(T).await?;
    let mut admin = c.admin(3).await?;
    match admin
        .call_leader(&AdminRequest::AddDevices(devices("x", 5)))
        .await?
    {
        AdminReply::Applied(_) => {}
        other => bail!("{other:?}"),
    }
    let before = c.fabric_of(1);
    // One duplicate in a batch: refused, nothing of the batch applied.
    let mut batch = devices("y", 3);
    batch.extend(devices("x", 1));
    match admin.call_leader(&AdminRequest::AddDevices(batch)).await? {
        AdminReply::Failed(e) => assert!(e.contains("already exists"), "{e}"),
        other => bail!("duplicate accepted: {other:?}"),
    }
    c.wait_converged(T).await?;
    // The leader's planner assigns the five devices meanwhile: compare what
    // the refused batch could have touched.
    let before = without_device_state(before);
    assert_eq!(without_device_state(c.fabric_of(1)), before);
    assert_eq!(without_device_state(c.fabric_of(2)), before);
    admin.close().await;
    c.stop_all().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixth_node_stays_a_learner() -> Result<()> {
    let mut c = Cluster::start(5, timings()).await?;
    c.start_node(6, false).await?;
    let voter = c.add_node(6).await?;
    assert!(!voter, "a sixth node must join as learner");
    c.wait_converged(T).await?;
    let s = c.admin(6).await?.status().await?;
    let voters: Vec<u64> = s.nodes.iter().filter(|n| n.voter).map(|n| n.id).collect();
    assert_eq!(voters, vec![1, 2, 3, 4, 5], "{s:?}");
    assert!(c.fabric_of(6).is_some_and(|f| f.nodes.len() == 6));
    c.stop_all().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_listening_on_a_wildcard_address_is_known_by_its_advertised_one() -> Result<()> {
    let mut c = Cluster::empty(3, timings())?;
    let mut cfg = spaced_tests::node_config(c.dir.path(), &c.pki_dir(), 1, timings());
    let port = cfg.listen.port();
    cfg.listen = std::net::SocketAddr::from(([0, 0, 0, 0], port));
    cfg.advertise = Some(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    c.configs.insert(1, cfg);
    c.start_node(1, true).await?;
    c.wait_for(T, "node 1 registered", |c| {
        c.fabric_of(1).is_some_and(|f| f.nodes.contains_key(&1))
    })
    .await?;
    let advertised = format!("127.0.0.1:{port}");
    let f = c.fabric_of(1).context("fabric of n1")?;
    assert_eq!(f.nodes[&1].raft_addr, advertised);
    for id in 2..=3 {
        c.start_node(id, false).await?;
        c.add_node(id).await?;
    }
    let mut admin = c.admin(2).await?;
    let s = admin.status().await?;
    let n1 = s.nodes.iter().find(|n| n.id == 1).context("n1 listed")?;
    assert_eq!(n1.addr, advertised, "{s:?}");
    // Another leader reaches n1 at that address: what it commits arrives on n1.
    expect_done(
        &mut admin,
        &AdminRequest::TransferLeader("n2".into()),
        "transfer",
    )
    .await?;
    c.wait_for(T, "all nodes follow n2", |c| c.agreed_leader() == Some(2))
        .await?;
    match admin
        .call_leader(&AdminRequest::AddDevices(devices("adv", 2)))
        .await?
    {
        AdminReply::Applied(_) => {}
        other => bail!("add devices: {other:?}"),
    }
    c.wait_for(T, "n1 applied n2's write", |c| {
        c.fabric_of(1).is_some_and(|f| f.devices.len() == 2)
    })
    .await?;
    c.stop_all().await;
    Ok(())
}

/// A cluster whose first `configured` nodes declare the loopback VIP `cluster`
/// (127.0.0.100, role `ha`); node 1 bootstraps and nodes 2..=`started` join.
async fn loopback_vip_cluster(max: u64, configured: u64, started: u64) -> Result<Cluster> {
    let mut c = Cluster::empty(max, timings())?;
    let port = spaced_tests::free_tcp_port();
    for id in 1..=configured {
        let mut cfg = spaced_tests::node_config(c.dir.path(), &c.pki_dir(), id, timings());
        cfg.takeover = spaced_node::ops::config::TakeoverMode::Loopback;
        cfg.vips = vec![spaced_node::ops::config::VipSection {
            name: "cluster".into(),
            address: "127.0.0.100/8".into(),
            interface: "lo".into(),
            roles: vec!["ha".into()],
            port: Some(port),
        }];
        c.configs.insert(id, cfg);
    }
    c.start_node(1, true).await?;
    c.wait_for(T, "node 1 registered", |c| {
        c.fabric_of(1).is_some_and(|f| f.nodes.contains_key(&1))
    })
    .await?;
    for id in 2..=started {
        c.start_node(id, false).await?;
        c.add_node(id).await?;
    }
    Ok(c)
}

/// The owner and epoch of the VIP `cluster` in node 1's fabric.
fn vip_held(c: &Cluster) -> Option<(Option<spaced_raft::NodeId>, u64)> {
    c.fabric_of(1)
        .and_then(|f| f.placements.get("cluster").map(|p| (p.owner, p.epoch)))
}

/// Day-2 commands: `vip remove` of a held VIP (its owner stops holding it first), `node
/// set-roles`, `device remove` of several ids with one unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_vip_is_removed_roles_set_and_devices_removed() -> Result<()> {
    let mut c = loopback_vip_cluster(3, 3, 3).await?;
    let mut admin = c.admin(1).await?;
    c.wait_for(T, "the VIP placed", |c| {
        vip_held(c).is_some_and(|(o, _)| o.is_some())
    })
    .await?;
    let port = c.configs[&1].vips[0].port.context("port")?;
    let responder = std::net::SocketAddr::from(([127, 0, 0, 100], port));
    // Placed in the fabric comes first; the owner answers once its lease is confirmed and it
    // has taken the VIP up (a moment later on a loaded machine).
    let deadline = tokio::time::Instant::now() + T;
    while tokio::net::TcpStream::connect(responder).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the owner never answered on the VIP"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every node's config declares the VIP, and a node registers it as it starts unless its
    // fabric shows it (a VIP removed before a node saw it is registered again by that node:
    // documented), so the removal waits for every node to have seen it.
    c.wait_for(T, "the VIP in every fabric", |c| {
        (1..=3).all(|id| {
            c.fabric_of(id)
                .is_some_and(|f| f.placements.contains_key("cluster"))
        })
    })
    .await?;
    match admin
        .call_leader(&AdminRequest::VipRemove("cluster".into()))
        .await?
    {
        AdminReply::Done => {}
        other => bail!("vip remove: {other:?}"),
    }
    c.wait_for(T, "the VIP gone from every fabric", |c| {
        (1..=3).all(|id| {
            c.fabric_of(id)
                .is_some_and(|f| !f.placements.contains_key("cluster"))
        })
    })
    .await?;
    let deadline = tokio::time::Instant::now() + T;
    while tokio::net::TcpStream::connect(responder).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "something still answers on the removed VIP"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match admin
        .call_leader(&AdminRequest::VipRemove("cluster".into()))
        .await?
    {
        AdminReply::Failed(e) => assert!(e.contains("no VIP \"cluster\""), "{e}"),
        other => bail!("a second vip remove: {other:?}"),
    }

    let roles = |r: &[&str]| r.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    match admin
        .call_leader(&AdminRequest::SetRoles {
            node: "n2".into(),
            roles: roles(&["db", "app"]),
        })
        .await?
    {
        AdminReply::Done => {}
        other => bail!("set roles: {other:?}"),
    }
    c.wait_converged(T).await?;
    assert_eq!(
        c.fabric_of(1).context("fabric")?.nodes[&2].roles,
        roles(&["db", "app"])
    );
    match admin
        .call_leader(&AdminRequest::SetRoles {
            node: "n2".into(),
            roles: roles(&["bad role"]),
        })
        .await?
    {
        AdminReply::Failed(e) => assert!(e.contains("bad role"), "{e}"),
        other => bail!("a bad role: {other:?}"),
    }

    match admin
        .call_leader(&AdminRequest::AddDevices(devices("rm", 3)))
        .await?
    {
        AdminReply::Applied(_) => {}
        other => bail!("add: {other:?}"),
    }
    match admin
        .call_leader(&AdminRequest::RemoveDevices(vec![
            "rm-0".into(),
            "ghost".into(),
            "rm-2".into(),
        ]))
        .await?
    {
        AdminReply::DevicesRemoved { removed, missing } => {
            assert_eq!(removed, 2);
            assert_eq!(missing, vec!["ghost".to_string()]);
        }
        other => bail!("remove devices: {other:?}"),
    }
    c.wait_converged(T).await?;
    assert_eq!(devices_named(&c, 1, "rm")?, 1);
    admin.close().await;
    c.stop_all().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_vip_stays_put_while_voters_are_added_and_removed() -> Result<()> {
    // Lease renewals and the leader's silence checks need a majority of the old and of the new
    // voter set while a membership change is joint: the owner, renewing all along, keeps its VIP.
    let mut c = loopback_vip_cluster(8, 5, 3).await?;
    let mut admin = c.admin(1).await?;
    // At run time, a VIP none of them could hold (loopback takeover needs a configured port)
    // is refused up front, and nothing is added.
    let add = AdminRequest::VipAdd {
        name: "other".into(),
        address: "127.0.0.101/8".into(),
        interface: "lo".into(),
        roles: vec!["ha".into()],
    };
    let refused = format!("{:?}", admin.call_leader(&add).await);
    assert!(refused.contains("no loopback port"), "{refused}");
    assert!(
        c.fabric_of(1)
            .is_some_and(|f| !f.placements.contains_key("other"))
    );
    let held = vip_held;
    c.wait_for(T, "the VIP placed", |c| {
        held(c).is_some_and(|(o, _)| o.is_some())
    })
    .await?;
    let before = held(&c);
    let owner = before.and_then(|(o, _)| o).context("owner")?;
    for id in 4..=5 {
        c.start_node(id, false).await?;
        assert!(c.add_node(id).await?, "node {id} became a voter");
    }
    let leader = c.wait_leader(T).await?;
    let victim = (1..=5)
        .find(|id| *id != owner && *id != leader)
        .context("a node to remove")?;
    remove_and_stop(&mut c, &mut admin, victim).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        held(&c),
        before,
        "the VIP moved during the membership changes: {:?}",
        c.fabric_of(1).map(|f| f.placements)
    );
    let s = admin.status().await?;
    assert_eq!(s.nodes.iter().filter(|n| n.voter).count(), 4, "{s:?}");
    c.stop_all().await;
    Ok(())
}

/// An admin certificate cannot move a placement's owner, nor the membership, with raw
/// commands: a `Write` of a grant or release would give a VIP to a second node while the first
/// still holds it. Only `vip move` (the owner fences first) moves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_cannot_grant_or_release_a_placement_with_raw_commands() -> Result<()> {
    let mut c = loopback_vip_cluster(3, 3, 3).await?;
    let held = vip_held;
    c.wait_for(T, "the VIP placed", |c| {
        held(c).is_some_and(|(o, _)| o.is_some())
    })
    .await?;
    let (owner, epoch) = held(&c).context("the VIP")?;
    let owner = owner.context("owner")?;
    let other = (1..=3).find(|id| *id != owner).context("another node")?;
    let mut admin = c.admin(1).await?;
    for cmd in [
        Command::GrantPlacement {
            name: "cluster".into(),
            to: other,
            expected_epoch: epoch,
        },
        Command::ReleasePlacement {
            name: "cluster".into(),
            epoch,
        },
        Command::RemoveNode { id: other },
    ] {
        match admin.call_leader(&AdminRequest::Write(cmd.clone())).await? {
            AdminReply::Failed(e) => assert!(e.contains("not an admin operation"), "{e}"),
            reply => bail!("{cmd} through the admin API: {reply:?}"),
        }
    }
    c.wait_converged(T).await?;
    assert_eq!(held(&c), Some((Some(owner), epoch)), "the VIP moved");
    assert!(c.fabric_of(1).is_some_and(|f| f.nodes.contains_key(&other)));
    admin.close().await;
    c.stop_all().await;
    Ok(())
}

/// How many devices whose id starts with `prefix` node `id`'s fabric holds.
fn devices_named(c: &Cluster, id: u64, prefix: &str) -> Result<usize> {
    let fabric = c
        .fabric_of(id)
        .with_context(|| format!("node {id}'s fabric"))?;
    Ok(fabric
        .devices
        .keys()
        .filter(|d| d.starts_with(prefix))
        .count())
}

/// A revoked certificate is refused everywhere: an admin's open connection at its next
/// request, its new connections at the handshake; a removed node's certificate, which `node
/// remove` revokes, cannot even dial a member again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_is_refused_everywhere() -> Result<()> {
    use spaced_node::admin::client::AdminClient;
    use spaced_node::admin::client::AdminCredentials;
    let mut c = Cluster::start(3, timings()).await?;
    let leader = c.wait_leader(T).await?;
    c.wait_converged(T).await?;
    let pki_dir = c.pki_dir();
    // A second admin ("zed" sorts after the test's own "test", which stays the default).
    pki::issue(&pki_dir, "zed", true)?;
    let zed = AdminCredentials::load(&pki_dir, Some("zed"))?;
    let follower = (1..=3).find(|id| *id != leader).context("a follower")?;
    let follower_addr = c.nodes[&follower].advertise_addr().to_string();
    let mut zed_conn = AdminClient::connect(&follower_addr, &zed).await?;
    assert!(matches!(
        zed_conn.call(&AdminRequest::ListRevoked).await?,
        AdminReply::Revoked(rows) if rows.is_empty()
    ));

    let (zed_serial, zed_identity) = pki::describe_cert_file(&pki_dir.join("admin-zed.pem"))?;
    assert_eq!(zed_identity.to_string(), "admin zed");
    let mut admin = c.admin(leader).await?;
    match admin
        .call_leader(&AdminRequest::Write(Command::RevokeCertificate {
            serial: zed_serial.clone(),
            identity: zed_identity.to_string(),
            reason: "laptop lost".into(),
            at: spaced_node::now_millis(),
        }))
        .await?
    {
        AdminReply::Applied(_) => {}
        other => bail!("revoke: {other:?}"),
    }
    c.wait_for(T, "every node knows of the revocation", |c| {
        c.nodes.keys().all(|id| {
            c.fabric_of(*id)
                .is_some_and(|f| f.revoked.contains_key(&zed_serial))
        })
    })
    .await?;
    // The open connection: its next request is refused.
    let refused = zed_conn.call(&AdminRequest::ListRevoked).await;
    match refused {
        Ok(AdminReply::Failed(e)) => assert!(e.contains("revoked"), "{e}"),
        Err(_) => {}
        Ok(other) => bail!("a revoked admin was answered: {other:?}"),
    }
    // A new connection: refused in the handshake (TLS 1.3 lets the client finish its side
    // first, so the refusal may arrive with the first request).
    if let Ok(mut again) = AdminClient::connect(&follower_addr, &zed).await {
        let answer = again.call(&AdminRequest::ListRevoked).await;
        assert!(answer.is_err(), "a revoked admin was served: {answer:?}");
    }

    // `node remove` revokes the removed node's certificate.
    let removed = (1..=3)
        .find(|id| *id != leader && *id != follower)
        .context("a third node")?;
    let (removed_serial, _) = pki::describe_cert_file(&pki_dir.join(format!("n{removed}.pem")))?;
    match admin
        .call_leader(&AdminRequest::RemoveNode(format!("n{removed}")))
        .await?
    {
        AdminReply::NodeRemoved { revoked } => {
            assert_eq!(revoked.as_deref(), Some(removed_serial.as_str()))
        }
        other => bail!("remove: {other:?}"),
    }
    match admin.call_leader(&AdminRequest::ListRevoked).await? {
        AdminReply::Revoked(rows) => {
            let serials: Vec<&str> = rows.iter().map(|(s, _)| s.as_str()).collect();
            assert!(serials.contains(&removed_serial.as_str()), "{rows:?}");
            assert!(serials.contains(&zed_serial.as_str()), "{rows:?}");
        }
        other => bail!("list: {other:?}"),
    }
    c.wait_for(T, "the follower knows of the node's revocation", |c| {
        c.fabric_of(follower)
            .is_some_and(|f| f.revoked.contains_key(&removed_serial))
    })
    .await?;
    // Its certificate cannot even ask who a member is (which any certificate of the CA may).
    let (ep, cfg) = client(&pki_dir, &pki_dir, &format!("n{removed}"), ALPN_RAFT)?;
    let ghost = QuicNetwork::new(removed, ep, cfg);
    let to_follower = Member {
        name: format!("n{follower}"),
        addr: follower_addr.clone(),
    };
    let err = ghost
        .call(follower, &to_follower, RaftRpc::Describe, T)
        .await
        .expect_err("a removed node's revoked certificate was served");
    eprintln!("removed node refused: {err}");
    admin.close().await;
    c.stop_all().await;
    Ok(())
}

/// An unsigned request (`check perf`'s, straight to the leader) is carried out by the leader
/// on the connection's proof; a follower answers "not the leader" instead of forwarding it,
/// since the leader could not check it; a signed one the follower forwards as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsigned_request_is_served_by_the_leader_and_never_forwarded() -> Result<()> {
    let mut c = Cluster::start(3, timings()).await?;
    let leader = c.wait_leader(T).await?;
    c.wait_converged(T).await?;
    let follower = (1..=3).find(|id| *id != leader).context("a follower")?;
    let add = |id: &str| {
        AdminRequest::AddDevices(vec![spaced_fabric::NewDevice {
            id: id.into(),
            addr: "127.9.0.1:1".into(),
            mode: spaced_fabric::DeviceMode::SpaceInitiated,
        }])
    };
    let at_leader = c.admin(leader).await?;
    match at_leader.caller().unsigned().call(&add("u-leader")).await? {
        AdminReply::Applied(_) => {}
        other => bail!("the leader refused an unsigned write: {other:?}"),
    }
    let at_follower = c.admin(follower).await?;
    match at_follower
        .caller()
        .unsigned()
        .call(&add("u-follower"))
        .await?
    {
        AdminReply::NotLeader { leader: l, .. } => assert_eq!(l, Some(leader)),
        other => bail!("a follower answered an unsigned write with {other:?}"),
    }
    match at_follower.caller().call(&add("s-follower")).await? {
        AdminReply::Applied(_) => {}
        other => bail!("a signed write was not forwarded: {other:?}"),
    }
    c.wait_for(
        T,
        "the leader applied both writes that were carried out",
        |c| {
            c.fabric_of(leader).is_some_and(|f| {
                f.devices.contains_key("u-leader") && f.devices.contains_key("s-follower")
            })
        },
    )
    .await?;
    assert!(
        c.fabric_of(leader)
            .is_some_and(|f| !f.devices.contains_key("u-follower")),
        "the unsigned write at the follower was carried out"
    );
    at_leader.close().await;
    at_follower.close().await;
    c.stop_all().await;
    Ok(())
}

/// A member node's certificate carries no admin power: an admin request it forwards to the
/// leader is carried out only with a valid admin's signature over exactly those bytes, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cannot_forge_alter_or_replay_a_forwarded_admin_request() -> Result<()> {
    use spaced_node::admin::SignedRequest;
    use spaced_raft::proof;
    let mut c = Cluster::start(3, timings()).await?;
    let leader = c.wait_leader(T).await?;
    let follower = (1..=3).find(|id| *id != leader).context("a follower")?;
    let pki_dir = c.pki_dir();
    let load = |cert: &str| {
        TlsMaterial::load(&TlsPaths {
            ca: pki_dir.join("ca.pem"),
            cert: pki_dir.join(format!("{cert}.pem")),
            key: pki_dir.join(format!("{cert}.key")),
        })
    };
    let node_tls = load(&format!("n{follower}"))?;
    let admin_tls = load("admin-test")?;
    // The follower's own certificate and connection, as a compromised member would use them.
    let (ep, cfg) = client(&pki_dir, &pki_dir, &format!("n{follower}"), ALPN_RAFT)?;
    let member_net = QuicNetwork::new(follower, ep, cfg);
    let to_leader = Member {
        name: format!("n{leader}"),
        addr: c.nodes[&leader].listen_addr().to_string(),
    };
    let signed = |tls: &TlsMaterial, req: &AdminRequest| -> Result<SignedRequest> {
        let request = spaced_raft::codec::encode(req)?;
        let at_ms = spaced_node::now_millis();
        let nonce = proof::nonce(tls)?;
        let signature = proof::sign(tls, &proof::message(at_ms, nonce, &request))?;
        Ok(SignedRequest {
            request,
            at_ms,
            nonce,
            signature,
        })
    };
    let forward = |chain: Vec<Vec<u8>>, s: &SignedRequest| -> Result<RaftRpc> {
        Ok(RaftRpc::Admin {
            chain,
            request: spaced_raft::codec::encode(s)?,
        })
    };
    let remove = AdminRequest::RemoveNode(format!("n{leader}"));

    // Signed by the node itself, with its own certificate: not an admin.
    let forged = signed(&node_tls, &remove)?;
    let err = member_net
        .call(
            leader,
            &to_leader,
            forward(node_tls.chain_der(), &forged)?,
            T,
        )
        .await
        .expect_err("a node's own signature passed for an admin's")
        .to_string();
    assert!(err.contains("is not an admin"), "{err}");
    // Signed by the node, presented with an admin's certificate.
    let err = member_net
        .call(
            leader,
            &to_leader,
            forward(admin_tls.chain_der(), &forged)?,
            T,
        )
        .await
        .expect_err("a signature by another key passed")
        .to_string();
    assert!(err.contains("signature does not match"), "{err}");
    // A real admin's request, altered on the way.
    let mut altered = signed(&admin_tls, &AdminRequest::AddDevices(devices("ok", 1)))?;
    altered.request = spaced_raft::codec::encode(&remove)?;
    let err = member_net
        .call(
            leader,
            &to_leader,
            forward(admin_tls.chain_der(), &altered)?,
            T,
        )
        .await
        .expect_err("an altered request passed")
        .to_string();
    assert!(err.contains("signature does not match"), "{err}");
    // A real admin's request goes through once; sent again, it is a replay.
    let genuine = signed(&admin_tls, &AdminRequest::AddDevices(devices("ok", 1)))?;
    let rpc = || forward(admin_tls.chain_der(), &genuine);
    match member_net.call(leader, &to_leader, rpc()?, T).await? {
        RaftReply::Admin(reply) => match spaced_raft::codec::decode::<AdminReply>(&reply)? {
            AdminReply::Applied(_) => {}
            other => bail!("the genuine request: {other:?}"),
        },
        other => bail!("the genuine request: {other:?}"),
    }
    let err = member_net
        .call(leader, &to_leader, rpc()?, T)
        .await
        .expect_err("a replayed request passed")
        .to_string();
    assert!(err.contains("a replay"), "{err}");
    // Nothing of the forgeries happened: the leader still leads, one device was added.
    c.wait_converged(T).await?;
    assert_eq!(c.wait_leader(T).await?, leader);
    assert_eq!(devices_named(&c, leader, "ok")?, 1);
    c.stop_all().await;
    Ok(())
}

/// A follower hands a request only the leader can carry out to the leader and returns the
/// leader's answer, so spacectl may talk to any node; no redirect is needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_forwards_leader_only_requests_to_the_leader() -> Result<()> {
    let mut c = Cluster::start(3, timings()).await?;
    let leader = c.wait_leader(T).await?;
    let follower = (1..=3).find(|id| *id != leader).context("a follower")?;
    let mut admin = c.admin(follower).await?;
    let at_follower = admin.target().to_string();
    // One call each, without following redirects.
    match admin
        .call(&AdminRequest::AddDevices(devices("fwd", 3)))
        .await?
    {
        AdminReply::Applied(spaced_raft::Outcome::DevicesAdded(3)) => {}
        other => bail!("forwarded device import: {other:?}"),
    }
    // The leader's refusal comes back as it is.
    match admin
        .call(&AdminRequest::AddDevices(devices("fwd", 1)))
        .await?
    {
        AdminReply::Failed(e) => assert!(e.contains("already exists"), "{e}"),
        other => bail!("duplicate accepted: {other:?}"),
    }
    match admin
        .call(&AdminRequest::TransferLeader(format!("n{follower}")))
        .await?
    {
        AdminReply::Done => {}
        other => bail!("forwarded leader transfer: {other:?}"),
    }
    assert_eq!(c.wait_leader(T).await?, follower);
    assert_eq!(admin.target(), at_follower, "the client was redirected");
    c.wait_converged(T).await?;
    assert_eq!(devices_named(&c, leader, "fwd")?, 3);
    admin.close().await;

    // The leader crashes: a request sent meanwhile to the third node, again without following
    // redirects, is answered "not the leader" until a new leader is known, then carried out
    // once (a second run of it would be refused as a duplicate).
    let third = (1..=3)
        .find(|id| *id != leader && *id != follower)
        .context("a third node")?;
    let mut admin = c.admin(third).await?;
    c.crash_node(follower).await;
    let deadline = tokio::time::Instant::now() + T;
    loop {
        match admin
            .call(&AdminRequest::AddDevices(devices("after", 2)))
            .await?
        {
            AdminReply::Applied(spaced_raft::Outcome::DevicesAdded(2)) => break,
            AdminReply::NotLeader { .. } if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => bail!("import during the failover: {other:?}"),
        }
    }
    let now = c.wait_leader(T).await?;
    assert_ne!(now, follower);
    assert_eq!(devices_named(&c, now, "after")?, 2);
    admin.close().await;
    c.stop_all().await;
    Ok(())
}

/// A node's `mgmt_ip` from its config reaches the fabric once the node is registered (the
/// bootstrap node and a node that joins later alike), and a restart with another value, or
/// none, replaces it everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_management_ip_follows_its_config() -> Result<()> {
    let mut c = Cluster::empty(8, timings())?;
    let ip = |id: u64| -> std::net::IpAddr { format!("192.0.2.{id}").parse().unwrap() };
    for id in 1..=2 {
        let mut cfg = spaced_tests::node_config(c.dir.path(), &c.pki_dir(), id, timings());
        cfg.mgmt_ip = Some(ip(id));
        c.configs.insert(id, cfg);
    }
    let everywhere = |c: &Cluster, id: u64, want: Option<std::net::IpAddr>| {
        c.nodes.keys().all(|on| {
            c.fabric_of(*on)
                .is_some_and(|f| f.nodes.get(&id).is_some_and(|n| n.mgmt_ip == want))
        })
    };
    c.start_node(1, true).await?;
    c.wait_for(T, "n1's management IP in the fabric", |c| {
        everywhere(c, 1, Some(ip(1)))
    })
    .await?;
    c.start_node(2, false).await?;
    c.add_node(2).await?;
    c.wait_for(T, "n2's management IP on both nodes", |c| {
        everywhere(c, 2, Some(ip(2))) && everywhere(c, 1, Some(ip(1)))
    })
    .await?;
    // n2 restarts without one (it is a follower: its proposal goes through the leader).
    c.stop_node(2).await;
    if let Some(cfg) = c.configs.get_mut(&2) {
        cfg.mgmt_ip = None;
    }
    c.start_node(2, false).await?;
    c.wait_for(T, "n2's management IP cleared on both nodes", |c| {
        everywhere(c, 2, None)
    })
    .await?;
    c.stop_all().await;
    Ok(())
}
