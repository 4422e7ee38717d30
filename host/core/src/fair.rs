//! Fair shares of a bounded pool among tenants.
//!
//! A [`FairGate`] hands out at most `capacity` permits, at most `per_key` of them to one key
//! (a tenant). When the pool is busy a caller waits (its own deadline bounds the wait) instead
//! of failing, and each freed permit goes to the waiter whose key holds the fewest permits;
//! among equals, to the key served longest ago (round robin), then first come first served. So
//! a tenant that floods the pool gets its share and the others keep theirs, even with a pool of
//! one where every key holds none between turns. The plugin runtime uses one gate for instances
//! in flight and one for CPU turns; the engine one per shared model's sessions and batch turns.
//!
//! Cancellation is safe: a waiter that gives up (its future is dropped) is skipped, and a
//! permit handed to it comes straight back to the pool.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

/// Whom a permit is counted against; `None` is the process itself (repository calls without a
/// tenant).
pub type ShareKey = Option<Arc<str>>;

/// A bounded pool shared fairly between keys.
#[derive(Clone)]
pub struct FairGate {
    state: Arc<Mutex<GateState>>,
}

struct GateState {
    capacity: usize,
    per_key: usize,
    in_use: usize,
    held: HashMap<ShareKey, usize>,
    /// When each key was last granted a permit (a grant counter), for round robin among keys
    /// that hold equally many. Pruned to keys holding or waiting.
    served: HashMap<ShareKey, u64>,
    grants: u64,
    waiters: VecDeque<Waiter>,
}

struct Waiter {
    key: ShareKey,
    reply: oneshot::Sender<FairPermit>,
}

/// One unit of a [`FairGate`]; returns to the gate (and to the fairest waiter) when dropped.
pub struct FairPermit {
    state: Option<Arc<Mutex<GateState>>>,
    key: ShareKey,
}

impl std::fmt::Debug for FairPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FairPermit({:?})", self.key)
    }
}

fn lock(state: &Mutex<GateState>) -> MutexGuard<'_, GateState> {
    // The state is a few counters updated under the lock without panicking code in between;
    // a poisoned lock still holds consistent counts.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl GateState {
    fn held_by(&self, key: &ShareKey) -> usize {
        self.held.get(key).copied().unwrap_or(0)
    }

    fn can_grant(&self, key: &ShareKey) -> bool {
        self.in_use < self.capacity && self.held_by(key) < self.per_key
    }

    fn count_in(&mut self, key: &ShareKey) {
        self.in_use += 1;
        *self.held.entry(key.clone()).or_insert(0) += 1;
        self.grants += 1;
        self.served.insert(key.clone(), self.grants);
    }

    fn served_at(&self, key: &ShareKey) -> u64 {
        self.served.get(key).copied().unwrap_or(0)
    }

    /// Forgets the turns of keys that neither hold nor wait, once there are many of them.
    fn prune_served(&mut self) {
        if self.served.len() <= 2 * (self.held.len() + self.waiters.len()) + 64 {
            return;
        }
        let waiting: std::collections::HashSet<&ShareKey> =
            self.waiters.iter().map(|waiter| &waiter.key).collect();
        let held = &self.held;
        self.served
            .retain(|key, _| held.contains_key(key) || waiting.contains(key));
    }

    fn count_out(&mut self, key: &ShareKey) {
        self.in_use = self.in_use.saturating_sub(1);
        if let Some(held) = self.held.get_mut(key) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                self.held.remove(key);
            }
        }
    }
}

impl FairGate {
    /// A gate of `capacity` permits, at most `per_key` of them to one key (both at least 1).
    pub fn new(capacity: usize, per_key: usize) -> Self {
        let capacity = capacity.max(1);
        FairGate {
            state: Arc::new(Mutex::new(GateState {
                capacity,
                per_key: per_key.clamp(1, capacity),
                in_use: 0,
                held: HashMap::new(),
                served: HashMap::new(),
                grants: 0,
                waiters: VecDeque::new(),
            })),
        }
    }

    /// A permit for `key` if the pool and the key's share allow one now.
    pub fn try_acquire(&self, key: ShareKey) -> Option<FairPermit> {
        let mut state = lock(&self.state);
        if !state.can_grant(&key) {
            return None;
        }
        state.count_in(&key);
        drop(state);
        Some(self.permit(key))
    }

    /// A permit for `key`, at once when the pool and the key's share allow, else when one is
    /// freed for it. Dropping the future gives up the place in the queue.
    pub async fn acquire(&self, key: ShareKey) -> FairPermit {
        let receiver = {
            let mut state = lock(&self.state);
            if state.can_grant(&key) {
                state.count_in(&key);
                return self.permit(key);
            }
            state.waiters.retain(|waiter| !waiter.reply.is_closed());
            let (reply, receiver) = oneshot::channel();
            state.waiters.push_back(Waiter { key, reply });
            receiver
        };
        match receiver.await {
            Ok(permit) => permit,
            // The gate dropped the waiter without a permit: it only does so when it is gone,
            // which cannot happen while `self` is alive. Wait forever rather than over-grant;
            // the caller's deadline ends the wait.
            Err(_) => std::future::pending().await,
        }
    }

    /// Whether anyone is waiting for a permit (a cheap check before giving one up to requeue).
    /// O(1): it runs at every epoch tick of every plugin call. A waiter that gave up and is
    /// not yet swept out counts too; the cost is one needless hand-over of a turn.
    pub fn contended(&self) -> bool {
        !lock(&self.state).waiters.is_empty()
    }

    /// Permits in use and the most any key holds, for tests and metrics.
    pub fn usage(&self) -> (usize, usize) {
        let state = lock(&self.state);
        (
            state.in_use,
            state.held.values().copied().max().unwrap_or(0),
        )
    }

    /// Permits `key` holds now.
    pub fn held_by(&self, key: &ShareKey) -> usize {
        lock(&self.state).held_by(key)
    }

    fn permit(&self, key: ShareKey) -> FairPermit {
        FairPermit {
            state: Some(Arc::clone(&self.state)),
            key,
        }
    }
}

impl Drop for FairPermit {
    fn drop(&mut self) {
        let Some(shared) = self.state.take() else {
            return;
        };
        let mut state = lock(&shared);
        state.count_out(&self.key);
        dispatch(&shared, &mut state);
    }
}

/// Hands free permits to waiters, fewest-held key first, then the key served longest ago,
/// skipping waiters that gave up.
fn dispatch(shared: &Arc<Mutex<GateState>>, state: &mut GateState) {
    state.waiters.retain(|waiter| !waiter.reply.is_closed());
    state.prune_served();
    while state.in_use < state.capacity {
        let best = state
            .waiters
            .iter()
            .enumerate()
            .filter(|(_, waiter)| {
                !waiter.reply.is_closed() && state.held_by(&waiter.key) < state.per_key
            })
            .min_by_key(|(index, waiter)| {
                (
                    state.held_by(&waiter.key),
                    state.served_at(&waiter.key),
                    *index,
                )
            })
            .map(|(index, _)| index);
        let Some(waiter) = best.and_then(|index| state.waiters.remove(index)) else {
            return;
        };
        state.count_in(&waiter.key);
        let permit = FairPermit {
            state: Some(Arc::clone(shared)),
            key: waiter.key.clone(),
        };
        if let Err(mut unsent) = waiter.reply.send(permit) {
            // The waiter gave up: take the count back without re-entering the lock.
            unsent.state = None;
            state.count_out(&waiter.key);
        }
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(name: &str) -> ShareKey {
        Some(Arc::from(name))
    }

    #[tokio::test]
    async fn a_key_never_holds_more_than_its_share() {
        let gate = FairGate::new(4, 2);
        let a1 = gate.acquire(key("a")).await;
        let _a2 = gate.acquire(key("a")).await;
        let third = tokio::time::timeout(Duration::from_millis(50), gate.acquire(key("a"))).await;
        assert!(third.is_err(), "a third permit for 'a' must wait");
        let _b = gate.acquire(key("b")).await;
        assert_eq!(gate.usage(), (3, 2));
        drop(a1);
        assert_eq!(gate.held_by(&key("a")), 1);
    }

    #[tokio::test]
    async fn a_freed_permit_goes_to_the_key_holding_fewest() {
        let gate = FairGate::new(2, 2);
        let a1 = gate.acquire(key("a")).await;
        let _a2 = gate.acquire(key("a")).await;
        // 'a' queues first, then 'b': the freed permit goes to 'b' (holding none).
        let gate_a = gate.clone();
        let waiting_a = tokio::spawn(async move { gate_a.acquire(key("a")).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let gate_b = gate.clone();
        let waiting_b = tokio::spawn(async move { gate_b.acquire(key("b")).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(a1);
        let b = tokio::time::timeout(Duration::from_secs(1), waiting_b)
            .await
            .expect("b is served first")
            .expect("task");
        assert_eq!(gate.held_by(&key("b")), 1);
        assert!(!waiting_a.is_finished());
        drop(b);
        let _a = tokio::time::timeout(Duration::from_secs(1), waiting_a)
            .await
            .expect("a is served next")
            .expect("task");
        assert_eq!(gate.usage(), (2, 2));
    }

    #[tokio::test]
    async fn a_pool_of_one_takes_turns_between_keys() {
        let gate = FairGate::new(1, 1);
        let first = gate.acquire(key("a")).await;
        // 'a' queues three more before 'b' queues one: 'b' still gets the second turn.
        let mut order = Vec::new();
        let (done, mut finished) = tokio::sync::mpsc::unbounded_channel();
        for name in ["a", "a", "a", "b"] {
            let gate = gate.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let permit = gate.acquire(key(name)).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
                let _ = done.send(name);
                drop(permit);
            });
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(first);
        for _ in 0..4 {
            let name = tokio::time::timeout(Duration::from_secs(1), finished.recv())
                .await
                .expect("every waiter is served")
                .expect("sender");
            order.push(name);
        }
        assert_eq!(order, ["b", "a", "a", "a"]);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_does_not_keep_a_permit() {
        let gate = FairGate::new(1, 1);
        let first = gate.acquire(key("a")).await;
        let given_up =
            tokio::time::timeout(Duration::from_millis(20), gate.acquire(key("b"))).await;
        assert!(given_up.is_err());
        drop(first);
        assert_eq!(gate.usage(), (0, 0));
        let _again = tokio::time::timeout(Duration::from_millis(100), gate.acquire(key("c")))
            .await
            .expect("the pool is free again");
    }
}
