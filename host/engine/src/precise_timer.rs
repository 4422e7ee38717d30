//! A sleep that ends when it should, not at tokio's next millisecond tick.
//!
//! tokio's timer wheel has a 1 ms resolution: `sleep(300 µs)` returns after 1–2 ms. That is
//! fine for timeouts, but the dynamic batcher's `max_queue_delay` is usually a few hundred
//! microseconds, and rounding it up to the tick makes every waiting request pay up to a full
//! millisecond more than configured. [`sleep_until`] instead registers the deadline with one
//! process-wide timer thread, which waits on a condition variable with a nanosecond timeout
//! (a futex wait on Linux, ending within the kernel's timer slack, ~50 µs) and wakes the
//! future's task when the deadline passes.
//!
//! The thread holds a min-heap of deadlines. A sleep dropped before its deadline leaves a stale
//! entry (its waker slot emptied); once stale entries are half the heap they are swept out, so
//! the heap holds at most about twice the live sleeps, whatever the deadlines.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

/// One pending sleep: its waker (taken when it fires or is dropped) and whether it fired.
#[derive(Default)]
struct Slot {
    waker: Option<Waker>,
    fired: bool,
}

struct Entry {
    deadline: Instant,
    sequence: u64,
    slot: Arc<Mutex<Slot>>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.deadline, self.sequence) == (other.deadline, other.sequence)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.deadline, self.sequence).cmp(&(other.deadline, other.sequence))
    }
}

#[derive(Default)]
struct Deadlines {
    heap: BinaryHeap<Reverse<Entry>>,
    sequence: u64,
    /// Entries of sleeps dropped before their deadline, still in the heap.
    stale: usize,
}

/// The smallest heap worth sweeping for stale entries.
const SWEEP_FLOOR: usize = 64;

struct TimerThread {
    deadlines: Mutex<Deadlines>,
    changed: Condvar,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data, never left half-updated: a poisoned lock is still consistent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The timer thread, started on first use. `None` if the thread could not be spawned (then
/// sleeps fall back to tokio's timer).
fn timer() -> Option<&'static Arc<TimerThread>> {
    static TIMER: OnceLock<Option<Arc<TimerThread>>> = OnceLock::new();
    TIMER
        .get_or_init(|| {
            let timer = Arc::new(TimerThread {
                deadlines: Mutex::new(Deadlines::default()),
                changed: Condvar::new(),
            });
            let running = Arc::clone(&timer);
            std::thread::Builder::new()
                .name("weft-batch-timer".into())
                .spawn(move || running.run())
                .ok()
                .map(|_| timer)
        })
        .as_ref()
}

impl TimerThread {
    fn run(&self) {
        let mut deadlines = lock(&self.deadlines);
        loop {
            let now = Instant::now();
            while deadlines
                .heap
                .peek()
                .is_some_and(|Reverse(entry)| entry.deadline <= now)
            {
                if let Some(Reverse(entry)) = deadlines.heap.pop() {
                    let waker = {
                        let mut slot = lock(&entry.slot);
                        slot.fired = true;
                        slot.waker.take()
                    };
                    match waker {
                        Some(waker) => waker.wake(),
                        None => deadlines.stale = deadlines.stale.saturating_sub(1),
                    }
                }
            }
            deadlines = match deadlines.heap.peek() {
                Some(Reverse(entry)) => {
                    let wait = entry.deadline.saturating_duration_since(now);
                    self.changed
                        .wait_timeout(deadlines, wait)
                        .map(|(guard, _)| guard)
                        .unwrap_or_else(|poisoned| poisoned.into_inner().0)
                }
                None => self
                    .changed
                    .wait(deadlines)
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
            };
        }
    }
}

/// Completes at `deadline` (within the kernel's timer slack), woken by the timer thread.
pub fn sleep_until(deadline: Instant) -> PreciseSleep {
    PreciseSleep {
        deadline,
        slot: None,
        fallback: None,
    }
}

/// The future of [`sleep_until`].
pub struct PreciseSleep {
    deadline: Instant,
    /// Registered with the timer thread on first poll.
    slot: Option<Arc<Mutex<Slot>>>,
    /// tokio's sleep, used only when the timer thread could not start.
    fallback: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Future for PreciseSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.deadline {
            return Poll::Ready(());
        }
        if let Some(fallback) = self.fallback.as_mut() {
            return fallback.as_mut().poll(context);
        }
        if let Some(slot) = &self.slot {
            let mut slot = lock(slot);
            if slot.fired {
                return Poll::Ready(());
            }
            slot.waker = Some(context.waker().clone());
            return Poll::Pending;
        }
        let Some(timer) = timer() else {
            let deadline = tokio::time::Instant::from_std(self.deadline);
            let mut fallback = Box::pin(tokio::time::sleep_until(deadline));
            let poll = fallback.as_mut().poll(context);
            self.fallback = Some(fallback);
            return poll;
        };
        let slot = Arc::new(Mutex::new(Slot {
            waker: Some(context.waker().clone()),
            fired: false,
        }));
        {
            let mut deadlines = lock(&timer.deadlines);
            deadlines.sequence += 1;
            let sequence = deadlines.sequence;
            let earliest = deadlines
                .heap
                .peek()
                .is_none_or(|Reverse(first)| self.deadline < first.deadline);
            deadlines.heap.push(Reverse(Entry {
                deadline: self.deadline,
                sequence,
                slot: Arc::clone(&slot),
            }));
            if earliest {
                timer.changed.notify_one();
            }
        }
        self.slot = Some(slot);
        Poll::Pending
    }
}

impl Drop for PreciseSleep {
    fn drop(&mut self) {
        let Some(slot) = &self.slot else {
            return;
        };
        let pending = {
            let mut slot = lock(slot);
            slot.waker = None;
            !slot.fired
        };
        // Its entry is stale now (it wakes no one); sweep the stale ones out once they are
        // half the heap.
        if let (true, Some(timer)) = (pending, timer()) {
            let mut deadlines = lock(&timer.deadlines);
            deadlines.stale += 1;
            if deadlines.heap.len() >= SWEEP_FLOOR && deadlines.stale * 2 >= deadlines.heap.len() {
                deadlines.heap.retain(|Reverse(entry)| {
                    let slot = lock(&entry.slot);
                    slot.waker.is_some() && !slot.fired
                });
                deadlines.stale = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn sleeps_end_in_deadline_order_and_not_before_it() {
        let start = Instant::now();
        let later = tokio::spawn(sleep_until(start + Duration::from_millis(30)));
        sleep_until(start + Duration::from_millis(3)).await;
        assert!(start.elapsed() >= Duration::from_millis(3));
        assert!(!later.is_finished());
        later.await.unwrap();
        assert!(start.elapsed() >= Duration::from_millis(30));
    }

    #[tokio::test]
    async fn sleeps_dropped_early_do_not_pile_up_in_the_heap() {
        let far = Instant::now() + Duration::from_secs(3600);
        for _ in 0..10_000 {
            let mut sleep = std::pin::pin!(sleep_until(far));
            let waker = futures_util::task::noop_waker();
            let _ = sleep.as_mut().poll(&mut Context::from_waker(&waker));
        }
        let held = timer().map(|t| lock(&t.deadlines).heap.len()).unwrap_or(0);
        // Other tests' sleeps may be live at the same time; never thousands.
        assert!(
            held < 1_000,
            "{held} entries held for 10,000 dropped sleeps"
        );
    }

    #[tokio::test]
    async fn a_dropped_sleep_does_not_disturb_the_next() {
        let start = Instant::now();
        drop(
            tokio::time::timeout(
                Duration::from_millis(1),
                sleep_until(start + Duration::from_millis(50)),
            )
            .await,
        );
        sleep_until(start + Duration::from_millis(5)).await;
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(5) && took < Duration::from_millis(50));
    }
}
