//! Limits on the unauthenticated device port (7804): hellos in flight, in all and per source
//! address, and how soon a device that is up on another node may be claimed from it. Pure:
//! time is passed in.
//!
//! A device proves nothing but its id (the model's devices call in with a plain hello), so
//! anyone who knows an id can claim it. These limits bound what that costs: a source cannot
//! hold more than a few half-open hellos, and a device that came up on a node cannot be taken
//! from it again before [`CLAIM_HOLD_MS`], so a claim war costs one Raft write and one dropped
//! connection per device every two seconds, not as many as a loop can send.

use std::collections::HashMap;
use std::net::IpAddr;

use spaced_fabric::Millis;

/// Hellos being read at once, from every source together.
pub const HELLOS_IN_FLIGHT: usize = 512;
/// Hellos being read at once from one source address.
pub const HELLOS_PER_SOURCE: usize = 16;
/// A device up on another node for less than this (by its `since`) is not claimed from it.
pub const CLAIM_HOLD_MS: Millis = 2_000;

/// Why a connection to the device port is turned away before its hello is read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GateRefusal {
    /// Too many hellos are being read from everywhere.
    #[error("busy: {0} device hellos in flight; try again")]
    Busy(usize),
    /// Too many hellos are being read from this source.
    #[error("busy: {count} device hellos in flight from {from}; try again")]
    BusySource {
        /// The source address.
        from: IpAddr,
        /// Its hellos in flight.
        count: usize,
    },
}

/// Counts the hellos in flight.
#[derive(Debug, Default)]
pub struct HelloGate {
    in_flight: usize,
    per_source: HashMap<IpAddr, usize>,
}

impl HelloGate {
    /// Admits one more hello from `source`, or says why not. Every admitted hello must be
    /// [`done`](Self::done) once.
    pub fn admit(&mut self, source: IpAddr) -> Result<(), GateRefusal> {
        if self.in_flight >= HELLOS_IN_FLIGHT {
            return Err(GateRefusal::Busy(self.in_flight));
        }
        let count = self.per_source.entry(source).or_default();
        if *count >= HELLOS_PER_SOURCE {
            return Err(GateRefusal::BusySource {
                from: source,
                count: *count,
            });
        }
        *count += 1;
        self.in_flight += 1;
        Ok(())
    }

    /// A hello admitted from `source` ended (read, refused or timed out).
    pub fn done(&mut self, source: IpAddr) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Some(count) = self.per_source.get_mut(&source) {
            *count -= 1;
            if *count == 0 {
                self.per_source.remove(&source);
            }
        }
    }
}

/// Whether a device that is `up` on another node since `since` may be claimed at `now`;
/// `Err` is how long to wait.
pub fn may_take_over(up_elsewhere_since: Option<Millis>, now: Millis) -> Result<(), Millis> {
    match up_elsewhere_since {
        Some(since) if now.saturating_sub(since) < CLAIM_HOLD_MS => {
            Err(CLAIM_HOLD_MS - now.saturating_sub(since))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hellos_are_bounded_in_all_and_per_source() {
        let mut gate = HelloGate::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..HELLOS_PER_SOURCE {
            gate.admit(a).unwrap();
        }
        assert!(matches!(
            gate.admit(a),
            Err(GateRefusal::BusySource {
                count: HELLOS_PER_SOURCE,
                ..
            })
        ));
        // Another source still gets in, and a finished hello frees a place.
        gate.admit(b).unwrap();
        gate.done(a);
        gate.admit(a).unwrap();
        // The total bound holds across sources.
        let mut gate = HelloGate::default();
        for i in 0..HELLOS_IN_FLIGHT {
            let ip = IpAddr::from([10, 0, (i / 256) as u8, (i % 256) as u8]);
            gate.admit(ip).unwrap();
        }
        assert!(matches!(gate.admit(b), Err(GateRefusal::Busy(_))));
    }

    #[test]
    fn a_device_just_up_elsewhere_is_not_taken_over() {
        assert_eq!(may_take_over(None, 10_000), Ok(()));
        assert_eq!(may_take_over(Some(9_500), 10_000), Err(1_500));
        assert_eq!(may_take_over(Some(8_000), 10_000), Ok(()));
        // A clock behind the stamp waits the whole hold, no more.
        assert_eq!(may_take_over(Some(12_000), 10_000), Err(CLAIM_HOLD_MS));
    }
}
