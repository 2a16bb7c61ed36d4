//! Disaster recovery between two sites (DESIGN §9): each site is its own fabric; a standby
//! site mirrors the active site's site-neutral data (devices, services) over a QUIC link of
//! its own, and takes over when told to.
//!
//! * [`config`] — the `[dr]` section of a node's config.
//! * [`backup`] — backups of declared configuration files, shipped to the standby and
//!   restored at promotion.
//! * [`projection`] — the site-neutral part of a fabric, differences between two of them, and
//!   the `Mirror` commands that bring a standby to its peer's.
//! * [`decide`] — what a site does on hearing its peer (pure).
//! * [`protocol`] — the link's requests and replies.
//! * [`link`] — the link: a QUIC endpoint that trusts only the peer site's CA.
//! * [`watchdog`] — the loop on each site's leader: pull, mirror, demote, hold the active
//!   role at the witnesses or claim it, and the status `spacectl dr status` shows.
//! * [`witness`] — `spaced witness`: the tickets both sites' leaders hold or claim.
//! * [`script`] — the custom failure-detection script that may replace the built-in decision.
//! * [`site_lease`] — whether a node may confirm its site's workload leases (the active role
//!   held at the witnesses, learned from the leader by round trip).
//!
//! Safety: the fabric of each site carries a site epoch that only rises; a standby is promoted
//! only with an epoch above every one it has seen, and an active site that hears of an
//! active peer with a higher epoch demotes itself (see [`decide`]).

pub mod backup;
pub mod config;
pub mod decide;
pub mod link;
pub mod projection;
pub mod protocol;
pub mod script;
pub mod site_lease;
pub mod watchdog;
pub mod witness;

pub use config::DrSection;
pub use watchdog::{DrStatus, SiteHandle, Watchdog};
