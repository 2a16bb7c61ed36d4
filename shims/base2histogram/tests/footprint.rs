//! Making histograms (as openraft does when a Raft node starts) costs a few KiB, not the
//! tens of MiB of lookup tables the published crate builds: counted with an allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn sixteen_histograms_take_less_than_64_kib() {
    let before = ALLOCATED.load(Ordering::Relaxed);
    let mut all: Vec<base2histogram::Histogram> =
        (0..16).map(|_| base2histogram::Histogram::new()).collect();
    for (i, h) in all.iter_mut().enumerate() {
        h.record(i as u64 * 1000);
        let _ = h.percentile_stats();
    }
    let used = ALLOCATED.load(Ordering::Relaxed) - before;
    assert!(used < 64 * 1024, "{used} bytes for 16 histograms");
}
