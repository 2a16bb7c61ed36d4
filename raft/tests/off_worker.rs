//! The store never does sled work on an async worker: every sled call runs on a blocking
//! thread (`off_worker` in `store.rs`). A sled call can block, and a worker blocked in one holds
//! up the whole runtime: a soak saw a 4 s stall when a worker, filling one of sled's 512 KiB
//! log segments, allocated the next segment's buffer with a `mmap` that waited behind another
//! thread's `munmap`.
//!
//! The test drives the store from a current-thread runtime, so that every async step runs on
//! the test's own thread, and counts the allocations sled makes for its segment buffers (the
//! only 8 KiB-aligned allocations in the process) on that thread. A binary of its own, because
//! it watches the process's allocations with a global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use openraft::entry::RaftEntry;
use openraft::storage::{
    RaftLogReader, RaftLogStorage, RaftLogStorageExt, RaftSnapshotBuilder, RaftStateMachine,
};
use spaced_fabric::Command;
use spaced_raft::store;
use spaced_raft::types::{Entry, LogId};

/// Alignment of sled 0.34's segment buffers (`AlignedBuf`).
const SEGMENT_ALIGN: usize = 8192;

/// Segment buffers allocated by any thread, and by the runtime's thread.
static SEGMENTS: AtomicUsize = AtomicUsize::new(0);
static ON_RUNTIME_THREAD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Set on the thread that drives the current-thread runtime.
    static RUNTIME_THREAD: Cell<bool> = const { Cell::new(false) };
}

struct Watching;

// SAFETY: every call goes straight to the system allocator; only counters are added.
unsafe impl GlobalAlloc for Watching {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() == SEGMENT_ALIGN {
            SEGMENTS.fetch_add(1, Ordering::Relaxed);
            if RUNTIME_THREAD.with(Cell::get) {
                ON_RUNTIME_THREAD.fetch_add(1, Ordering::Relaxed);
            }
        }
        // SAFETY: the caller's layout is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Watching = Watching;

fn log_id(index: u64) -> LogId {
    openraft::LogId::new(
        openraft::impls::leader_id_adv::LeaderId {
            term: 1,
            node_id: 1,
        },
        index,
    )
}

fn entry(index: u64) -> Entry {
    Entry::new_normal(
        log_id(index),
        Command::Probe {
            bytes: vec![index as u8; 1000],
        },
    )
}

#[test]
fn sled_work_never_runs_on_the_runtime_thread() {
    let dir = tempfile::tempdir().expect("temp dir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // Opening allocates the first segment's buffer here, once, at start-up: counted from after.
    let (mut log, mut sm) = store::open(dir.path()).expect("open the store");
    RUNTIME_THREAD.with(|t| t.set(true));
    rt.block_on(async {
        let mut reader = log.get_log_reader().await;
        log.save_vote(&spaced_raft::types::Vote::new(1, 1))
            .await
            .expect("save vote");
        // What a node's Raft core does under a commit load: append, note the commit, read
        // entries back for replication, purge after snapshots, read its state.
        const BATCH: u64 = 10;
        for batch in 0..600u64 {
            let first = batch * BATCH + 1;
            let last = first + BATCH - 1;
            log.blocking_append((first..=last).map(entry))
                .await
                .expect("append");
            log.save_committed(Some(log_id(last)))
                .await
                .expect("save committed");
            let read = reader
                .try_get_log_entries(first..=last)
                .await
                .expect("read entries");
            assert_eq!(read.len(), BATCH as usize);
            if batch % 100 == 99 {
                sm.build_snapshot().await.expect("snapshot");
                log.purge(log_id(last - 500)).await.expect("purge");
                sm.get_current_snapshot().await.expect("read snapshot");
            }
        }
        let state = log.get_log_state().await.expect("log state");
        assert_eq!(state.last_log_id, Some(log_id(6000)));
        assert_eq!(
            log.read_committed().await.expect("committed"),
            Some(log_id(6000))
        );
        log.read_vote().await.expect("vote");
    });
    RUNTIME_THREAD.with(|t| t.set(false));
    let segments = SEGMENTS.load(Ordering::Relaxed);
    let on_runtime = ON_RUNTIME_THREAD.load(Ordering::Relaxed);
    // 6 MB of entries fill a dozen 512 KiB segments at least: a workload too small to fill
    // any would prove nothing.
    assert!(
        segments >= 10,
        "only {segments} segment buffers allocated: the workload did not exercise sled"
    );
    assert_eq!(
        on_runtime, 0,
        "{on_runtime} of {segments} segment buffers were allocated on the runtime's thread: sled work ran on an async worker"
    );
}
