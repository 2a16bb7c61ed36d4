//! A probe of the async runtime's responsiveness: a task that asks to wake every
//! [`PROBE_EVERY`] and measures how late it actually ran. Blocking work on a runtime worker
//! (a long lock, a synchronous disk write) or a CPU-starved host shows up here first, before
//! it costs a lease renewal: the lateness goes to a histogram, and a stall past
//! [`WARN_AFTER`] is logged with its length.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::metrics::NodeMetrics;

/// How often the probe asks to run.
pub const PROBE_EVERY: Duration = Duration::from_millis(20);
/// Lateness worth a warning: a fifth of the default VIP lease.
pub const WARN_AFTER: Duration = Duration::from_millis(30);

/// Runs until `stop` turns true.
pub async fn probe(metrics: Arc<NodeMetrics>, mut stop: watch::Receiver<bool>) {
    loop {
        let asked = Instant::now() + PROBE_EVERY;
        tokio::select! {
            _ = tokio::time::sleep_until(asked.into()) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let late = Instant::now().saturating_duration_since(asked);
        metrics.runtime_lateness(late);
        if late >= WARN_AFTER {
            tracing::warn!(
                late_ms = late.as_millis() as u64,
                "async runtime stalled: a task ran {} ms late (blocking work on a worker, or CPU starvation)",
                late.as_millis()
            );
        }
    }
}
