//! Busy-polling the cores while the server is busy (`weft serve --busy-poll-us`).
//!
//! One request crosses several threads: the HTTP task, the model's batcher, the thread that
//! runs ONNX Runtime, plugin calls, and back. Each hand-off wakes a thread; when its core went
//! idle in between, the wake-up also pays for bringing the core out of its idle state, which on
//! a virtual machine is a halt and an exit to the hypervisor (tens of microseconds). Under load
//! on a small machine those exits are a large share of a light request's cost: a profile of
//! `mlp-batched` at concurrency 64 spent 45 % of its time in the kernel. Keeping the cores busy
//! with lowest-priority spinning cut the `classify` graph's p50 at concurrency 1 by about a
//! third (BENCHMARKS.md).
//!
//! [`BusyPoll`] is that spinning, done on purpose: one thread per core under Linux's
//! `SCHED_IDLE` policy spins (with the CPU's pause hint) for as long as a request arrived
//! within the last `window`, then sleeps until the next request. The scheduler preempts an
//! idle-policy thread as soon as any other thread wakes on its core, so it only fills time the
//! core would have spent halted (at nice 19 instead, a woken thread sometimes waited for the
//! next scheduler tick: p99 latencies of 2 ms at concurrency 1). It costs CPU time while the
//! server is busy (counted against a container's CPU quota), which is why it is off by default,
//! as ONNX Runtime's and DPDK's spin-waiting are opt-in.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The spinners and the time of the last request they keep the cores awake for.
pub struct BusyPoll {
    started: Instant,
    /// Nanoseconds after `started` of the last [`BusyPoll::touch`].
    last: AtomicU64,
    /// Spinners asleep now (waiting for a request).
    asleep: AtomicUsize,
    lock: Mutex<()>,
    woken: Condvar,
    window: Duration,
}

impl std::fmt::Debug for BusyPoll {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusyPoll")
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl BusyPoll {
    /// Starts `threads` spinners that keep spinning for `window` after each request.
    pub fn start(threads: usize, window: Duration) -> std::io::Result<Arc<Self>> {
        let poll = Arc::new(BusyPoll {
            started: Instant::now(),
            last: AtomicU64::new(0),
            asleep: AtomicUsize::new(0),
            lock: Mutex::new(()),
            woken: Condvar::new(),
            window,
        });
        for index in 0..threads {
            let spinner = Arc::clone(&poll);
            std::thread::Builder::new()
                .name(format!("weft-busy-poll-{index}"))
                .spawn(move || spinner.spin())?;
        }
        Ok(poll)
    }

    fn now(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// A request arrived: keep (or start) spinning for another `window`.
    pub fn touch(&self) {
        self.last.store(self.now(), Ordering::SeqCst);
        // Paired with the spinner's increment then re-check: one of the two sees the other.
        if self.asleep.load(Ordering::SeqCst) > 0 {
            let _held = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.woken.notify_all();
        }
    }

    fn busy(&self) -> bool {
        let window = u64::try_from(self.window.as_nanos()).unwrap_or(u64::MAX);
        self.now().saturating_sub(self.last.load(Ordering::SeqCst)) < window
    }

    fn spin(&self) {
        // Lowest priority: any other runnable thread of the machine runs first. Failing to
        // lower it would make spinning compete with real work: stop instead.
        if let Err(error) = crate::thread_priority::become_idle() {
            tracing::warn!(%error, "--busy-poll-us: cannot use SCHED_IDLE; busy polling is off");
            return;
        }
        loop {
            if self.busy() {
                for _ in 0..64 {
                    std::hint::spin_loop();
                }
                continue;
            }
            let mut held = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.asleep.fetch_add(1, Ordering::SeqCst);
            while !self.busy() {
                held = match self.woken.wait_timeout(held, Duration::from_secs(1)) {
                    Ok((held, _)) => held,
                    Err(poisoned) => poisoned.into_inner().0,
                };
            }
            self.asleep.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// How many spinners are asleep (no request within the window).
    #[cfg(test)]
    fn sleeping(&self) -> usize {
        self.asleep.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn wait_until(what: impl Fn() -> bool) -> bool {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if what() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    #[test]
    fn spinners_sleep_when_idle_and_wake_on_a_request() {
        let poll = BusyPoll::start(2, Duration::from_millis(50)).unwrap();
        assert!(wait_until(|| poll.sleeping() == 2), "idle spinners sleep");
        poll.touch();
        assert!(wait_until(|| poll.sleeping() == 0), "a request wakes them");
        assert!(poll.busy());
        assert!(
            wait_until(|| poll.sleeping() == 2),
            "they sleep again after the window"
        );
    }
}
