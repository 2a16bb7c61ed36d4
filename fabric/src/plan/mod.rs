//! The leader's planners, pure functions of the fabric, the live set and the time.
//!
//! * [`placements`] — which placements to grant or take back ([`placements::plan`]).
//! * [`devices`] — which live `app` node holds each device ([`devices::reassign_lost`]).

pub mod devices;
pub mod placements;
