//! The metrics registry under a steady stream of histogram samples and no scrape: with the
//! upkeep the daemon's metrics loop runs, its memory stays flat and every sample is counted.
//! (Without it the recorder kept each sample until a scrape: about 16 bytes a commit.)
//!
//! A binary of its own, because it counts the process's live heap with a global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use spaced_node::ops::metrics::NodeMetrics;

/// Bytes allocated and not yet freed, by the whole process.
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// SAFETY: every call goes straight to the system allocator; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's layout is passed on unchanged.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn a_million_unscraped_samples_leave_the_heap_flat_and_are_all_counted() {
    const SAMPLES: usize = 1_000_000;
    let m = NodeMetrics::new();
    let commits = m.commit_latency_histogram();
    // Warm up: the first samples and upkeep allocate the buckets once.
    commits.record(0.002);
    m.runtime_lateness(Duration::from_millis(1));
    m.upkeep();
    let before = LIVE.load(Ordering::SeqCst);
    let mut peak = before;
    for i in 0..SAMPLES {
        commits.record(0.002);
        if i % 100 == 0 {
            m.runtime_lateness(Duration::from_millis(1));
        }
        // The loop drains every half second: at 1,000 commits a second, every 500 samples;
        // every 20,000 here is forty times less often and still must not grow.
        if i % 20_000 == 0 {
            m.upkeep();
            peak = peak.max(LIVE.load(Ordering::SeqCst));
        }
    }
    m.upkeep();
    let grown = LIVE.load(Ordering::SeqCst) - before;
    // A drained batch is freed through epoch-based reclamation, so up to about one batch
    // between drains (20,000 samples, ~330 KB) may still be held; without the drains the
    // heap grows by about 16.5 MB.
    assert!(
        grown < 2 * 1024 * 1024,
        "the heap grew by {grown} bytes over {SAMPLES} samples (peak {} above the start)",
        peak - before
    );
    let text = m.render();
    assert!(
        text.contains(&format!(
            "spaced_commit_latency_seconds_count {}",
            SAMPLES + 1
        )),
        "not every sample was counted:\n{text}"
    );
}
