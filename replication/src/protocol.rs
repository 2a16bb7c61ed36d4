//! The link between two sites: one request, one reply, per QUIC stream.

use serde::{Deserialize, Serialize};
use spaced_fabric::Millis;

use crate::decide::SiteState;
use crate::projection::{Delta, Page, Projection};

/// ALPN of the disaster-recovery link (its own port, its own trust: the peer site's CA).
pub const ALPN_DR: &[u8] = b"spaced-dr/1";

/// Largest request a node reads from a peer site (a backup of configuration files, at most
/// [`crate::backup::MAX_BACKUP`] of them, is the largest).
pub const MAX_REQUEST: usize = (crate::backup::MAX_BACKUP as usize) + (1 << 20);

/// What a site's leader asks a node of its peer site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DrRequest {
    /// Who the asker is, and what it has of the peer's data.
    Pull {
        /// The asking site.
        from: SiteState,
        /// Whether it mirrors (a standby) or only listens (an active site's heartbeat).
        mirror: bool,
        /// The peer index of the projection it holds, for a reply by difference.
        have: Option<u64>,
        /// How long the peer may wait for something new before it answers (long poll).
        wait_ms: u64,
    },
    /// Switchover: the asking standby site asks the active peer to demote itself, so that it
    /// can take over once it has mirrored everything.
    HandOver {
        /// The asking site.
        from: SiteState,
    },
    /// To a witness: hold the pair's ticket (the active role) for a while.
    Hold(crate::witness::Hold),
    /// The active site's leader to each node of the standby: keep this backup of the
    /// declared configuration files.
    KeepBackup(crate::backup::Backup),
    /// The next page of a projection too large for one reply (a transfer under way).
    PullPage {
        /// The asking site.
        from: SiteState,
        /// The peer index of the projection being transferred.
        index: u64,
        /// The last device id of the previous page.
        after: String,
    },
}

/// What changed since the asker's projection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Changes {
    /// Not asked for (the asker does not mirror).
    NotAsked,
    /// Nothing since `have`.
    Unchanged,
    /// The whole projection.
    Full(Projection),
    /// The difference from the asker's projection (at `have`).
    Delta(Delta),
    /// One page of the whole projection, too large for one reply (at the reply's index; a
    /// first page starts a new transfer).
    Page(Page),
}

/// A node's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DrReply {
    /// The answering site's state and data.
    State {
        /// The answering site.
        site: SiteState,
        /// The last log index the answering node has applied.
        index: u64,
        /// Its clock.
        sent_at: Millis,
        /// The data.
        changes: Changes,
    },
    /// The answering site is standby now (it demoted itself for a switchover, or was
    /// already): the asker takes over once it has mirrored up to `index`, with an epoch above
    /// `epoch`.
    HandedOver {
        /// The demoted site's epoch.
        epoch: u64,
        /// The log index after which its data no longer changes.
        index: u64,
    },
    /// A witness's answer to `Hold`.
    Hold(crate::witness::HoldAnswer),
    /// The backup is kept.
    Kept,
    /// Refused, and why.
    Refused(String),
}
