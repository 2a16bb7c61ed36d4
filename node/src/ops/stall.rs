//! A probe of the async runtime's responsiveness: a task that asks to wake every
//! [`PROBE_EVERY`] and measures how late it actually ran. Blocking work on a runtime worker
//! (a long lock, a synchronous disk write) or a CPU-starved host shows up here first, before
//! it costs a lease renewal: the lateness goes to a histogram, and a stall past
//! [`WARN_AFTER`] is logged with its length and with where the time went (see [`Where`]):
//! the probe keeps a sample of every thread's time on and waiting for a CPU, and of the
//! time the hypervisor stole, and the warning compares it with one taken when the stall ends.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::metrics::NodeMetrics;

/// How often the probe asks to run.
pub const PROBE_EVERY: Duration = Duration::from_millis(20);
/// Lateness worth a warning: a fifth of the default VIP lease.
pub const WARN_AFTER: Duration = Duration::from_millis(30);
/// How often the CPU accounting is sampled: a stall's window is the stall and up to this
/// much before it. Each sample reads one small `/proc` file per thread.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// How long the probe may stay silent before a watcher thread, outside the runtime, looks at
/// what the daemon's threads are doing: where each one sleeps in the kernel, while the stall
/// lasts (afterwards only the sums in `/proc` are left).
const LOOK_AFTER: Duration = Duration::from_millis(250);
/// How often the watcher thread wakes to check.
const WATCH_EVERY: Duration = Duration::from_millis(50);

/// Runs until `stop` turns true.
pub async fn probe(metrics: Arc<NodeMetrics>, mut stop: watch::Receiver<bool>) {
    let ticks_per_s = clock_ticks_per_second();
    let mut last_sample = CpuSample::read(ticks_per_s);
    let watch = Watcher::start();
    loop {
        let asked = Instant::now() + PROBE_EVERY;
        tokio::select! {
            _ = tokio::time::sleep_until(asked.into()) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if let Some(w) = &watch {
            w.beat();
        }
        let late = Instant::now().saturating_duration_since(asked);
        metrics.runtime_lateness(late);
        if late >= WARN_AFTER {
            let now = CpuSample::read(ticks_per_s);
            let w = Where::between(&last_sample, &now);
            tracing::warn!(
                late_ms = late.as_millis() as u64,
                window_ms = w.window.as_millis() as u64,
                cpu_wait_ms = w.longest_wait.as_millis() as u64,
                cpu_wait_thread = %w.longest_wait_thread,
                busiest_ran_ms = w.longest_run.as_millis() as u64,
                busiest_thread = %w.longest_run_thread,
                steal_ms = w.steal.as_millis() as u64,
                cause = w.cause(late),
                "async runtime stalled: a task ran {} ms late (blocking work on a worker, or CPU starvation)",
                late.as_millis()
            );
            last_sample = now;
        } else if last_sample.at.elapsed() >= SAMPLE_EVERY {
            last_sample = CpuSample::read(ticks_per_s);
        }
    }
}

/// A thread that logs where the daemon's threads wait when the probe has not run for
/// [`LOOK_AFTER`]; it ends when its handle (held by the probe) is dropped.
struct Watcher {
    /// Milliseconds since `base` at the probe's last run.
    last: Arc<AtomicU64>,
    base: Instant,
    done: Arc<AtomicBool>,
}

impl Watcher {
    /// Starts the thread; `None` (said in the log) if it cannot be.
    fn start() -> Option<Watcher> {
        let w = Watcher {
            last: Arc::new(AtomicU64::new(0)),
            base: Instant::now(),
            done: Arc::new(AtomicBool::new(false)),
        };
        let (last, base, done) = (w.last.clone(), w.base, w.done.clone());
        let started = std::thread::Builder::new()
            .name("spaced-stallwatch".into())
            .spawn(move || {
                let mut told = false;
                while !done.load(Ordering::Relaxed) {
                    std::thread::sleep(WATCH_EVERY);
                    let now = base.elapsed().as_millis() as u64;
                    let silent = Duration::from_millis(now.saturating_sub(last.load(Ordering::Relaxed)));
                    if silent < LOOK_AFTER {
                        told = false;
                    } else if !told {
                        told = true;
                        tracing::warn!(
                            silent_ms = silent.as_millis() as u64,
                            threads = %threads_now(),
                            "async runtime silent: where each thread waits (name, state, kernel wait channel)"
                        );
                    }
                }
            });
        match started {
            Ok(_) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the stall watcher thread");
                None
            }
        }
    }

    fn beat(&self) {
        self.last
            .store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

/// Each of the process's threads as `name state wchan`, and for a thread in uninterruptible
/// sleep (`D`: disk, memory) the top of its kernel stack where readable (root).
fn threads_now() -> String {
    let mut out = Vec::new();
    for (_, path) in tasks() {
        let read = |f: &str| task_file(&path, f);
        let name = read("comm");
        let stat = read("stat");
        let state = stat
            .rfind(')')
            .and_then(|i| stat.get(i + 2..i + 3))
            .unwrap_or("?")
            .to_string();
        let wchan = read("wchan");
        let mut line = format!(
            "{name} {state} {}",
            if wchan.is_empty() { "-" } else { &wchan }
        );
        if state == "D" {
            let stack: Vec<String> = read("stack")
                .lines()
                .take(6)
                .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
                .collect();
            if !stack.is_empty() {
                line += &format!(" [{}]", stack.join(" < "));
            }
        }
        out.push(line);
    }
    if out.is_empty() {
        return "unreadable".into();
    }
    out.sort();
    out.join("; ")
}

/// The process's threads: id and `/proc/self/task/<tid>` directory (none if unreadable).
fn tasks() -> Vec<(u32, PathBuf)> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path())))
        .collect()
}

/// One file of a thread's `/proc` directory, its trailing newline cut; empty if unreadable
/// (the thread may have ended).
fn task_file(task: &Path, file: &str) -> String {
    let mut text = std::fs::read_to_string(task.join(file)).unwrap_or_default();
    text.truncate(text.trim_end().len());
    text
}

/// `USER_HZ`, the unit of `/proc/stat`; 100 where the kernel will not say.
fn clock_ticks_per_second() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(n)) if n > 0 => n as u64,
        _ => 100,
    }
}

/// The process's threads' CPU accounting and the host's stolen time at one instant.
#[derive(Clone, Debug)]
struct CpuSample {
    at: Instant,
    /// Per thread id: its name, nanoseconds on a CPU, nanoseconds runnable but waiting for one
    /// (`/proc/self/task/<tid>/schedstat`).
    threads: HashMap<u32, (String, u64, u64)>,
    /// Time the hypervisor ran something else while a CPU of this host wanted to run
    /// (`steal` of `/proc/stat`), summed over CPUs.
    steal: Duration,
}

impl CpuSample {
    /// Reads `/proc`; what cannot be read counts as nothing (the warning is still logged).
    fn read(ticks_per_s: u64) -> CpuSample {
        let at = Instant::now();
        let mut threads = HashMap::new();
        for (tid, path) in tasks() {
            if let Some((run, wait)) = parse_schedstat(&task_file(&path, "schedstat")) {
                threads.insert(tid, (task_file(&path, "comm"), run, wait));
            }
        }
        let steal = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| parse_steal_ticks(&s))
            .map_or(Duration::ZERO, |t| {
                Duration::from_nanos(t.saturating_mul(1_000_000_000) / ticks_per_s.max(1))
            });
        CpuSample { at, threads, steal }
    }
}

/// `run_ns wait_ns timeslices` of a `schedstat` file: the first two.
fn parse_schedstat(s: &str) -> Option<(u64, u64)> {
    let mut f = s.split_ascii_whitespace();
    let run = f.next()?.parse().ok()?;
    let wait = f.next()?.parse().ok()?;
    Some((run, wait))
}

/// The `steal` field of `/proc/stat`'s first (all-CPU) line, in clock ticks: the eighth
/// number after `cpu` (user nice system idle iowait irq softirq steal).
fn parse_steal_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().next()?;
    let mut f = line.split_ascii_whitespace();
    if f.next()? != "cpu" {
        return None;
    }
    f.nth(7)?.parse().ok()
}

/// Where a stall's time went, between two samples.
#[derive(Clone, Debug, PartialEq)]
struct Where {
    /// Between the samples: the stall and up to [`SAMPLE_EVERY`] before it.
    window: Duration,
    /// The longest any one thread was runnable but not running, and its name.
    longest_wait: Duration,
    longest_wait_thread: String,
    /// The longest any one thread ran, and its name.
    longest_run: Duration,
    longest_run_thread: String,
    /// Stolen by the hypervisor, summed over the host's CPUs.
    steal: Duration,
}

impl Where {
    fn between(before: &CpuSample, after: &CpuSample) -> Where {
        let mut w = Where {
            window: after.at.saturating_duration_since(before.at),
            longest_wait: Duration::ZERO,
            longest_wait_thread: String::new(),
            longest_run: Duration::ZERO,
            longest_run_thread: String::new(),
            steal: after.steal.saturating_sub(before.steal),
        };
        for (tid, (name, run, wait)) in &after.threads {
            // A thread started inside the window counts from zero.
            let (run0, wait0) = before.threads.get(tid).map_or((0, 0), |(_, r, w)| (*r, *w));
            let ran = Duration::from_nanos(run.saturating_sub(run0));
            let waited = Duration::from_nanos(wait.saturating_sub(wait0));
            if waited > w.longest_wait {
                w.longest_wait = waited;
                w.longest_wait_thread = name.clone();
            }
            if ran > w.longest_run {
                w.longest_run = ran;
                w.longest_run_thread = name.clone();
            }
        }
        w
    }

    /// The likeliest cause of a stall `late` long: whichever of steal, waiting for a CPU and
    /// one thread's running covers at least half of it, in that order; otherwise the threads
    /// were off the CPU, blocked in the kernel (disk, a lock, memory).
    fn cause(&self, late: Duration) -> &'static str {
        let half = late / 2;
        if self.steal >= half {
            "hypervisor steal"
        } else if self.longest_wait >= half {
            "waiting for a CPU"
        } else if self.longest_run >= half {
            "a thread busy on a CPU"
        } else {
            "threads blocked off the CPU"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedstat_and_steal_parse_and_bad_text_is_none() {
        assert_eq!(
            parse_schedstat("2734388481 2842337257 54845\n"),
            Some((2734388481, 2842337257))
        );
        assert_eq!(parse_schedstat("12\n"), None);
        assert_eq!(parse_schedstat("x y z"), None);
        let stat =
            "cpu  2495928 43272 440341 5410039 8969 0 54781 746 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        assert_eq!(parse_steal_ticks(stat), Some(746));
        assert_eq!(parse_steal_ticks("cpu0 1 2 3 4 5 6 7 8\n"), None);
        assert_eq!(parse_steal_ticks("cpu 1 2 3\n"), None);
    }

    fn sample(at: Instant, threads: &[(u32, &str, u64, u64)], steal_ms: u64) -> CpuSample {
        CpuSample {
            at,
            threads: threads
                .iter()
                .map(|(t, n, r, w)| (*t, (n.to_string(), *r, *w)))
                .collect(),
            steal: Duration::from_millis(steal_ms),
        }
    }

    #[test]
    fn a_stall_is_put_down_to_steal_cpu_wait_a_busy_thread_or_blocking() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(600);
        let ms = 1_000_000;
        let before = sample(
            t0,
            &[
                (1, "tokio-rt-worker", 100 * ms, 50 * ms),
                (2, "sled-io-0", 0, 0),
            ],
            10,
        );
        let late = Duration::from_millis(400);

        let waited = sample(
            t1,
            &[
                (1, "tokio-rt-worker", 110 * ms, 450 * ms),
                (2, "sled-io-0", 5 * ms, 0),
            ],
            10,
        );
        let w = Where::between(&before, &waited);
        assert_eq!(w.window, Duration::from_millis(600));
        assert_eq!(w.longest_wait, Duration::from_millis(400));
        assert_eq!(w.longest_wait_thread, "tokio-rt-worker");
        assert_eq!(w.longest_run, Duration::from_millis(10));
        assert_eq!(w.cause(late), "waiting for a CPU");

        let stolen = sample(t1, &[(1, "tokio-rt-worker", 100 * ms, 50 * ms)], 390);
        assert_eq!(
            Where::between(&before, &stolen).cause(late),
            "hypervisor steal"
        );

        // A thread born in the window counts from zero.
        let busy = sample(
            t1,
            &[
                (1, "tokio-rt-worker", 100 * ms, 50 * ms),
                (3, "tokio-rt-worker", 300 * ms, 0),
            ],
            10,
        );
        let w = Where::between(&before, &busy);
        assert_eq!(
            (w.longest_run, w.cause(late)),
            (Duration::from_millis(300), "a thread busy on a CPU")
        );

        let blocked = sample(t1, &[(1, "tokio-rt-worker", 101 * ms, 51 * ms)], 10);
        assert_eq!(
            Where::between(&before, &blocked).cause(late),
            "threads blocked off the CPU"
        );
    }

    #[test]
    fn the_threads_are_listed_with_state_and_wait_channel() {
        // This test's own thread is running; each entry has a name, a state and a channel. A
        // thread of the test harness that ends while the list is read shows as unreadable
        // (` ? -`), and once in CI the list came out without this thread's entry: read again.
        let mut t = String::new();
        for _ in 0..20 {
            t = threads_now();
            assert!(t.split("; ").all(|e| e.split(' ').count() >= 3), "{t}");
            if t.split("; ").any(|e| e.split(' ').nth(1) == Some("R")) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        panic!("no running thread listed: {t}");
    }

    #[test]
    fn this_process_can_be_sampled() {
        let s = CpuSample::read(clock_ticks_per_second());
        // The test's own thread is one of them.
        assert!(!s.threads.is_empty(), "no thread read from /proc/self/task");
    }
}
