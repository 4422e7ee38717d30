//! The per-tenant budget of request bytes in flight on the inference path.
//!
//! Why: `max_request_bytes` bounds one request and `max_concurrent_requests` bounds how many
//! run at once, but their product (64 MiB × 256 by default) is far more memory than a host has,
//! so one tenant sending 256 parallel maximum-size bodies could exhaust it. Each tenant gets a
//! semaphore of bytes (`--max-tenant-inflight-bytes`, 256 MiB by default): a request takes its
//! declared `Content-Length` (or its size limit, without one) before its body is read, gives
//! back what it did not use once the body is in, takes more if decoding its JSON made the
//! tensors larger than the body, and holds it all until its response is built. A request that
//! does not fit waits up to [`WAIT`] for others of its tenant to finish, then gets 429 with
//! `Retry-After`; one that could never fit gets 413. Other tenants are never affected: the
//! budgets are separate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use weft_core::{Error, ErrorKind};

use crate::quotas::Refusal;

/// Request bytes one tenant may have in flight, unless set otherwise.
pub const DEFAULT_TENANT_INFLIGHT_BYTES: usize = 256 << 20;
/// How long a request waits for its tenant's budget before it is refused.
pub const WAIT: Duration = Duration::from_secs(1);
/// Permits are KiB, so any budget fits a semaphore and any request a `u32` of permits.
const UNIT: usize = 1024;

fn permits(bytes: usize) -> usize {
    bytes.div_ceil(UNIT)
}

/// Every tenant's byte semaphore, created on first use.
#[derive(Debug)]
pub struct BodyBudget {
    per_tenant: usize,
    tenants: Mutex<Tenants>,
}

#[derive(Debug)]
struct Tenants {
    semaphores: HashMap<String, Arc<Semaphore>>,
    /// Idle entries are pruned when the map reaches this size (amortised, so a tenant that
    /// keeps going idle does not make every insertion scan the map).
    prune_at: usize,
}

impl Default for BodyBudget {
    fn default() -> Self {
        BodyBudget::new(DEFAULT_TENANT_INFLIGHT_BYTES)
    }
}

impl BodyBudget {
    /// A budget of `per_tenant` bytes (at least one permit) for each tenant.
    pub fn new(per_tenant: usize) -> Self {
        BodyBudget {
            per_tenant: per_tenant.max(1),
            tenants: Mutex::new(Tenants {
                semaphores: HashMap::new(),
                prune_at: 64,
            }),
        }
    }

    /// Bytes each tenant may have in flight.
    pub fn per_tenant(&self) -> usize {
        self.per_tenant
    }

    fn semaphore(&self, tenant: &str) -> Arc<Semaphore> {
        // Each update replaces or removes whole entries: a poisoned map is still consistent.
        let mut tenants = self
            .tenants
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(semaphore) = tenants.semaphores.get(tenant) {
            return Arc::clone(semaphore);
        }
        if tenants.semaphores.len() >= tenants.prune_at {
            // An entry only the map holds has no permit out and no waiter: a fresh one is the
            // same, so deleted or idle tenants cost nothing here.
            tenants
                .semaphores
                .retain(|_, semaphore| Arc::strong_count(semaphore) > 1);
            tenants.prune_at = (tenants.semaphores.len() * 2).max(64);
        }
        let semaphore = Arc::new(Semaphore::new(permits(self.per_tenant).max(1)));
        tenants
            .semaphores
            .insert(tenant.to_string(), Arc::clone(&semaphore));
        semaphore
    }

    /// Takes `bytes` of `tenant`'s budget, waiting up to [`WAIT`]; 429 when it stays full, 413
    /// when `bytes` is more than the whole budget.
    pub async fn admit(&self, tenant: &str, bytes: usize) -> Result<BodyPermit, Refusal> {
        let semaphore = self.semaphore(tenant);
        let permit = acquire(tenant, self.per_tenant, &semaphore, bytes).await?;
        Ok(BodyPermit {
            semaphore,
            permit,
            per_tenant: self.per_tenant,
            tenant: tenant.to_string(),
        })
    }
}

/// Takes `bytes` of a tenant's semaphore of `per_tenant` bytes, waiting up to [`WAIT`].
async fn acquire(
    tenant: &str,
    per_tenant: usize,
    semaphore: &Arc<Semaphore>,
    bytes: usize,
) -> Result<OwnedSemaphorePermit, Refusal> {
    let too_large = || Refusal {
        error: Error::new(
            ErrorKind::PayloadTooLarge,
            format!(
                "the request needs {bytes} bytes in memory, more than tenant '{tenant}' may have \
                 in flight at once ({per_tenant} bytes, --max-tenant-inflight-bytes)"
            ),
        ),
        retry_after_seconds: None,
    };
    if bytes > per_tenant {
        return Err(too_large());
    }
    let count = u32::try_from(permits(bytes)).map_err(|_| too_large())?;
    let wait = tokio::time::timeout(WAIT, Arc::clone(semaphore).acquire_many_owned(count));
    match wait.await {
        Ok(Ok(permit)) => Ok(permit),
        // The semaphore is never closed; were it, it would be as good as full.
        Ok(Err(_)) | Err(_) => Err(Refusal {
            error: Error::new(
                ErrorKind::ResourceExhausted,
                format!(
                    "tenant '{tenant}' has its budget of {per_tenant} bytes of requests in flight \
                     in use (--max-tenant-inflight-bytes); this request's {bytes} bytes did not \
                     fit within {} ms: retry later, or send fewer or smaller requests at once",
                    WAIT.as_millis()
                ),
            ),
            retry_after_seconds: Some(1),
        }),
    }
}

/// Part of a tenant's in-flight budget, held by one request until dropped.
#[derive(Debug)]
pub struct BodyPermit {
    semaphore: Arc<Semaphore>,
    permit: OwnedSemaphorePermit,
    per_tenant: usize,
    tenant: String,
}

impl BodyPermit {
    /// Bytes held (rounded up to whole KiB).
    pub fn bytes(&self) -> usize {
        self.permit.num_permits() * UNIT
    }

    /// Gives back what the request turned out not to need.
    pub fn shrink_to(&mut self, bytes: usize) {
        let keep = permits(bytes);
        let held = self.permit.num_permits();
        if keep < held {
            drop(self.permit.split(held - keep));
        }
    }

    /// Takes more, up to `bytes` in all (the whole of it no more than the budget), waiting as
    /// [`BodyBudget::admit`] does.
    pub async fn grow_to(&mut self, bytes: usize) -> Result<(), Refusal> {
        let held = self.bytes();
        if bytes <= held {
            return Ok(());
        }
        // The whole must fit the budget, not only what is added.
        let more = if bytes > self.per_tenant {
            bytes
        } else {
            bytes - held
        };
        let more = acquire(&self.tenant, self.per_tenant, &self.semaphore, more).await?;
        self.permit.merge(more);
        Ok(())
    }
}

/// One request's permit shared by what reads its bytes and what holds them, counted exactly.
///
/// A gRPC call's body charges it frame by frame as the bytes arrive (the message is decoded
/// before any handler runs, so the handler cannot take the budget first the way an HTTP
/// handler does from `Content-Length`), the handler holds it until the response is built, and
/// a stream gives back each message's bytes once that message is answered. An HTTP request
/// moves its permit in here once its body is read.
#[derive(Debug)]
pub struct SharedPermit {
    held: tokio::sync::Mutex<(BodyPermit, usize)>,
}

impl SharedPermit {
    /// Shares `permit`, of which `bytes` are in use.
    pub fn new(permit: BodyPermit, bytes: usize) -> Self {
        SharedPermit {
            held: tokio::sync::Mutex::new((permit, bytes)),
        }
    }

    /// Takes `bytes` more, waiting as [`BodyBudget::admit`] does.
    pub async fn grow_by(&self, bytes: usize) -> Result<(), Refusal> {
        let mut held = self.held.lock().await;
        let total = held.1.saturating_add(bytes);
        held.0.grow_to(total).await?;
        held.1 = total;
        Ok(())
    }

    /// Gives back `bytes` (a finished message's).
    pub async fn release(&self, bytes: usize) {
        let mut held = self.held.lock().await;
        let total = held.1.saturating_sub(bytes);
        held.0.shrink_to(total);
        held.1 = total;
    }

    /// Bytes in use.
    pub async fn bytes(&self) -> usize {
        self.held.lock().await.1
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[tokio::test]
    async fn a_full_budget_refuses_after_a_short_wait_and_frees_on_drop() {
        let budget = BodyBudget::new(100 * UNIT);
        let first = budget.admit("acme", 60 * UNIT).await.unwrap();
        let second = budget.admit("acme", 40 * UNIT).await.unwrap();
        let started = std::time::Instant::now();
        let refused = budget.admit("acme", 1).await.unwrap_err();
        assert!(started.elapsed() >= WAIT);
        assert_eq!(refused.error.kind(), ErrorKind::ResourceExhausted);
        assert_eq!(refused.retry_after_seconds, Some(1));
        assert!(
            refused
                .error
                .message()
                .contains("--max-tenant-inflight-bytes"),
            "{}",
            refused.error
        );
        // Another tenant has its own budget.
        let other = budget.admit("other", 100 * UNIT).await.unwrap();
        drop(second);
        let third = budget.admit("acme", 40 * UNIT).await.unwrap();
        drop((first, third, other));
    }

    #[tokio::test]
    async fn a_waiting_request_gets_in_when_another_finishes() {
        let budget = Arc::new(BodyBudget::new(10 * UNIT));
        let held = budget.admit("acme", 10 * UNIT).await.unwrap();
        let waiter = {
            let budget = Arc::clone(&budget);
            tokio::spawn(async move { budget.admit("acme", 5 * UNIT).await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(held);
        assert!(waiter.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn a_shared_permit_grows_by_frames_and_gives_back_by_messages() {
        let budget = BodyBudget::new(10 * UNIT);
        let shared = SharedPermit::new(budget.admit("acme", 0).await.unwrap(), 0);
        for _ in 0..4 {
            shared.grow_by(UNIT + 1).await.unwrap();
        }
        assert_eq!(shared.bytes().await, 4 * UNIT + 4);
        // 5 KiB of the 10 are held: another request of 6 KiB does not fit.
        let refused = budget.admit("acme", 6 * UNIT).await.unwrap_err();
        assert_eq!(refused.error.kind(), ErrorKind::ResourceExhausted);
        shared.release(2 * UNIT + 2).await;
        let fits = budget.admit("acme", 6 * UNIT).await.unwrap();
        assert!(shared.grow_by(5 * UNIT).await.is_err(), "over the budget");
        drop((fits, shared));
        budget.admit("acme", 10 * UNIT).await.unwrap();
    }

    #[tokio::test]
    async fn more_than_the_whole_budget_is_413_at_once() {
        let budget = BodyBudget::new(10 * UNIT);
        let refused = budget.admit("acme", 10 * UNIT + 1).await.unwrap_err();
        assert_eq!(refused.error.kind(), ErrorKind::PayloadTooLarge);
        let mut permit = budget.admit("acme", 4 * UNIT).await.unwrap();
        let refused = permit.grow_to(11 * UNIT).await.unwrap_err();
        assert_eq!(refused.error.kind(), ErrorKind::PayloadTooLarge);
    }

    #[tokio::test]
    async fn shrink_and_grow_move_bytes_between_request_and_budget() {
        let budget = BodyBudget::new(10 * UNIT);
        let mut permit = budget.admit("acme", 10 * UNIT).await.unwrap();
        permit.shrink_to(3 * UNIT);
        assert_eq!(permit.bytes(), 3 * UNIT);
        let other = budget.admit("acme", 7 * UNIT).await.unwrap();
        drop(other);
        permit.grow_to(9 * UNIT).await.unwrap();
        assert_eq!(permit.bytes(), 9 * UNIT);
        assert!(budget.admit("acme", 2 * UNIT).await.is_err());
    }

    #[test]
    fn idle_tenants_are_pruned() {
        let budget = BodyBudget::new(UNIT);
        for n in 0..200 {
            drop(budget.semaphore(&format!("t{n}")));
        }
        let tenants = budget.tenants.lock().unwrap();
        assert!(
            tenants.semaphores.len() <= 128,
            "{}",
            tenants.semaphores.len()
        );
    }
}
