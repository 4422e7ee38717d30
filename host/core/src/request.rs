//! The request context: whom one request runs for, until when, and what it has spent.
//!
//! The HTTP (or gRPC) edge makes one [`RequestContext`] per request and passes it down
//! explicitly — into [`crate::Model::infer`], graph nodes, plugin calls and the models a plugin
//! calls through `wasi:nn` — so every layer that shares a pool between tenants (batch queues,
//! instance turns, warm plugin instances) knows the tenant without a task-local, and every layer
//! that spends time adds it to the request's [`Cost`]. Work that belongs to no request (a merged
//! batch, a trial load, a benchmark) runs under [`RequestContext::background`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a request spent; all in microseconds except fuel.
#[derive(Debug, Default)]
pub struct Cost {
    pub compute_us: AtomicU64,
    pub queue_us: AtomicU64,
    pub plugin_us: AtomicU64,
    pub fuel: AtomicU64,
    /// Where the plugins that ran came from (digest, signer), one entry per distinct plugin.
    pub provenance: Mutex<Vec<serde_json::Value>>,
}

/// Which counter of [`Cost`] [`RequestContext::add`] adds to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spent {
    Compute,
    Queue,
    Plugin,
}

/// One request's identity, deadline and account; cheap to clone (the account is shared).
#[derive(Clone, Debug, Default)]
pub struct RequestContext {
    tenant: Option<Arc<str>>,
    deadline: Option<Instant>,
    cost: Arc<Cost>,
    /// The value of the header a rollout assigns clients by (see
    /// [`crate::Model::sticky_header`]), when the edge found it on the request.
    sticky_key: Option<Arc<str>>,
    /// Batch-job work: it queues behind every real-time request (see [`RequestContext::batch`]).
    batch: bool,
}

impl RequestContext {
    /// A request of `tenant` with a fresh account and no deadline.
    pub fn for_tenant(tenant: &str) -> Self {
        RequestContext {
            tenant: Some(Arc::from(tenant)),
            ..RequestContext::default()
        }
    }

    /// Work of no tenant (a merged batch, a load check, a benchmark): what it spends is counted
    /// nowhere, and it shares pools as the one anonymous party.
    pub fn background() -> Self {
        RequestContext::default()
    }

    /// The same request, ending at `deadline` (or at its earlier deadline).
    pub fn with_deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(self.deadline.map_or(deadline, |held| held.min(deadline)));
        self
    }

    /// The same request, carrying the value a rollout assigns its client by.
    pub fn with_sticky_key(mut self, key: &str) -> Self {
        self.sticky_key = Some(Arc::from(key));
        self
    }

    /// The same request, as a batch job's row: a dynamic batcher serves real-time requests
    /// first and fills batches with batch rows only where real-time ones leave room.
    pub fn as_batch(mut self) -> Self {
        self.batch = true;
        self
    }

    /// Whether this is a batch job's row ([`RequestContext::as_batch`]).
    pub fn batch(&self) -> bool {
        self.batch
    }

    /// The client's assignment key, if the edge set one.
    pub fn sticky_key(&self) -> Option<&str> {
        self.sticky_key.as_deref()
    }

    /// The tenant the request runs for; `None` for background work. Pools key their fair
    /// shares and warm plugin instances on it.
    pub fn tenant(&self) -> Option<&Arc<str>> {
        self.tenant.as_ref()
    }

    /// The tenant as an owned share key (see [`crate::fair::FairGate`]).
    pub fn share_key(&self) -> Option<Arc<str>> {
        self.tenant.clone()
    }

    /// When the request must be answered by, if it has a deadline.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Time left before the deadline (zero once it passed); `None` without a deadline.
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|deadline| deadline.saturating_duration_since(Instant::now()))
    }

    /// The request's account.
    pub fn cost(&self) -> &Cost {
        &self.cost
    }

    /// Adds `duration` to one of the request's counters.
    pub fn add(&self, spent: Spent, duration: Duration) {
        let micros = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
        let counter = match spent {
            Spent::Compute => &self.cost.compute_us,
            Spent::Queue => &self.cost.queue_us,
            Spent::Plugin => &self.cost.plugin_us,
        };
        counter.fetch_add(micros, Ordering::Relaxed);
    }

    /// Adds consumed plugin fuel to the request's account.
    pub fn add_fuel(&self, fuel: u64) {
        self.cost.fuel.fetch_add(fuel, Ordering::Relaxed);
    }

    /// Notes that a plugin ran for the request: `entry` describes it (name, version, digest,
    /// signer). Repeated calls of one plugin are noted once.
    pub fn note_plugin(&self, entry: &serde_json::Value) {
        let mut provenance = self
            .cost
            .provenance
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !provenance.contains(entry) {
            provenance.push(entry.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_add_up_on_the_request_and_clones_share_them() {
        let request = RequestContext::for_tenant("acme");
        let branch = request.clone();
        request.add(Spent::Compute, Duration::from_micros(7));
        branch.add(Spent::Compute, Duration::from_micros(3));
        branch.add(Spent::Queue, Duration::from_micros(2));
        request.add_fuel(11);
        request.note_plugin(&serde_json::json!({"plugin": "p"}));
        branch.note_plugin(&serde_json::json!({"plugin": "p"}));
        let cost = request.cost();
        assert_eq!(cost.compute_us.load(Ordering::Relaxed), 10);
        assert_eq!(cost.queue_us.load(Ordering::Relaxed), 2);
        assert_eq!(cost.plugin_us.load(Ordering::Relaxed), 0);
        assert_eq!(cost.fuel.load(Ordering::Relaxed), 11);
        assert_eq!(cost.provenance.lock().unwrap().len(), 1);
        assert_eq!(branch.tenant().map(|t| &**t), Some("acme"));
        assert!(RequestContext::background().tenant().is_none());
    }

    #[test]
    fn the_earlier_deadline_wins_and_remaining_never_goes_negative() {
        let now = Instant::now();
        let request = RequestContext::for_tenant("acme")
            .with_deadline(now + Duration::from_secs(10))
            .with_deadline(now + Duration::from_secs(5))
            .with_deadline(now + Duration::from_secs(20));
        assert_eq!(request.deadline(), Some(now + Duration::from_secs(5)));
        let past = RequestContext::background().with_deadline(now);
        assert_eq!(past.remaining(), Some(Duration::ZERO));
        assert_eq!(RequestContext::background().remaining(), None);
    }
}
