//! spaced's stand-in for the `base2histogram` crate, which openraft uses for its runtime
//! statistics (replication and apply batch sizes, log-stage latencies).
//!
//! Why: the published `base2histogram` 0.2.3 builds, on the first `Histogram::new()`, the
//! lookup tables of all sixteen bucket widths it supports, though openraft only ever uses the
//! default one: about 26 MiB written and kept for the life of the process, more than half of an
//! idle node's resident memory (measured with heaptrack; `docs/benchmarks.md#footprint`).
//! The workspace's `[patch.crates-io]` puts this crate in its place. It is written for spaced,
//! not taken from that crate: it offers the items openraft uses (`Histogram` with `new`,
//! `record`, `record_n` and `percentile_stats`; `PercentileStats`; `AsciiChart` with `new`,
//! `add` and `detailed`) with the same meaning, in 2 KiB per histogram and no table.
//!
//! Buckets: values 0..=3 have one bucket each; above, each power of two is split into four
//! equal buckets (the value's two bits below its highest), so a percentile is at most 25 %
//! below the true value. A percentile reports the lowest value of its bucket.

use std::fmt;
use std::marker::PhantomData;

/// Sub-buckets per power of two (2 bits).
const SUB_BITS: u32 = 2;
const SUBS: usize = 1 << SUB_BITS;
/// Bucket count: 4 small values, then 4 per power of two from 2^2 to 2^63.
const BUCKETS: usize = SUBS + (64 - SUB_BITS as usize) * SUBS;

/// The bucket of `v`.
fn bucket(v: u64) -> usize {
    if v < SUBS as u64 {
        return v as usize;
    }
    let high = 63 - v.leading_zeros(); // >= SUB_BITS
    let sub = ((v >> (high - SUB_BITS)) as usize) & (SUBS - 1);
    SUBS + (high - SUB_BITS) as usize * SUBS + sub
}

/// The lowest value of bucket `b`.
fn bucket_low(b: usize) -> u64 {
    if b < SUBS {
        return b as u64;
    }
    let high = (b - SUBS) / SUBS + SUB_BITS as usize;
    let sub = ((b - SUBS) % SUBS) as u64;
    (1u64 << high) | (sub << (high - SUB_BITS as usize))
}

/// A histogram of `u64` samples in base-2 buckets. `T` is a marker kept for the caller's
/// types (openraft names `Histogram<()>`).
pub struct Histogram<T = ()> {
    counts: Vec<u64>,
    samples: u64,
    _marker: PhantomData<fn() -> T>,
}

impl<T> Histogram<T> {
    /// An empty histogram.
    pub fn new() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            samples: 0,
            _marker: PhantomData,
        }
    }

    /// Counts one sample of `value`.
    pub fn record(&mut self, value: u64) {
        self.record_n(value, 1);
    }

    /// Counts `n` samples of `value`.
    pub fn record_n(&mut self, value: u64, n: u64) {
        let b = bucket(value);
        self.counts[b] = self.counts[b].saturating_add(n);
        self.samples = self.samples.saturating_add(n);
    }

    /// Samples counted.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// The value at quantile `q` (0.0..=1.0): the lowest value of the bucket holding the
    /// sample of that rank; 0 for an empty histogram.
    pub fn percentile(&self, q: f64) -> u64 {
        if self.samples == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.samples as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (b, c) in self.counts.iter().enumerate() {
            seen = seen.saturating_add(*c);
            if seen >= rank {
                return bucket_low(b);
            }
        }
        bucket_low(BUCKETS - 1)
    }

    /// The percentiles openraft reports.
    pub fn percentile_stats(&self) -> PercentileStats {
        PercentileStats {
            samples: self.samples,
            p0_1: self.percentile(0.001),
            p1: self.percentile(0.01),
            p5: self.percentile(0.05),
            p10: self.percentile(0.10),
            p50: self.percentile(0.50),
            p90: self.percentile(0.90),
            p99: self.percentile(0.99),
            p99_9: self.percentile(0.999),
        }
    }
}

impl<T> Default for Histogram<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Clone for Histogram<T> {
    fn clone(&self) -> Self {
        Histogram {
            counts: self.counts.clone(),
            samples: self.samples,
            _marker: PhantomData,
        }
    }
}

impl<T> PartialEq for Histogram<T> {
    fn eq(&self, other: &Self) -> bool {
        self.samples == other.samples && self.counts == other.counts
    }
}

impl<T> Eq for Histogram<T> {}

impl<T> fmt::Debug for Histogram<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.percentile_stats();
        f.debug_struct("Histogram")
            .field("samples", &s.samples)
            .field("p50", &s.p50)
            .field("p99", &s.p99)
            .finish()
    }
}

/// Percentiles of a histogram (each the lowest value of its bucket).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PercentileStats {
    /// Samples counted.
    pub samples: u64,
    /// 0.1th percentile.
    pub p0_1: u64,
    /// 1st percentile.
    pub p1: u64,
    /// 5th percentile.
    pub p5: u64,
    /// 10th percentile.
    pub p10: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p99_9: u64,
}

impl fmt::Display for PercentileStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[n={}, p0.1={}, p1={}, p5={}, p10={}, p50={}, p90={}, p99={}, p99.9={}]",
            self.samples,
            self.p0_1,
            self.p1,
            self.p5,
            self.p10,
            self.p50,
            self.p90,
            self.p99,
            self.p99_9
        )
    }
}

/// Named histograms drawn as text, one line per series.
#[derive(Debug, Clone, Default)]
pub struct AsciiChart {
    series: Vec<(String, Histogram)>,
}

impl AsciiChart {
    /// An empty chart.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a series.
    pub fn add(mut self, name: &str, histogram: Histogram) -> Self {
        self.series.push((name.to_string(), histogram));
        self
    }

    /// Each series' samples and percentiles, with a bar for its median against the largest.
    pub fn detailed(&self) -> String {
        let widest = self
            .series
            .iter()
            .map(|(_, h)| h.percentile(0.5))
            .max()
            .unwrap_or(0)
            .max(1);
        let mut out = String::new();
        for (name, h) in &self.series {
            let s = h.percentile_stats();
            let bar = (s.p50.saturating_mul(40) / widest) as usize;
            out.push_str(&format!(
                "{name:>24} n={:<8} p50={:<8} p99={:<8} {}\n",
                s.samples,
                s.p50,
                s.p99,
                "#".repeat(bar)
            ));
        }
        out
    }
}

impl fmt::Display for AsciiChart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detailed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_hold_their_values() {
        let mut last = None;
        for b in 0..BUCKETS {
            let low = bucket_low(b);
            assert_eq!(bucket(low), b, "bucket {b} low {low}");
            if let Some(prev) = last {
                assert!(low > prev);
            }
            last = Some(low);
        }
        for v in [0, 1, 3, 4, 5, 7, 8, 1000, 1 << 40, u64::MAX] {
            let b = bucket(v);
            assert!(bucket_low(b) <= v);
            // At most 25 % below above the small values.
            assert!(v < 4 || bucket_low(b) as f64 >= v as f64 * 0.75, "{v}");
        }
    }

    #[test]
    fn percentiles_of_known_samples() {
        let mut h = Histogram::<()>::new();
        assert_eq!(h.percentile_stats(), PercentileStats::default());
        for v in 1..=1000u64 {
            h.record(v);
        }
        h.record_n(0, 0);
        let s = h.percentile_stats();
        assert_eq!(s.samples, 1000);
        // True values 500, 900, 990; each reported within its bucket (≤ 25 % low).
        for (got, want) in [(s.p50, 500u64), (s.p90, 900), (s.p99, 990), (s.p1, 10)] {
            assert!(
                got <= want && got as f64 >= want as f64 * 0.75,
                "{got} for {want}"
            );
        }
        let mut many = Histogram::<()>::new();
        many.record_n(7, 10);
        assert_eq!(many.percentile_stats().p50, 7);
        assert_eq!(many.samples(), 10);
        assert_ne!(many, h);
        assert_eq!(many.clone(), many);
    }

    #[test]
    fn the_chart_names_each_series() {
        let mut h = Histogram::new();
        h.record(100);
        let text = AsciiChart::new()
            .add("a→b", h.clone())
            .add("b→c", Histogram::new())
            .detailed();
        assert!(text.contains("a→b n=1"), "{text}");
        assert!(text.contains("b→c n=0"), "{text}");
        assert_eq!(text.lines().count(), 2);
    }
}
