//! The fence guard's report to the cluster after spaced died: "this node has fenced these
//! placements at these epochs", so that the leader grants them elsewhere at once instead of
//! waiting out the lease (which is what a graceful stop does too).
//!
//! The guard speaks as its node: a QUIC connection with the node's own certificate, the node
//! RPCs `Leaving` (grant this node nothing for a while) to every member, then `Propose
//! (ReleasePlacement { name, epoch })`, which only the leader carries out and which the leader
//! accepts only from the placement's owner at its current epoch (`node_may_propose`). So the
//! report cannot release what the node does not hold, nor a placement granted again since.
//!
//! It is sent only after the guard has removed the address (or killed the singleton's process
//! group) and only when the daemon is gone (the guard has been re-parented): a guard closed
//! by a living daemon reports nothing. The only process that could put the address up again
//! is a daemon on this host, and a new one starts holding nothing.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use spaced_raft::network::{QuicNetwork, RaftReply, RaftRpc};
use spaced_raft::pki::{ALPN_RAFT, TlsMaterial, TlsPaths};
use spaced_raft::{Command, Member};

/// Who the guard reports as: the node's id and key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The node's id.
    pub node: u64,
    /// Its CA, certificate and key files.
    pub ca: PathBuf,
    /// Certificate file.
    pub cert: PathBuf,
    /// Key file.
    pub key: PathBuf,
}

impl Identity {
    /// The protocol line (fields separated by tabs, so paths may hold spaces).
    pub fn line(&self) -> String {
        format!(
            "identity\t{}\t{}\t{}\t{}",
            self.node,
            self.ca.display(),
            self.cert.display(),
            self.key.display()
        )
    }

    /// Parses what follows `identity<TAB>`.
    pub fn parse(rest: &str) -> Result<Self, String> {
        match rest.split('\t').collect::<Vec<_>>().as_slice() {
            [id, ca, cert, key] => Ok(Identity {
                node: id.parse().map_err(|_| format!("bad node id {id:?}"))?,
                ca: PathBuf::from(ca),
                cert: PathBuf::from(cert),
                key: PathBuf::from(key),
            }),
            other => Err(format!(
                "expected 4 tab-separated fields, got {}",
                other.len()
            )),
        }
    }
}

/// One member to report to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Raft id.
    pub id: u64,
    /// Name (on its certificate).
    pub name: String,
    /// `host:port` of its QUIC listener.
    pub addr: String,
}

impl Peer {
    /// Parses `<id>=<name>@<host:port>`.
    pub fn parse(token: &str) -> Result<Self, String> {
        let (id, rest) = token
            .split_once('=')
            .ok_or_else(|| format!("{token:?} is not <id>=<name>@<addr>"))?;
        let (name, addr) = rest
            .split_once('@')
            .ok_or_else(|| format!("{token:?} is not <id>=<name>@<addr>"))?;
        Ok(Peer {
            id: id.parse().map_err(|_| format!("bad node id {id:?}"))?,
            name: name.to_string(),
            addr: addr.to_string(),
        })
    }
}

/// The `members` protocol line for `peers`.
pub fn members_line(peers: &[Peer]) -> String {
    let mut line = String::from("members");
    for p in peers {
        line.push_str(&format!(" {}={}@{}", p.id, p.name, p.addr));
    }
    line
}

/// Reports `fenced` (placement, epoch) through whichever member leads, trying until `within`
/// has passed; logs what became of each. Best effort: what is not reported is granted
/// elsewhere when its lease runs out, as without a guard report.
pub async fn report_fenced(
    me: &Identity,
    peers: &[Peer],
    fenced: &[(String, u64)],
    within: Duration,
) {
    let deadline = Instant::now() + within;
    let peers: Vec<&Peer> = peers.iter().filter(|p| p.id != me.node).collect();
    if peers.is_empty() || fenced.is_empty() {
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

/// A dialer with the node's certificate, on an endpoint of the peers' address family.
fn dialer(me: &Identity, peers: &[&Peer]) -> Result<QuicNetwork, String> {
    let tls = TlsMaterial::load(&TlsPaths {
        ca: me.ca.clone(),
        cert: me.cert.clone(),
        key: me.key.clone(),
    })
    .map_err(|e| e.to_string())?;
    let client = tls
        .client_config(ALPN_RAFT, spaced_raft::network::transport_config())
        .map_err(|e| e.to_string())?;
    let v6 = peers.iter().any(|p| p.addr.starts_with('['));
    let bind: std::net::SocketAddr = if v6 {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = quinn::Endpoint::client(bind).map_err(|e| format!("bind {bind}: {e}"))?;
    Ok(QuicNetwork::new(me.node, endpoint, client))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_members_lines_read_back() {
        let me = Identity {
            node: 3,
            ca: "/etc/spaced/ca.pem".into(),
            cert: "/etc/spaced/my node.pem".into(),
            key: "/etc/spaced/n3.key".into(),
        };
        let line = me.line();
        assert_eq!(
            Identity::parse(line.strip_prefix("identity\t").unwrap()),
            Ok(me)
        );
        assert!(Identity::parse("x\ty").is_err());
        let peers = vec![
            Peer {
                id: 1,
                name: "n1".into(),
                addr: "10.0.0.1:7000".into(),
            },
            Peer {
                id: 2,
                name: "n2".into(),
                addr: "[fd00::2]:7000".into(),
            },
        ];
        let line = members_line(&peers);
        assert_eq!(line, "members 1=n1@10.0.0.1:7000 2=n2@[fd00::2]:7000");
        let back: Vec<Peer> = line
            .split_whitespace()
            .skip(1)
            .map(|t| Peer::parse(t).unwrap())
            .collect();
        assert_eq!(back, peers);
        assert!(Peer::parse("n1@x").is_err());
        assert!(Peer::parse("x=n1@a").is_err());
    }
}
