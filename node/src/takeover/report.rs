//! What the fence guard needs to report its fence to the cluster after spaced died ("this
//! node has fenced these placements at these epochs", so that the leader grants them
//! elsewhere at once instead of waiting out the lease, as after a graceful stop): who it is
//! ([`Identity`]), whom to tell ([`Peer`]), and the [`Reporter`] that sends it, which the
//! binary supplies from the root (`crate::node::report_fenced`), since it speaks Raft's
//! node RPCs.
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
use std::time::Duration;

use futures::future::BoxFuture;

/// Why an `identity` or `members` line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportLineError {
    /// `identity` needs the id and three files.
    #[error("expected 4 tab-separated fields, got {0}")]
    Fields(usize),
    /// Not a node id.
    #[error("bad node id {0:?}")]
    NodeId(String),
    /// A member not written `<id>=<name>@<addr>`.
    #[error("{0:?} is not <id>=<name>@<addr>")]
    Peer(String),
}

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
    pub fn parse(rest: &str) -> Result<Self, ReportLineError> {
        match rest.split('\t').collect::<Vec<_>>().as_slice() {
            [id, ca, cert, key] => Ok(Identity {
                node: id
                    .parse()
                    .map_err(|_| ReportLineError::NodeId(id.to_string()))?,
                ca: PathBuf::from(ca),
                cert: PathBuf::from(cert),
                key: PathBuf::from(key),
            }),
            other => Err(ReportLineError::Fields(other.len())),
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
    pub fn parse(token: &str) -> Result<Self, ReportLineError> {
        let shape = || ReportLineError::Peer(token.to_string());
        let (id, rest) = token.split_once('=').ok_or_else(shape)?;
        let (name, addr) = rest.split_once('@').ok_or_else(shape)?;
        Ok(Peer {
            id: id
                .parse()
                .map_err(|_| ReportLineError::NodeId(id.to_string()))?,
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

/// How the guard reports what it fenced, given to [`crate::takeover::guard::run_guard`] by the
/// binary: this node, the members, the (placement, epoch) pairs fenced, and how long to try.
/// The implementation speaks Raft's node RPCs, which this module does not know
/// (`crate::node::report_fenced`).
pub type Reporter = fn(Identity, Vec<Peer>, Vec<(String, u64)>, Duration) -> BoxFuture<'static, ()>;

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
