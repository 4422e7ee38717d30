//! The storage quota across concurrent uploads: what each tenant's uploads in progress have
//! reserved of its `max_stored_bytes`.
//!
//! Before a byte of an upload is read, it reserves its declared length (or, without one, what
//! is left of the quota up to the size limit) in the [`StorageLedger`]: what the tenant has
//! stored plus what its uploads in progress hold can never pass its quota, so N parallel
//! uploads that each fit but together do not are refused up front (403, the quota named). The
//! [`Reservation`] is an RAII guard: shrunk to the actual size once the body is in, released
//! when dropped, which the upload does after its commit (the committed state then counts the
//! bytes). [`check_stored`] is the same quota's (and the version counts') check on a change,
//! and [`check_model_memory`] the `model_memory_mb` check of a model push.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use weft_core::{Error, ErrorKind, Result};
use weft_store::{Store, Tenant};

/// Storage reserved by each tenant's uploads in progress, in bytes.
#[derive(Debug, Default)]
pub struct StorageLedger {
    reserved: Mutex<HashMap<String, u64>>,
}

/// How much an upload asks for.
#[derive(Clone, Copy, Debug)]
pub enum Want {
    /// Its declared length: all of it, or a refusal.
    Exactly(u64),
    /// No declared length: what is left of the quota, up to this size limit.
    UpTo(u64),
}

impl StorageLedger {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        // Every update is one arithmetic step on a map entry: a poisoned map is still whole.
        self.reserved
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Bytes the tenant's uploads in progress hold.
    pub fn reserved(&self, tenant: &str) -> u64 {
        self.lock().get(tenant).copied().unwrap_or(0)
    }

    /// Reserves storage for one upload of `tenant` against its `max_stored_bytes`, counting
    /// what it stored and what its other uploads in progress hold; 403 naming the quota when it
    /// does not fit.
    pub fn reserve(
        self: &Arc<Self>,
        store: &Store,
        tenant: &str,
        want: Want,
    ) -> Result<Reservation> {
        let mut reserved = self.lock();
        // Read under the ledger's lock: a commit publishes its state before its upload releases
        // its reservation (under this lock), so a reservation never misses both.
        let state = store.state();
        let record = state
            .tenants
            .get(tenant)
            .ok_or_else(|| Error::not_found(format!("unknown tenant '{tenant}'")))?;
        let quota = record.quotas.max_stored_bytes;
        let held = reserved.get(tenant).copied().unwrap_or(0);
        let left = quota
            .saturating_sub(record.stored_bytes())
            .saturating_sub(held);
        let bytes = match want {
            Want::Exactly(bytes) if bytes <= left => bytes,
            Want::UpTo(limit) if left > 0 => limit.min(left),
            _ => return Err(over_quota(tenant, quota, left, held)),
        };
        *reserved.entry(tenant.to_string()).or_default() += bytes;
        Ok(Reservation {
            ledger: Arc::clone(self),
            tenant: tenant.to_string(),
            bytes,
        })
    }

    fn release(&self, tenant: &str, bytes: u64) {
        let mut reserved = self.lock();
        if let Some(held) = reserved.get_mut(tenant) {
            *held = held.saturating_sub(bytes);
            if *held == 0 {
                reserved.remove(tenant);
            }
        }
    }
}

/// The storage-quota refusal of an upload that does not fit in what is left.
pub fn over_quota(tenant: &str, quota: u64, left: u64, held: u64) -> Error {
    let in_progress = if held > 0 {
        format!(" ({held} bytes are held by the tenant's uploads in progress)")
    } else {
        String::new()
    };
    Error::new(
        ErrorKind::PermissionDenied,
        format!(
            "tenant '{tenant}' would exceed its quota of {quota} stored bytes: the upload is \
             larger than the {left} bytes left{in_progress}"
        ),
    )
}

/// One upload's hold on its tenant's storage quota; released when dropped.
#[derive(Debug)]
pub struct Reservation {
    ledger: Arc<StorageLedger>,
    tenant: String,
    bytes: u64,
}

impl Reservation {
    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Gives back what the upload did not use.
    pub fn shrink_to(&mut self, bytes: u64) {
        if bytes < self.bytes {
            self.ledger.release(&self.tenant, self.bytes - bytes);
            self.bytes = bytes;
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.ledger.release(&self.tenant, self.bytes);
    }
}

/// Refuses a change that leaves the tenant over a storage quota (403): its plugin, model and
/// graph version counts and its stored bytes. Run on the changed record, inside the change.
pub fn check_stored(tenant: &Tenant) -> Result<()> {
    let (plugins, models, graphs) = tenant.counts();
    let quotas = &tenant.quotas;
    let over = |what: &str, used: u64, limit: u64| {
        Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "tenant '{}' would exceed its quota of {limit} {what} (it would have {used})",
                tenant.name
            ),
        )
    };
    if plugins > u64::from(quotas.max_plugins) {
        return Err(over("plugin versions", plugins, quotas.max_plugins.into()));
    }
    if models > u64::from(quotas.max_models) {
        return Err(over("model versions", models, quotas.max_models.into()));
    }
    if graphs > u64::from(quotas.max_graphs) {
        return Err(over("graph versions", graphs, quotas.max_graphs.into()));
    }
    if tenant.stored_bytes() > quotas.max_stored_bytes {
        return Err(over(
            "stored bytes",
            tenant.stored_bytes(),
            quotas.max_stored_bytes,
        ));
    }
    Ok(())
}

/// What one model version costs in memory: `instances` sessions of its ONNX `bytes`.
#[derive(Clone, Debug)]
pub struct ModelCost {
    /// How the refusal names it ("model 'm' version 2").
    pub what: String,
    pub instances: u64,
    pub bytes: u64,
}

/// Refuses a model whose sessions do not fit in what the tenant's `model_memory_mb`
/// (`budget_bytes`, its worker's memory) has left after the `used` bytes its stored models
/// take (403, both figures named); else returns what is left for it.
pub fn check_model_memory(
    cost: &ModelCost,
    used: u64,
    quota_mb: u64,
    budget_bytes: u64,
) -> Result<u64> {
    let needs = cost.instances.saturating_mul(cost.bytes);
    let left = budget_bytes.saturating_sub(used);
    if used.saturating_add(needs) > budget_bytes {
        return Err(Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "{} needs about {} MiB ({} instances of {} bytes) but the tenant's \
                 model_memory_mb quota of {quota_mb} MiB has {} MiB left",
                cost.what,
                needs.div_ceil(1 << 20),
                cost.instances,
                cost.bytes,
                left >> 20
            ),
        ));
    }
    Ok(left)
}

/// Refuses a GPU model whose sessions do not fit in what the tenant's `gpu_memory_mb` has left
/// after the `used` bytes its stored GPU models take (403, both figures named). The weights
/// are what a model holds on the device for certain; activations and ONNX Runtime's arena come
/// on top, which is why a device is never filled to its quota's sum.
pub fn check_gpu_memory(cost: &ModelCost, used: u64, quota_mb: u64) -> Result<()> {
    let needs = cost.instances.saturating_mul(cost.bytes);
    let budget = quota_mb.saturating_mul(1 << 20);
    if used.saturating_add(needs) > budget {
        return Err(Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "{} needs about {} MiB of GPU memory ({} instances of {} bytes) but the \
                 tenant's gpu_memory_mb quota of {quota_mb} MiB has {} MiB left",
                cost.what,
                needs.div_ceil(1 << 20),
                cost.instances,
                cost.bytes,
                budget.saturating_sub(used) >> 20
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use weft_store::{Quotas, Tenant};

    fn store_with(quota: u64) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .transact(|state| {
                let quotas = Quotas {
                    max_stored_bytes: quota,
                    ..Quotas::default()
                };
                state
                    .tenants
                    .insert("acme".into(), Tenant::new("acme", 1, quotas.clone()));
                state
                    .tenants
                    .insert("other".into(), Tenant::new("other", 1, quotas));
                Ok(())
            })
            .unwrap();
        (dir, store)
    }

    #[test]
    fn reservations_never_add_up_past_the_quota() {
        let (_dir, store) = store_with(100);
        let ledger = Arc::new(StorageLedger::default());
        let a = ledger.reserve(&store, "acme", Want::Exactly(60)).unwrap();
        let error = ledger
            .reserve(&store, "acme", Want::Exactly(41))
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::PermissionDenied);
        assert!(
            error.message().contains("quota of 100 stored bytes"),
            "{error}"
        );
        assert!(error.message().contains("40 bytes left"), "{error}");
        assert!(error.message().contains("60 bytes are held"), "{error}");
        let b = ledger.reserve(&store, "acme", Want::Exactly(40)).unwrap();
        assert_eq!(ledger.reserved("acme"), 100);
        // Another tenant's quota is its own.
        let c = ledger.reserve(&store, "other", Want::UpTo(1000)).unwrap();
        assert_eq!(c.bytes(), 100);
        drop(b);
        assert_eq!(ledger.reserved("acme"), 60);
        let mut d = ledger.reserve(&store, "acme", Want::UpTo(1000)).unwrap();
        assert_eq!(d.bytes(), 40, "without a length, what is left");
        d.shrink_to(10);
        assert_eq!(ledger.reserved("acme"), 70);
        drop((a, d, c));
        assert_eq!(ledger.reserved("acme"), 0);
        assert!(ledger.lock().is_empty(), "released tenants leave no entry");
    }

    #[test]
    fn an_unknown_tenant_reserves_nothing() {
        let (_dir, store) = store_with(100);
        let ledger = Arc::new(StorageLedger::default());
        let error = ledger
            .reserve(&store, "ghost", Want::Exactly(1))
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::NotFound);
    }

    #[test]
    fn a_change_past_a_count_or_byte_quota_is_refused_naming_it() {
        let quotas = Quotas {
            max_graphs: 1,
            ..Quotas::default()
        };
        let mut tenant = Tenant::new("acme", 1, quotas);
        check_stored(&tenant).unwrap();
        for version in 1..=2 {
            tenant.graphs.entry("g".into()).or_default().insert(
                version,
                weft_store::GraphVersion {
                    toml_digest: "0".repeat(64),
                    size: 10,
                    created_unix: 1,
                },
            );
        }
        let error = check_stored(&tenant).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::PermissionDenied);
        assert!(
            error
                .message()
                .contains("quota of 1 graph versions (it would have 2)"),
            "{error}"
        );
        tenant.quotas.max_graphs = 10;
        tenant.quotas.max_stored_bytes = 15;
        let error = check_stored(&tenant).unwrap_err();
        assert!(
            error.message().contains("quota of 15 stored bytes"),
            "{error}"
        );
    }

    #[test]
    fn a_model_past_the_memory_quota_is_refused_with_both_figures() {
        let cost = ModelCost {
            what: "model 'm' version 2".into(),
            instances: 2,
            bytes: 3 << 20,
        };
        assert_eq!(check_model_memory(&cost, 0, 8, 8 << 20).unwrap(), 8 << 20);
        let error = check_model_memory(&cost, 3 << 20, 8, 8 << 20).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::PermissionDenied);
        let text = error.message();
        assert!(
            text.contains("model 'm' version 2 needs about 6 MiB"),
            "{text}"
        );
        assert!(text.contains("quota of 8 MiB has 5 MiB left"), "{text}");
    }
}
