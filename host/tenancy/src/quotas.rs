//! Quota decisions at a tenant's door: the rate quota (a token bucket: `requests_per_second`
//! with a `burst`) and the concurrency quota (`max_concurrent_requests`).
//!
//! With N replicas sharing a store each enforces `1/N` of every quota (at least one request a
//! burst and one in flight), N being the live replicas the shared store counts; so a tenant's
//! quotas hold across replicas without a shared counter per request. A refusal says when to
//! retry and, with several replicas, that they share the quota; it never names another tenant.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use weft_core::{Error, ErrorKind};
use weft_store::Quotas;

/// A quota said no: the error (kind `ResourceExhausted`, or `Internal` if the limiter broke)
/// and when retrying can help.
#[derive(Debug)]
pub struct Refusal {
    pub error: Error,
    /// Seconds after which retrying can help; `None` when it cannot (too large ever to fit).
    pub retry_after_seconds: Option<u64>,
}

/// One tenant's door on this replica: its share of the rate and concurrency quotas.
pub struct Gate {
    bucket: Mutex<Bucket>,
    rate: f64,
    burst: f64,
    in_flight: Arc<Semaphore>,
    max_concurrent: u32,
    /// Live replicas sharing the tenants (1 without a shared store).
    replicas: Arc<AtomicUsize>,
}

struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Gate {
    /// The whole of `quotas` (one replica).
    pub fn new(quotas: &Quotas) -> Self {
        Gate::shared(quotas, Arc::new(AtomicUsize::new(1)))
    }

    /// A `1 / replicas` share of `quotas`; `replicas` may change at any time.
    pub fn shared(quotas: &Quotas, replicas: Arc<AtomicUsize>) -> Self {
        let burst = f64::from(quotas.burst.max(1));
        Gate {
            replicas,
            bucket: Mutex::new(Bucket {
                tokens: burst,
                updated: Instant::now(),
            }),
            rate: quotas.requests_per_second.max(0.001),
            burst,
            in_flight: Arc::new(Semaphore::new(
                quotas.max_concurrent_requests.max(1) as usize
            )),
            max_concurrent: quotas.max_concurrent_requests.max(1),
        }
    }

    fn replicas(&self) -> usize {
        self.replicas.load(Ordering::Relaxed).max(1)
    }

    fn share_note(&self) -> String {
        match self.replicas() {
            1 => String::new(),
            replicas => format!(" ({replicas} replicas share it)"),
        }
    }

    /// Charges one request of `tenant` to the rate quota.
    pub fn charge(&self, tenant: &str) -> Result<(), Refusal> {
        let mut bucket = self.bucket.lock().map_err(|_| Refusal {
            error: Error::internal("rate limiter poisoned"),
            retry_after_seconds: Some(1),
        })?;
        let replicas = self.replicas() as f64;
        let rate = self.rate / replicas;
        let burst = (self.burst / replicas).max(1.0);
        let now = Instant::now();
        let refill = now.duration_since(bucket.updated).as_secs_f64() * rate;
        bucket.tokens = (bucket.tokens + refill).min(burst);
        bucket.updated = now;
        if bucket.tokens < 1.0 {
            let wait = ((1.0 - bucket.tokens) / rate).ceil() as u64;
            return Err(Refusal {
                error: Error::new(
                    ErrorKind::ResourceExhausted,
                    format!(
                        "tenant '{tenant}' is over its rate quota of {} requests/s (burst {}){}",
                        self.rate,
                        self.burst,
                        self.share_note()
                    ),
                ),
                retry_after_seconds: Some(wait.max(1)),
            });
        }
        bucket.tokens -= 1.0;
        Ok(())
    }

    /// A concurrency slot for a request of `tenant` that does work, held until dropped.
    pub fn hold(&self, tenant: &str) -> Result<OwnedSemaphorePermit, Refusal> {
        let share = (self.max_concurrent as usize / self.replicas()).max(1);
        let held =
            (self.max_concurrent as usize).saturating_sub(self.in_flight.available_permits());
        (held < share)
            .then(|| Arc::clone(&self.in_flight).try_acquire_owned().ok())
            .flatten()
            .ok_or_else(|| Refusal {
                error: Error::new(
                    ErrorKind::ResourceExhausted,
                    format!(
                        "tenant '{tenant}' is at its quota of {} concurrent requests{}",
                        self.max_concurrent,
                        self.share_note()
                    ),
                ),
                retry_after_seconds: Some(1),
            })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn quotas(rate: f64, burst: u32, concurrent: u32) -> Quotas {
        Quotas {
            requests_per_second: rate,
            burst,
            max_concurrent_requests: concurrent,
            ..Quotas::default()
        }
    }

    fn passes(gate: &Gate, count: usize) -> usize {
        (0..count).filter(|_| gate.charge("acme").is_ok()).count()
    }

    #[test]
    fn the_burst_passes_then_the_rate_quota_refuses_with_a_retry_time() {
        let gate = Gate::new(&quotas(0.01, 10, 4));
        assert_eq!(passes(&gate, 15), 10);
        let refusal = gate.charge("acme").unwrap_err();
        assert_eq!(refusal.error.kind(), ErrorKind::ResourceExhausted);
        assert!(refusal.retry_after_seconds >= Some(1));
        let text = refusal.error.to_string();
        assert!(
            text.contains("rate quota of 0.01 requests/s (burst 10)"),
            "{text}"
        );
        assert!(!text.contains("replicas"), "{text}");
    }

    #[test]
    fn each_of_n_replicas_takes_its_share_and_follows_the_count() {
        let replicas = Arc::new(AtomicUsize::new(4));
        let gate = Gate::shared(&quotas(0.01, 10, 8), Arc::clone(&replicas));
        // 10 / 4 = 2.5 tokens: two requests.
        assert_eq!(passes(&gate, 10), 2);
        let text = gate.charge("acme").unwrap_err().error.to_string();
        assert!(text.contains("(4 replicas share it)"), "{text}");
        // Concurrency: 8 / 4 = 2 in flight.
        let first = gate.hold("acme").unwrap();
        let _second = gate.hold("acme").unwrap();
        let refusal = gate.hold("acme").unwrap_err();
        assert!(refusal.error.to_string().contains("4 replicas share it"));
        drop(first);
        let _third = gate.hold("acme").unwrap();
        // Back to one replica: the whole quota.
        replicas.store(1, Ordering::Relaxed);
        let _more: Vec<_> = (0..6).map(|_| gate.hold("acme").unwrap()).collect();
        let text = gate.hold("acme").unwrap_err().error.to_string();
        assert!(text.contains("quota of 8 concurrent requests"), "{text}");
        assert!(!text.contains("replicas"), "{text}");
    }

    #[test]
    fn a_share_is_never_below_one() {
        let gate = Gate::shared(&quotas(0.01, 2, 2), Arc::new(AtomicUsize::new(16)));
        assert_eq!(passes(&gate, 5), 1, "one request a burst at least");
        let _only = gate.hold("acme").unwrap();
        assert!(gate.hold("acme").is_err());
    }
}
