//! `[dr]` in a node's config: this site, its peer, and the link between them.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use spaced_fabric::SiteRole;

/// The default port of the disaster-recovery link.
pub const DR_PORT: u16 = 7443;

/// `[dr]`: present on every node of both sites of a disaster-recovery pair.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DrSection {
    /// This site's name (`east`); the peer knows it by it.
    pub site: String,
    /// The role this site starts in: `active` or `standby`. Used once, while the fabric says
    /// the site is standalone; afterwards the fabric's role (changed by failover, switchover
    /// and demotion) is the truth.
    pub role: String,
    /// Where this node serves the link (UDP, QUIC), e.g. `0.0.0.0:7443`.
    pub listen: SocketAddr,
    /// The peer site's name.
    pub peer_site: String,
    /// The link addresses of the peer site's nodes; any of them answers.
    pub peers: Vec<String>,
    /// The peer site's CA certificate: the only one the link trusts.
    pub peer_ca: PathBuf,
    /// How often the leader contacts the peer when nothing is to be mirrored, in ms (the
    /// model's `heartbeat.interval` is 30 s).
    #[serde(default = "default_interval")]
    pub heartbeat_interval_ms: u64,
    /// How long one contact may take, in ms (`heartbeat.timeout`, model 5 s).
    #[serde(default = "default_timeout")]
    pub heartbeat_timeout_ms: u64,
    /// Failed contacts in a row after which the peer counts as lost (`heartbeat.retries`).
    #[serde(default = "default_retries")]
    pub heartbeat_retries: u32,
    /// `spaced witness` addresses (host:port) both sites reach. With witnesses, the active
    /// site holds its role as a lease at a majority of them and a standby whose peer is lost
    /// takes over by itself once that lease has run out; without, failover is manual.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub witnesses: Vec<String>,
    /// How long a witness keeps the active role for the site that last renewed it, in ms.
    /// The active site demotes itself when it has not renewed at a majority for half of it.
    #[serde(default = "default_witness_lease")]
    pub witness_lease_ms: u64,
    /// Whether a standby takes over by itself (needs witnesses).
    #[serde(default = "default_true")]
    pub automatic_failover: bool,
    /// After an active site demoted itself for want of witnesses, how long it does not take
    /// the active role back by itself, in ms (the model's `failureDetection.waitDuration`,
    /// 8 h); 0: no wait.
    #[serde(default = "default_isolation_wait")]
    pub isolation_wait_ms: u64,
    /// A program that replaces the built-in decision once the peer is lost (the model's
    /// custom failure detection): it reads `dr status` as JSON on stdin and prints
    /// `{"state": ..., "action": "beActive"|"beStandby"|"nothing"|"wait", "description": ...,
    /// "payload": {"waitTime": "30s"}}`. Relative to the config file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_detection_script: Option<PathBuf>,
    /// How long the script may run, in ms; past it, it is killed and its verdict is "nothing".
    #[serde(default = "default_script_timeout")]
    pub script_timeout_ms: u64,
    /// Backups of declared configuration files, shipped to the standby and restored there at
    /// promotion (`[dr.backup]`).
    #[serde(default)]
    pub backup: crate::backup::BackupSection,
}

fn default_script_timeout() -> u64 {
    10_000
}

fn default_isolation_wait() -> u64 {
    8 * 3_600_000
}

fn default_witness_lease() -> u64 {
    10_000
}
fn default_true() -> bool {
    true
}

fn default_interval() -> u64 {
    1_000
}
fn default_timeout() -> u64 {
    1_000
}
fn default_retries() -> u32 {
    3
}

fn host_port(s: &str) -> bool {
    s.rsplit_once(':')
        .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok_and(|n| n > 0))
}

impl DrSection {
    /// The starting role, checked.
    pub fn start_role(&self) -> Result<SiteRole, StartRoleError> {
        match self.role.parse::<SiteRole>() {
            Err(e) => Err(StartRoleError::Unknown(e)),
            Ok(SiteRole::Standalone) => Err(StartRoleError::Standalone),
            Ok(r) => Ok(r),
        }
    }

    /// Checks what serde cannot: `(key, problem)` of the first thing wrong.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let name = |key: &str, v: &str| {
            spaced_fabric::check_name(key, v).map_err(|e| (format!("dr.{key}"), e.to_string()))
        };
        name("site", &self.site)?;
        name("peer_site", &self.peer_site)?;
        if self.site == self.peer_site {
            return Err((
                "dr.peer_site".into(),
                format!("is this site's own name {:?}", self.site),
            ));
        }
        self.start_role()
            .map_err(|e| ("dr.role".into(), e.to_string()))?;
        if self.peers.is_empty() {
            return Err((
                "dr.peers".into(),
                "must name at least one node of the peer site (host:port)".into(),
            ));
        }
        for (i, p) in self.peers.iter().enumerate() {
            if !host_port(p) {
                return Err((format!("dr.peers[{i}]"), format!("{p:?} is not host:port")));
            }
        }
        if self.heartbeat_interval_ms == 0 || self.heartbeat_timeout_ms == 0 {
            return Err((
                "dr.heartbeat_interval_ms".into(),
                "heartbeat interval and timeout must be above 0".into(),
            ));
        }
        for (i, w) in self.witnesses.iter().enumerate() {
            if !host_port(w) {
                return Err((
                    format!("dr.witnesses[{i}]"),
                    format!("{w:?} is not host:port"),
                ));
            }
        }
        let floor = 4 * (self.heartbeat_interval_ms + self.heartbeat_timeout_ms);
        if !self.witnesses.is_empty() && self.witness_lease_ms < floor {
            return Err((
                "dr.witness_lease_ms".into(),
                format!(
                    "{} ms is too short: at least 4 × (heartbeat interval + timeout) = {floor} \
                     ms, so that renewals can fail a few times before the site demotes",
                    self.witness_lease_ms
                ),
            ));
        }
        if self.script_timeout_ms == 0 {
            return Err(("dr.script_timeout_ms".into(), "must be above 0".into()));
        }
        if self.heartbeat_retries == 0 {
            return Err(("dr.heartbeat_retries".into(), "must be at least 1".into()));
        }
        self.backup.validate()
    }
}

/// Why `dr.role` is not a starting role.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartRoleError {
    /// Not a site role at all. Text: `SiteRole`'s parser in spaced-fabric says why as a string.
    #[error("{0}")]
    Unknown(String),
    /// `standalone`, which a site with a `[dr]` section is not.
    #[error("a site with a [dr] section is active or standby (remove [dr] for a standalone site)")]
    Standalone,
}

/// Why a text is not a duration (see [`parse_duration_ms`]); each names the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// It does not start with a number.
    #[error("{text:?} is not a duration (e.g. 90s, 30m, 8h, 2d, or 0)")]
    NotANumber {
        /// The text as given.
        text: String,
    },
    /// Its unit is none of ms, s, m, h and d.
    #[error("{text:?}: unknown unit {unit:?} (ms, s, m, h or d)")]
    UnknownUnit {
        /// The text as given.
        text: String,
        /// The unit it has.
        unit: String,
    },
    /// It does not fit in a u64 of ms.
    #[error("{text:?} is too long")]
    TooLong {
        /// The text as given.
        text: String,
    },
}

/// `90s`, `30m`, `8h`, `2d`, `250ms` or a number of seconds, as ms; `0` stays 0.
pub fn parse_duration_ms(text: &str) -> Result<u64, DurationError> {
    let t = text.trim();
    let (digits, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u64 = digits.parse().map_err(|_| DurationError::NotANumber {
        text: text.to_string(),
    })?;
    let scale = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(DurationError::UnknownUnit {
                text: text.to_string(),
                unit: unit.to_string(),
            });
        }
    };
    n.checked_mul(scale).ok_or_else(|| DurationError::TooLong {
        text: text.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section() -> DrSection {
        DrSection {
            site: "east".into(),
            role: "active".into(),
            listen: "0.0.0.0:7443".parse().unwrap(),
            peer_site: "west".into(),
            peers: vec!["10.2.0.1:7443".into()],
            peer_ca: "west-ca.pem".into(),
            heartbeat_interval_ms: 1_000,
            heartbeat_timeout_ms: 1_000,
            heartbeat_retries: 3,
            witnesses: vec![],
            witness_lease_ms: 10_000,
            automatic_failover: true,
            isolation_wait_ms: 0,
            failure_detection_script: None,
            script_timeout_ms: 10_000,
            backup: Default::default(),
        }
    }

    #[test]
    fn bad_sections_name_the_key() {
        assert_eq!(section().validate(), Ok(()));
        let key = |s: DrSection| s.validate().unwrap_err().0;
        assert_eq!(
            key(DrSection {
                peer_site: "east".into(),
                ..section()
            }),
            "dr.peer_site"
        );
        assert_eq!(
            key(DrSection {
                role: "standalone".into(),
                ..section()
            }),
            "dr.role"
        );
        assert_eq!(
            key(DrSection {
                role: "primary".into(),
                ..section()
            }),
            "dr.role"
        );
        assert_eq!(
            key(DrSection {
                peers: vec![],
                ..section()
            }),
            "dr.peers"
        );
        assert_eq!(
            key(DrSection {
                peers: vec!["10.2.0.1:7443".into(), "10.2.0.2".into()],
                ..section()
            }),
            "dr.peers[1]"
        );
        assert_eq!(
            key(DrSection {
                site: "East Site".into(),
                ..section()
            }),
            "dr.site"
        );
        assert_eq!(
            key(DrSection {
                heartbeat_retries: 0,
                ..section()
            }),
            "dr.heartbeat_retries"
        );
        assert_eq!(
            key(DrSection {
                witnesses: vec!["w1".into()],
                ..section()
            }),
            "dr.witnesses[0]"
        );
        assert_eq!(
            key(DrSection {
                witnesses: vec!["10.3.0.1:7444".into()],
                witness_lease_ms: 5_000,
                ..section()
            }),
            "dr.witness_lease_ms"
        );
    }
}
