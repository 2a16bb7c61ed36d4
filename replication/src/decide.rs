//! What a site does on hearing its peer. Pure: the watchdog feeds it what the two fabrics
//! say and carries out the verdict.

use serde::{Deserialize, Serialize};
use spaced_fabric::SiteRole;

/// A site as it describes itself on the link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteState {
    /// Its name.
    pub site: String,
    /// Its role, as its fabric says.
    pub role: SiteRole,
    /// Its site epoch.
    pub epoch: u64,
}

/// What a site should do after hearing its peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing to do.
    Nothing,
    /// Mirror the peer's data (a standby hearing an active peer).
    Mirror,
    /// Become standby at the peer's epoch: the peer is active with a higher claim.
    Demote {
        /// The epoch to adopt.
        epoch: u64,
    },
    /// Two standbys: nobody runs the workload. An operator must fail over one of them.
    NoActiveSite,
}

/// Whether active `a` outranks active `b`: the higher epoch, and on equal epochs (two sites
/// configured active, before either was promoted) the lower name.
pub fn outranks(a: &SiteState, b: &SiteState) -> bool {
    (a.epoch, std::cmp::Reverse(&a.site)) > (b.epoch, std::cmp::Reverse(&b.site))
}

/// The verdict for `me` on hearing `peer`.
pub fn on_peer(me: &SiteState, peer: &SiteState) -> Verdict {
    use SiteRole::*;
    match (me.role, peer.role) {
        (Active, Active) if outranks(peer, me) => Verdict::Demote { epoch: peer.epoch },
        (Standby, Active) => Verdict::Mirror,
        (Standby, Standby) => Verdict::NoActiveSite,
        _ => Verdict::Nothing,
    }
}

/// The epoch a standby takes when it is promoted: above its own and above every epoch it has
/// seen its peer hold.
pub fn promotion_epoch(own: u64, peer_seen: Option<u64>) -> u64 {
    own.max(peer_seen.unwrap_or(0)).saturating_add(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(site: &str, role: SiteRole, epoch: u64) -> SiteState {
        SiteState {
            site: site.into(),
            role,
            epoch,
        }
    }

    #[test]
    fn of_two_active_sites_the_lower_claim_demotes() {
        use SiteRole::*;
        // The returning old active site (epoch 1) hears the promoted standby (epoch 2).
        assert_eq!(
            on_peer(&s("east", Active, 1), &s("west", Active, 2)),
            Verdict::Demote { epoch: 2 }
        );
        assert_eq!(
            on_peer(&s("west", Active, 2), &s("east", Active, 1)),
            Verdict::Nothing
        );
        // Equal epochs (both configured active): the lower name stays active.
        assert_eq!(
            on_peer(&s("west", Active, 1), &s("east", Active, 1)),
            Verdict::Demote { epoch: 1 }
        );
        assert_eq!(
            on_peer(&s("east", Active, 1), &s("west", Active, 1)),
            Verdict::Nothing
        );
    }

    #[test]
    fn a_standby_mirrors_an_active_peer_and_two_standbys_say_so() {
        use SiteRole::*;
        assert_eq!(
            on_peer(&s("west", Standby, 1), &s("east", Active, 1)),
            Verdict::Mirror
        );
        assert_eq!(
            on_peer(&s("east", Active, 1), &s("west", Standby, 1)),
            Verdict::Nothing
        );
        assert_eq!(
            on_peer(&s("east", Standby, 2), &s("west", Standby, 2)),
            Verdict::NoActiveSite
        );
        assert_eq!(promotion_epoch(1, Some(4)), 5);
        assert_eq!(promotion_epoch(3, None), 4);
    }
}
