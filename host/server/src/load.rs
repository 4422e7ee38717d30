//! The replica's load: inference requests in flight against its capacity
//! (`--max-inflight-requests`), the one signal a load balancer and an autoscaler both read.
//!
//! Why one replica-wide count: per-tenant quotas bound what one tenant takes, but the sum of
//! all tenants' quotas is more than one replica can serve. When the count reaches the capacity
//! the replica sheds load: a new inference request (HTTP or gRPC, model or graph) is refused with
//! 503 and `Retry-After`, and `GET /v2/health/ready` answers 503 so the load balancer sends its
//! traffic elsewhere. `weft_replica_load_ratio` (in flight / capacity) is what the chart's
//! HorizontalPodAutoscaler or KEDA ScaledObject keeps near its target, so a scaler adds replicas
//! before any of them sheds. Requests count from their arrival (a body still being read holds
//! memory and a connection), until their response is built.

use std::sync::atomic::{AtomicUsize, Ordering};

use weft_core::{Error, ErrorKind};

/// Capacity unless set otherwise.
pub const DEFAULT_MAX_INFLIGHT_REQUESTS: usize = 512;

/// Inference requests in flight on this replica, and how many it takes.
#[derive(Debug)]
pub struct ReplicaLoad {
    inflight: AtomicUsize,
    capacity: usize,
}

impl Default for ReplicaLoad {
    fn default() -> Self {
        ReplicaLoad::new(DEFAULT_MAX_INFLIGHT_REQUESTS)
    }
}

/// One admitted request; it leaves the count when dropped.
#[derive(Debug)]
pub struct Admitted<'a>(&'a ReplicaLoad);

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ReplicaLoad {
    /// A replica that takes `capacity` requests at once (at least one).
    pub fn new(capacity: usize) -> Self {
        ReplicaLoad {
            inflight: AtomicUsize::new(0),
            capacity: capacity.max(1),
        }
    }

    /// Counts a request in, or refuses it (503 with a retry hint) at capacity.
    pub fn admit(&self) -> Result<Admitted<'_>, Error> {
        let admitted =
            self.inflight
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |inflight| {
                    (inflight < self.capacity).then_some(inflight + 1)
                });
        match admitted {
            Ok(_) => Ok(Admitted(self)),
            Err(_) => Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "this replica is at capacity ({} inference requests in flight, \
                     --max-inflight-requests); retry shortly, or on another replica",
                    self.capacity
                ),
            )),
        }
    }

    /// Requests in flight now.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether the replica refuses new requests now (readiness says so).
    pub fn shedding(&self) -> bool {
        self.inflight() >= self.capacity
    }

    /// In flight over capacity, 0 to 1.
    pub fn ratio(&self) -> f64 {
        self.inflight() as f64 / self.capacity as f64
    }

    /// The gauges in Prometheus' text format.
    pub fn render(&self) -> String {
        format!(
            "# HELP weft_replica_load_ratio Inference requests in flight over this replica's \
             capacity (--max-inflight-requests); at 1 it sheds load and readiness is 503\n\
             # TYPE weft_replica_load_ratio gauge\n\
             weft_replica_load_ratio {}\n\
             # HELP weft_replica_inflight_requests Inference requests in flight on this replica\n\
             # TYPE weft_replica_inflight_requests gauge\n\
             weft_replica_inflight_requests {}\n\
             # HELP weft_replica_capacity_requests Inference requests this replica takes at once\n\
             # TYPE weft_replica_capacity_requests gauge\n\
             weft_replica_capacity_requests {}\n",
            self.ratio(),
            self.inflight(),
            self.capacity
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn a_full_replica_sheds_until_a_request_leaves() {
        let load = ReplicaLoad::new(2);
        let first = load.admit().unwrap();
        assert!(!load.shedding());
        assert_eq!(load.ratio(), 0.5);
        let second = load.admit().unwrap();
        assert!(load.shedding());
        let refused = load.admit().unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::Unavailable);
        assert!(refused.message().contains("--max-inflight-requests"));
        assert_eq!(load.inflight(), 2, "a refusal does not count");
        drop(first);
        assert!(!load.shedding());
        let third = load.admit().unwrap();
        assert!(load.render().contains("weft_replica_load_ratio 1\n"));
        drop((second, third));
        assert!(load.render().contains("weft_replica_inflight_requests 0\n"));
    }
}
