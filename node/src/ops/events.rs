//! Recent cluster events as this node saw them (leader changes, owner changes of VIPs and
//! singletons, revocations), for the status page: a bounded ring, newest last.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use serde::Serialize;

/// Events kept.
pub const KEPT: usize = 200;

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// When this node saw it (Unix ms).
    pub at_ms: u64,
    /// `leader`, `owner` or `revoked`.
    pub kind: &'static str,
    /// What happened, for people.
    pub text: String,
}

/// What the recorder compares against.
#[derive(Default)]
struct Seen {
    leader: Option<Option<u64>>,
    owners: BTreeMap<String, Option<String>>,
    revoked: usize,
    primed: bool,
}

/// The ring and what it last saw.
#[derive(Default)]
pub struct Events {
    ring: Mutex<VecDeque<Event>>,
    seen: Mutex<Seen>,
}

impl Events {
    fn push(&self, at_ms: u64, kind: &'static str, text: String) {
        let mut ring = crate::lock(&self.ring);
        if ring.len() == KEPT {
            ring.pop_front();
        }
        ring.push_back(Event { at_ms, kind, text });
    }

    /// Compares what this node sees now with what it saw last and records the differences:
    /// the leader (`leader`: its name, or `None`), each placement's owner by name (`owners`),
    /// the number of revoked certificates. The first call only primes.
    pub fn observe(
        &self,
        at_ms: u64,
        leader: Option<u64>,
        leader_name: Option<String>,
        owners: BTreeMap<String, Option<String>>,
        revoked: usize,
    ) {
        let mut seen = crate::lock(&self.seen);
        if seen.primed {
            if seen.leader != Some(leader) {
                let text = match (leader, &leader_name) {
                    (Some(_), Some(name)) => format!("{name} leads"),
                    (Some(id), None) => format!("node {id} leads"),
                    (None, _) => "no leader known".to_string(),
                };
                self.push(at_ms, "leader", text);
            }
            for (name, owner) in &owners {
                let before = seen.owners.get(name);
                if before != Some(owner) {
                    let text = match (before, owner) {
                        (None, _) => format!("{name} added ({})", holder(owner)),
                        (Some(b), o) => format!("{name}: {} -> {}", holder(b), holder(o)),
                    };
                    self.push(at_ms, "owner", text);
                }
            }
            for name in seen.owners.keys() {
                if !owners.contains_key(name) {
                    self.push(at_ms, "owner", format!("{name} removed"));
                }
            }
            if revoked > seen.revoked {
                self.push(
                    at_ms,
                    "revoked",
                    format!("{} certificate(s) revoked", revoked - seen.revoked),
                );
            }
        }
        seen.leader = Some(leader);
        seen.owners = owners;
        seen.revoked = revoked;
        seen.primed = true;
    }

    /// The events kept, oldest first.
    pub fn list(&self) -> Vec<Event> {
        crate::lock(&self.ring).iter().cloned().collect()
    }
}

fn holder(owner: &Option<String>) -> String {
    owner.clone().unwrap_or_else(|| "nobody".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owners(list: &[(&str, Option<&str>)]) -> BTreeMap<String, Option<String>> {
        list.iter()
            .map(|(n, o)| (n.to_string(), o.map(str::to_string)))
            .collect()
    }

    #[test]
    fn changes_are_recorded_once_and_the_ring_is_bounded() {
        let e = Events::default();
        e.observe(
            1,
            Some(1),
            Some("n1".into()),
            owners(&[("cluster", Some("n1"))]),
            0,
        );
        assert!(e.list().is_empty(), "the first look only primes");
        e.observe(
            2,
            Some(1),
            Some("n1".into()),
            owners(&[("cluster", Some("n1"))]),
            0,
        );
        assert!(e.list().is_empty());
        e.observe(3, None, None, owners(&[("cluster", None)]), 0);
        e.observe(
            4,
            Some(2),
            Some("n2".into()),
            owners(&[("cluster", Some("n2")), ("poller", None)]),
            1,
        );
        e.observe(
            5,
            Some(2),
            Some("n2".into()),
            owners(&[("poller", None)]),
            1,
        );
        let texts: Vec<String> = e.list().into_iter().map(|e| e.text).collect();
        assert_eq!(
            texts,
            vec![
                "no leader known",
                "cluster: n1 -> nobody",
                "n2 leads",
                "cluster: nobody -> n2",
                "poller added (nobody)",
                "1 certificate(s) revoked",
                "cluster removed",
            ]
        );
        for i in 0..(KEPT as u64 + 10) {
            e.observe(10 + i, Some(i % 2), None, owners(&[]), 1);
        }
        assert_eq!(e.list().len(), KEPT);
    }
}
