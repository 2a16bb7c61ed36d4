//! Maglev consistent hashing: a lookup table that maps client-address hashes to backends evenly and moves few keys when the backend set changes.
//!
//! Each backend gets a pseudo-random permutation of the table slots, defined
//! by an `offset` and a `skip` derived from its name (two stable hashes).
//! Backends then take turns claiming their next preferred slot that is
//! still free until the table is full (Eisenbud et al., "Maglev: A Fast and
//! Reliable Software Network Load Balancer", NSDI 2016). Turn-taking gives
//! every backend the same number of slots, give or take one; preferences
//! that depend only on names keep most slots in place when a backend comes
//! or goes.
//!
//! Turns are taken in name order, not in the caller's order, so every node
//! building a table from the same set of names gets the same slots, however
//! its configuration lists them. Hashes are fixed functions of the bytes
//! (no per-process seed), for the same reason.

use std::net::IpAddr;

/// Table slot not yet claimed during construction; never a backend index
/// because the table size (and so the backend count) is capped below it.
const FREE: u32 = u32::MAX;

/// Seed of the name hash that picks a backend's first preferred slot.
const OFFSET_SEED: u64 = 0x6f66_6673_6574_2d31;
/// Seed of the name hash that picks a backend's stride through the table.
const SKIP_SEED: u64 = 0x736b_6970_2d32_2d32;
/// Seed of the client-address hash, distinct from the name hashes.
const IP_SEED: u64 = 0x636c_6965_6e74_4950;

/// Why a lookup table cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    /// Offsets and skips only walk every slot when the size is prime.
    #[error(
        "Maglev table size {size} is not prime: backend permutations would skip slots (the default is {})",
        Maglev::DEFAULT_SIZE
    )]
    NotPrime {
        /// The rejected size.
        size: usize,
    },
    /// Every backend needs at least one slot.
    #[error("Maglev table size {size} is smaller than the {backends} backends it must hold")]
    TooSmall {
        /// The rejected size.
        size: usize,
        /// How many backend names were given.
        backends: usize,
    },
    /// Guards against a configuration typo allocating gigabytes.
    #[error("Maglev table size {size} is above the maximum of {max} slots")]
    TooLarge {
        /// The rejected size.
        size: usize,
        /// [`Maglev::MAX_SIZE`].
        max: usize,
    },
    /// Two backends with one name would have identical preferences and be
    /// indistinguishable to every other node.
    #[error("backend name {name:?} is listed twice (positions {first} and {second})")]
    DuplicateName {
        /// The repeated name.
        name: String,
        /// Its first position in the list.
        first: usize,
        /// Its second position in the list.
        second: usize,
    },
}

/// A Maglev lookup table: slot → backend index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Maglev {
    /// For each slot, the index (in the caller's `names`) of the backend
    /// that owns it; empty when there are no backends.
    table: Vec<u32>,
    /// How many backends the table was built for.
    backends: usize,
    /// Table size asked for, kept even when `table` is empty so the
    /// structure still says how it was configured.
    size: usize,
}

/// One backend's walk through its slot permutation while the table fills.
struct Preference {
    /// Index in the caller's `names`, written into the slots it claims.
    backend: u32,
    /// The next slot this backend would like.
    next: usize,
    /// Stride between preferred slots, in `1..size`, so the walk visits
    /// every slot of a prime-sized table exactly once.
    skip: usize,
}

impl Maglev {
    /// Default table size, a prime well above 100× the expected backend count.
    pub const DEFAULT_SIZE: usize = 65_537;

    /// Largest table accepted (2^24 slots, 64 MiB of indices).
    pub const MAX_SIZE: usize = 1 << 24;

    /// Builds the table for backends named `names` (their order defines the returned indices). `size` must be prime and ≥ names.len(); return an error (thiserror, MaglevError) otherwise. Empty `names` is allowed and gives an empty table.
    ///
    /// Names must be distinct ([`MaglevError::DuplicateName`]).
    pub fn new<S: AsRef<str>>(names: &[S], size: usize) -> Result<Maglev, MaglevError> {
        if size > Self::MAX_SIZE {
            return Err(MaglevError::TooLarge {
                size,
                max: Self::MAX_SIZE,
            });
        }
        if !is_prime(size) {
            return Err(MaglevError::NotPrime { size });
        }
        if size < names.len() {
            return Err(MaglevError::TooSmall {
                size,
                backends: names.len(),
            });
        }

        // Turn order is name order, so the table does not depend on how the
        // caller listed the backends.
        let mut order: Vec<usize> = (0..names.len()).collect();
        order.sort_by(|&a, &b| names[a].as_ref().cmp(names[b].as_ref()));
        if let Some(pair) = order
            .windows(2)
            .find(|pair| names[pair[0]].as_ref() == names[pair[1]].as_ref())
        {
            let (first, second) = (pair[0].min(pair[1]), pair[0].max(pair[1]));
            return Err(MaglevError::DuplicateName {
                name: names[first].as_ref().to_string(),
                first,
                second,
            });
        }

        let size_u64 = size as u64;
        let mut preferences: Vec<Preference> = order
            .iter()
            .map(|&index| {
                let name = names[index].as_ref().as_bytes();
                // Both values are below `size`, which fits in usize.
                let offset = (stable_hash(OFFSET_SEED, name) % size_u64) as usize;
                let skip = (stable_hash(SKIP_SEED, name) % (size_u64 - 1)) as usize + 1;
                Preference {
                    // Below `size` ≤ MAX_SIZE < u32::MAX.
                    backend: index as u32,
                    next: offset,
                    skip,
                }
            })
            .collect();

        let mut table = Vec::new();
        if !preferences.is_empty() {
            table = vec![FREE; size];
            let mut filled = 0;
            'fill: loop {
                for preference in &mut preferences {
                    // A prime size and skip in 1..size make the walk a full
                    // cycle, so a free slot is found while any is left.
                    let mut slot = preference.next;
                    while table[slot] != FREE {
                        slot = step(slot, preference.skip, size);
                    }
                    table[slot] = preference.backend;
                    preference.next = step(slot, preference.skip, size);
                    filled += 1;
                    if filled == size {
                        break 'fill;
                    }
                }
            }
        }
        Ok(Maglev {
            table,
            backends: names.len(),
            size,
        })
    }

    /// Backend index for a hash key, None if there are no backends.
    pub fn lookup(&self, key: u64) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        // The remainder is below the table length, a usize.
        let slot = (key % self.table.len() as u64) as usize;
        self.table.get(slot).map(|&backend| backend as usize)
    }

    /// Number of backends the table was built for.
    pub fn len(&self) -> usize {
        self.backends
    }

    /// Whether the table has no backends (every lookup gives `None`).
    pub fn is_empty(&self) -> bool {
        self.backends == 0
    }

    /// Number of slots (the `size` it was built with).
    pub fn table_size(&self) -> usize {
        self.size
    }
}

/// The slot `skip` after `slot` in a table of `size` slots, without the
/// overflow a multiplication could hit.
fn step(slot: usize, skip: usize, size: usize) -> usize {
    let next = slot + skip;
    if next >= size { next - size } else { next }
}

/// Trial division; sizes are capped at [`Maglev::MAX_SIZE`], so at most a
/// few thousand divisions, once per table build.
fn is_prime(n: usize) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut divisor = 3;
    while divisor * divisor <= n {
        if n.is_multiple_of(divisor) {
            return false;
        }
        divisor += 2;
    }
    true
}

/// Stable 64-bit hash of a client IP address (the same on every node and every build: do NOT use std's DefaultHasher/RandomState; implement e.g. FNV-1a 64 followed by a strong 64-bit finalizer/mixer).
///
/// An IPv4-mapped IPv6 address hashes like the IPv4 address, so a client
/// keeps its backend whether it arrived on an IPv4 or a dual-stack socket.
pub fn hash_ip(ip: IpAddr) -> u64 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            stable_hash(IP_SEED, &[4, a, b, c, d])
        }
        IpAddr::V6(v6) => {
            let mut bytes = [6u8; 17];
            bytes[1..].copy_from_slice(&v6.octets());
            stable_hash(IP_SEED, &bytes)
        }
    }
}

/// FNV-1a 64 over `seed` (little-endian) then `bytes`, followed by the
/// MurmurHash3 64-bit finalizer: FNV alone mixes the last bytes poorly into
/// the high bits, and consecutive addresses differ only in the last byte.
fn stable_hash(seed: u64, bytes: &[u8]) -> u64 {
    finalize(fnv1a(fnv1a(FNV_OFFSET_BASIS, &seed.to_le_bytes()), bytes))
}

/// FNV-1a 64 starting value.
const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;

/// Continues an FNV-1a 64 hash `state` over `bytes`.
fn fnv1a(mut state: u64, bytes: &[u8]) -> u64 {
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    for &byte in bytes {
        state ^= u64::from(byte);
        state = state.wrapping_mul(FNV_PRIME);
    }
    state
}

/// MurmurHash3's `fmix64`: every input bit affects every output bit.
fn finalize(mut hash: u64) -> u64 {
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^= hash >> 33;
    hash
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn names(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("node{i}")).collect()
    }

    /// The table as backend names, so tables built from different lists can
    /// be compared.
    fn slots_by_name<'a>(maglev: &Maglev, names: &'a [String]) -> Vec<&'a str> {
        maglev
            .table
            .iter()
            .map(|&i| names[i as usize].as_str())
            .collect()
    }

    #[test]
    fn size_is_validated() {
        assert_eq!(
            Maglev::new(&["a"], 65_536),
            Err(MaglevError::NotPrime { size: 65_536 })
        );
        assert_eq!(
            Maglev::new(&["a"], 1),
            Err(MaglevError::NotPrime { size: 1 })
        );
        assert_eq!(
            Maglev::new(&["a"], 0),
            Err(MaglevError::NotPrime { size: 0 })
        );
        assert_eq!(
            Maglev::new(&["a", "b", "c", "d"], 3),
            Err(MaglevError::TooSmall {
                size: 3,
                backends: 4
            })
        );
        assert!(matches!(
            Maglev::new(&["a"], Maglev::MAX_SIZE + 1),
            Err(MaglevError::TooLarge { .. })
        ));
        let message = Maglev::new(&["a"], 100).unwrap_err().to_string();
        assert!(
            message.contains("100") && message.contains("prime"),
            "{message}"
        );
        assert!(Maglev::new(&["a", "b", "c"], 3).is_ok());
        assert!(Maglev::new(&["a"], 2).is_ok());
    }

    #[test]
    fn primality() {
        let primes: Vec<usize> = (0..60).filter(|&n| is_prime(n)).collect();
        assert_eq!(
            primes,
            [
                2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59
            ]
        );
        assert!(is_prime(Maglev::DEFAULT_SIZE));
        assert!(!is_prime(65_535));
        assert!(!is_prime(251 * 257));
    }

    #[test]
    fn duplicate_names_are_rejected() {
        assert_eq!(
            Maglev::new(&["a", "b", "a"], 7),
            Err(MaglevError::DuplicateName {
                name: "a".into(),
                first: 0,
                second: 2
            })
        );
    }

    #[test]
    fn no_backends_gives_no_answer() {
        let empty: [&str; 0] = [];
        let maglev = Maglev::new(&empty, Maglev::DEFAULT_SIZE).unwrap();
        assert!(maglev.is_empty());
        assert_eq!(maglev.len(), 0);
        assert_eq!(maglev.table_size(), Maglev::DEFAULT_SIZE);
        assert_eq!(maglev.lookup(42), None);
    }

    #[test]
    fn every_slot_is_owned_and_lookups_hit_the_table() {
        let names = names(4);
        let maglev = Maglev::new(&names, 101).unwrap();
        assert_eq!(maglev.len(), 4);
        assert!(!maglev.is_empty());
        assert!(maglev.table.iter().all(|&i| (i as usize) < 4));
        for key in 0..1000u64 {
            assert_eq!(
                maglev.lookup(key),
                Some(maglev.table[(key % 101) as usize] as usize)
            );
        }
        assert!(maglev.lookup(u64::MAX).is_some());
    }

    #[test]
    fn hash_building_blocks_match_reference_values() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a(FNV_OFFSET_BASIS, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_OFFSET_BASIS, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(FNV_OFFSET_BASIS, b"foobar"), 0x8594_4171_f739_67e8);
        // fmix64 fixes zero and scrambles one.
        assert_eq!(finalize(0), 0);
        assert_ne!(finalize(1), 1);
    }

    #[test]
    fn deterministic_across_builds() {
        let names = names(5);
        let a = Maglev::new(&names, Maglev::DEFAULT_SIZE).unwrap();
        let b = Maglev::new(&names, Maglev::DEFAULT_SIZE).unwrap();
        assert_eq!(a, b);
        // Pinned values: a change here means nodes running different builds
        // would disagree on where a client goes.
        // (Checked against an independent implementation of the same
        // hashes and fill.)
        assert_eq!(
            hash_ip(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))),
            0xa791_c14d_8c25_385e
        );
        assert_eq!(stable_hash(OFFSET_SEED, b"node1"), 0x2d0e_093f_e6b8_4e87);
        let three = Maglev::new(&names[..3], Maglev::DEFAULT_SIZE).unwrap();
        assert_eq!(
            three.table[..16],
            [2, 0, 1, 1, 1, 2, 2, 1, 1, 1, 0, 0, 0, 2, 1, 1]
        );
    }

    #[test]
    fn order_of_names_only_changes_indices() {
        let names = names(7);
        let base = Maglev::new(&names, 1009).unwrap();
        let mut permuted = names.clone();
        permuted.reverse();
        permuted.swap(0, 3);
        let other = Maglev::new(&permuted, 1009).unwrap();
        assert_eq!(
            slots_by_name(&base, &names),
            slots_by_name(&other, &permuted)
        );
        for key in 0..5000u64 {
            let a = base.lookup(key).map(|i| &names[i]);
            let b = other.lookup(key).map(|i| &permuted[i]);
            assert_eq!(a, b, "key {key}");
        }
    }

    #[test]
    fn slots_are_balanced() {
        for n in 3..=10 {
            let names = names(n);
            let maglev = Maglev::new(&names, Maglev::DEFAULT_SIZE).unwrap();
            let mut counts = vec![0usize; n];
            for &i in &maglev.table {
                counts[i as usize] += 1;
            }
            let even = Maglev::DEFAULT_SIZE as f64 / n as f64;
            for (i, &count) in counts.iter().enumerate() {
                let ratio = count as f64 / even;
                assert!(
                    (0.9..=1.1).contains(&ratio),
                    "{n} backends: backend {i} has {count} slots, {ratio:.3} of even"
                );
            }
        }
    }

    /// How a change of backend set moves slots, as fractions of the table.
    struct Disruption {
        /// Slots whose owner changed at all.
        moved: f64,
        /// Slots moved from one backend present before and after to another
        /// such backend: moves the change did not require.
        needless: f64,
    }

    fn disruption(old: &[String], new: &[String]) -> Disruption {
        let before = Maglev::new(old, Maglev::DEFAULT_SIZE).unwrap();
        let after = Maglev::new(new, Maglev::DEFAULT_SIZE).unwrap();
        let before = slots_by_name(&before, old);
        let after = slots_by_name(&after, new);
        let in_both = |name: &str| old.iter().any(|n| n == name) && new.iter().any(|n| n == name);
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a);
        let needless = moved
            .clone()
            .filter(|(b, a)| in_both(b) && in_both(a))
            .count();
        let slots = before.len() as f64;
        Disruption {
            moved: moved.count() as f64 / slots,
            needless: needless as f64 / slots,
        }
    }

    #[test]
    fn removing_a_backend_moves_little_more_than_its_slots() {
        for n in [3, 5, 8, 10] {
            let all = names(n);
            for removed in 0..n {
                let mut fewer = all.clone();
                fewer.remove(removed);
                let Disruption { moved, needless } = disruption(&all, &fewer);
                let share = 1.0 / n as f64;
                assert!(
                    moved < share + 0.01 && needless < 0.01,
                    "{n} backends minus {removed}: {moved:.4} of slots moved (its share {share:.4}), \
                     {needless:.4} between survivors"
                );
            }
        }
    }

    #[test]
    fn adding_a_backend_moves_little_more_than_its_share() {
        for n in [3, 5, 8, 10] {
            let Disruption { moved, needless } = disruption(&names(n), &names(n + 1));
            let share = 1.0 / (n + 1) as f64;
            assert!(
                moved < share + 0.01 && needless < 0.01,
                "{n} -> {} backends: {moved:.4} of slots moved (new share {share:.4}), \
                 {needless:.4} between old backends",
                n + 1
            );
        }
    }

    #[test]
    fn ip_hashes_are_distinct_and_family_aware() {
        let v4 = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
        let v4_next = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));
        let v6 = IpAddr::V6("2001:db8::1".parse::<Ipv6Addr>().unwrap());
        let v6_compat = IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0xc000, 0x0201));
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped());
        assert_ne!(hash_ip(v4), hash_ip(v4_next));
        assert_ne!(hash_ip(v4), hash_ip(v6));
        // Same 4 bytes at the end, different family: different hash.
        assert_ne!(hash_ip(v4), hash_ip(v6_compat));
        // The same client seen through a dual-stack socket: same hash.
        assert_eq!(hash_ip(v4), hash_ip(mapped));
    }

    #[test]
    fn consecutive_ipv4_clients_spread_evenly() {
        let maglev = Maglev::new(&names(5), Maglev::DEFAULT_SIZE).unwrap();
        let mut counts = [0usize; 5];
        let base = u32::from(Ipv4Addr::new(10, 0, 0, 0));
        for i in 0..10_000u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(base + i));
            if let Some(backend) = maglev.lookup(hash_ip(ip)) {
                counts[backend] += 1;
            }
        }
        assert_eq!(counts.iter().sum::<usize>(), 10_000);
        for (i, &count) in counts.iter().enumerate() {
            assert!(
                (1700..=2300).contains(&count),
                "backend {i} got {count} of 10000 clients: {counts:?}"
            );
        }
    }
}
