//! The fence guard's report of its fence, sent as this node after spaced died (see
//! [`crate::takeover::report`] for what and why): `Leaving` to every member, then
//! `Propose(ReleasePlacement)` through whichever member leads. It lives in the root because
//! it speaks Raft's node RPCs; the guard gets it as a [`crate::takeover::report::Reporter`].

use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use spaced_raft::network::{QuicNetwork, RaftReply, RaftRpc};
use spaced_raft::pki::{ALPN_RAFT, TlsMaterial, TlsPaths};
use spaced_raft::{Command, Member};

use crate::takeover::report::{Identity, Peer};

/// Reports `fenced` (placement, epoch) through whichever member leads, trying until `within`
/// has passed; logs what became of each. Best effort: what is not reported is granted
/// elsewhere when its lease runs out, as without a guard report.
pub fn report_fenced(
    me: Identity,
    peers: Vec<Peer>,
    fenced: Vec<(String, u64)>,
    within: Duration,
) -> BoxFuture<'static, ()> {
    Box::pin(async move { report(&me, &peers, &fenced, within).await })
}

async fn report(me: &Identity, peers: &[Peer], fenced: &[(String, u64)], within: Duration) {
    let deadline = Instant::now() + within;
    let peers: Vec<&Peer> = peers.iter().filter(|p| p.id != me.node).collect();
    if peers.is_empty() {
        return;
    }
    let net = match dialer(me, &peers) {
        Ok(n) => n,
        Err(e) => {
            tracing::error!(error = %e, "fence guard cannot report its fence; the leases will run out");
            return;
        }
    };
    let member = |p: &Peer| Member {
        name: p.name.clone(),
        addr: p.addr.clone(),
    };
    // Grant this node nothing for a while: told to every member, so the leader hears it
    // whoever it is (best effort, at once and in parallel).
    let leaving = peers.iter().map(|p| {
        let net = net.clone();
        let m = member(p);
        async move {
            let _ = net
                .call(p.id, &m, RaftRpc::Leaving, Duration::from_millis(300))
                .await;
        }
    });
    futures::future::join_all(leaving).await;
    // Nothing fenced: the word that the daemon died was the report (the followers of a dead
    // leader elect another at once).
    for (name, epoch) in fenced {
        let cmd = Command::ReleasePlacement {
            name: name.clone(),
            epoch: *epoch,
        };
        let mut done = false;
        while !done && Instant::now() < deadline {
            for p in &peers {
                let reply = net
                    .call(
                        p.id,
                        &member(p),
                        RaftRpc::Propose(cmd.clone()),
                        Duration::from_millis(400),
                    )
                    .await;
                match reply {
                    Ok(RaftReply::Proposed(Ok(_))) => {
                        tracing::warn!(placement = %name, epoch, through = %p.name, "fence guard released the placement it fenced");
                        done = true;
                    }
                    Ok(RaftReply::Proposed(Err(e))) => {
                        tracing::info!(placement = %name, epoch, error = %e, "fence guard's release refused: the placement moved on already");
                        done = true;
                    }
                    Ok(other) => tracing::debug!(peer = %p.name, ?other, "odd reply to a release"),
                    // Not the leader, or not reachable: try the next.
                    Err(e) => tracing::debug!(peer = %p.name, error = %e, "release not taken"),
                }
                if done {
                    break;
                }
            }
            if !done {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if !done {
            tracing::warn!(placement = %name, epoch, "fence guard could not report its release; the lease will run out");
        }
    }
}

/// Why the guard could not dial the cluster.
#[derive(Debug, thiserror::Error)]
enum DialerError {
    /// The node's key material.
    #[error("the node's certificate: {0}")]
    Tls(#[from] spaced_raft::pki::PkiError),
    /// No socket.
    #[error("bind {0}: {1}")]
    Bind(std::net::SocketAddr, std::io::Error),
}

/// A dialer with the node's certificate, on an endpoint of the peers' address family.
fn dialer(me: &Identity, peers: &[&Peer]) -> Result<QuicNetwork, DialerError> {
    let tls = TlsMaterial::load(&TlsPaths {
        ca: me.ca.clone(),
        cert: me.cert.clone(),
        key: me.key.clone(),
    })?;
    let client = tls.client_config(ALPN_RAFT, spaced_raft::network::transport_config())?;
    let v6 = peers.iter().any(|p| p.addr.starts_with('['));
    let bind: std::net::SocketAddr = if v6 {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let endpoint =
        spaced_raft::udp::endpoint(bind, None).map_err(|e| DialerError::Bind(bind, e))?;
    Ok(QuicNetwork::new(me.node, endpoint, client))
}
