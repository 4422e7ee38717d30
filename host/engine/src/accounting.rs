//! Per-request cost accounting: what one request spent in model compute, in batch queues and in
//! plugins, so a response can tell a tenant what it cost.
//!
//! The HTTP layer runs each request inside [`scope`]; code deep below it (the batcher, the
//! metered model wrapper, the graph runner) adds to the request's [`Cost`] with [`add`], which is
//! a no-op outside a scope. A task-local carries it, so nothing in between changes signature;
//! work a request fans out to concurrently (graph branches) stays on the request's task.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a request spent; all in microseconds except fuel.
#[derive(Debug, Default)]
pub struct Cost {
    pub compute_us: AtomicU64,
    pub queue_us: AtomicU64,
    pub plugin_us: AtomicU64,
    pub fuel: AtomicU64,
    /// Where the plugins that ran came from (digest, signer), one entry per distinct plugin.
    pub provenance: Mutex<Vec<serde_json::Value>>,
    /// The tenant the request runs for; plugin calls use it to keep warm instances apart.
    pub tenant: Option<Arc<str>>,
}

/// Which counter [`add`] adds to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spent {
    Compute,
    Queue,
    Plugin,
}

tokio::task_local! {
    static COST: Arc<Cost>;
}

/// Runs `future` with `cost` as the request's account.
pub async fn scope<F: Future>(cost: Arc<Cost>, future: F) -> F::Output {
    COST.scope(cost, future).await
}

/// Adds `duration` to the current request's account, if there is one.
pub fn add(spent: Spent, duration: Duration) {
    let micros = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
    let _ = COST.try_with(|cost| {
        let counter = match spent {
            Spent::Compute => &cost.compute_us,
            Spent::Queue => &cost.queue_us,
            Spent::Plugin => &cost.plugin_us,
        };
        counter.fetch_add(micros, Ordering::Relaxed);
    });
}

/// Adds consumed fuel to the current request's account, if there is one.
pub fn add_fuel(fuel: u64) {
    let _ = COST.try_with(|cost| cost.fuel.fetch_add(fuel, Ordering::Relaxed));
}

/// The tenant of the current request, if it runs inside a scope that names one.
pub fn tenant() -> Option<Arc<str>> {
    COST.try_with(|cost| cost.tenant.clone()).ok().flatten()
}

/// Notes that a plugin ran for the current request: `entry` describes it (name, version, digest,
/// signer). Repeated calls of one plugin are noted once.
pub fn note_plugin(entry: &serde_json::Value) {
    let _ = COST.try_with(|cost| {
        if let Ok(mut provenance) = cost.provenance.lock()
            && !provenance.contains(entry)
        {
            provenance.push(entry.clone());
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn costs_add_up_inside_a_scope_and_vanish_outside() {
        add(Spent::Compute, Duration::from_micros(5));
        let cost = Arc::new(Cost::default());
        scope(Arc::clone(&cost), async {
            add(Spent::Compute, Duration::from_micros(7));
            add(Spent::Compute, Duration::from_micros(3));
            add(Spent::Queue, Duration::from_micros(2));
            add_fuel(11);
            note_plugin(&serde_json::json!({"plugin": "p"}));
            note_plugin(&serde_json::json!({"plugin": "p"}));
        })
        .await;
        assert_eq!(cost.compute_us.load(Ordering::Relaxed), 10);
        assert_eq!(cost.queue_us.load(Ordering::Relaxed), 2);
        assert_eq!(cost.plugin_us.load(Ordering::Relaxed), 0);
        assert_eq!(cost.fuel.load(Ordering::Relaxed), 11);
        assert_eq!(cost.provenance.lock().unwrap().len(), 1);
    }
}
