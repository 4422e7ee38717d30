//! The V2 statistics extension in Triton's shape: `GET /v2/models/stats`,
//! `/v2/models/{m}/stats` and `/v2/models/{m}/versions/{v}/stats`, kept per tenant, so a tenant
//! sees only its own traffic.
//!
//! Counts and nanosecond sums per (tenant, model or graph, version): successes and failures
//! with their request time, queue and compute time from the request's accounting, inference
//! count (rows) and execution count, and per batch size (the request's rows) compute time.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// `{"count": n, "ns": total}`, Triton's duration statistic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DurationStat {
    pub count: u64,
    pub ns: u64,
}

impl DurationStat {
    fn add(&mut self, duration: Duration) {
        self.count += 1;
        self.ns += u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct InferenceStats {
    pub success: DurationStat,
    pub fail: DurationStat,
    pub queue: DurationStat,
    pub compute_input: DurationStat,
    pub compute_infer: DurationStat,
    pub compute_output: DurationStat,
    pub cache_hit: DurationStat,
    pub cache_miss: DurationStat,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BatchStat {
    pub batch_size: u64,
    pub compute_input: DurationStat,
    pub compute_infer: DurationStat,
    pub compute_output: DurationStat,
}

/// One model version's statistics, as Triton reports them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ModelStat {
    pub name: String,
    pub version: String,
    /// Milliseconds since the epoch of the last request; 0 if none.
    pub last_inference: u64,
    pub inference_count: u64,
    pub execution_count: u64,
    pub inference_stats: InferenceStats,
    pub batch_stats: Vec<BatchStat>,
}

#[derive(Debug, Default)]
struct Entry {
    last_inference: u64,
    inference_count: u64,
    execution_count: u64,
    inference: InferenceStats,
    batches: BTreeMap<u64, BatchStat>,
}

/// What one finished request contributes.
pub struct Outcome {
    pub ok: bool,
    pub duration: Duration,
    pub rows: u64,
    pub queue: Duration,
    pub compute: Duration,
}

/// Statistics of every (tenant, model, version) that has served a request.
#[derive(Debug, Default)]
pub struct StatsStore {
    entries: Mutex<BTreeMap<(String, String, String), Entry>>,
}

impl StatsStore {
    /// Drops every statistic of a deleted tenant, so a tenant created later under the same
    /// name starts from zero.
    pub fn forget_tenant(&self, tenant: &str) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.retain(|(owner, _, _), _| owner != tenant);
        }
    }

    pub fn record(&self, tenant: &str, model: &str, version: &str, outcome: &Outcome) {
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        let entry = entries
            .entry((tenant.to_string(), model.to_string(), version.to_string()))
            .or_default();
        entry.last_inference = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        if !outcome.ok {
            entry.inference.fail.add(outcome.duration);
            return;
        }
        entry.inference.success.add(outcome.duration);
        entry.inference.queue.add(outcome.queue);
        entry.inference.compute_infer.add(outcome.compute);
        entry.inference_count += outcome.rows;
        entry.execution_count += 1;
        let batch = entry
            .batches
            .entry(outcome.rows)
            .or_insert_with(|| BatchStat {
                batch_size: outcome.rows,
                ..BatchStat::default()
            });
        batch.compute_infer.add(outcome.compute);
    }

    /// The tenant's statistics for `model` (all models when `None`) and `version` (all when
    /// `None`), in name and version order. Models that served nothing yet are left out; the
    /// caller adds zero entries for known ones.
    pub fn snapshot(
        &self,
        tenant: &str,
        model: Option<&str>,
        version: Option<&str>,
    ) -> Vec<ModelStat> {
        let Ok(entries) = self.entries.lock() else {
            return Vec::new();
        };
        entries
            .iter()
            .filter(|((t, m, v), _)| {
                t == tenant
                    && model.is_none_or(|wanted| wanted == m)
                    && version.is_none_or(|wanted| wanted == v)
            })
            .map(|((_, name, version), entry)| ModelStat {
                name: name.clone(),
                version: version.clone(),
                last_inference: entry.last_inference,
                inference_count: entry.inference_count,
                execution_count: entry.execution_count,
                inference_stats: entry.inference.clone(),
                batch_stats: entry.batches.values().cloned().collect(),
            })
            .collect()
    }
}

/// A model version that has served nothing yet, reported with zeros like Triton does.
pub fn empty(name: &str, version: &str) -> ModelStat {
    ModelStat {
        name: name.to_string(),
        version: version.to_string(),
        last_inference: 0,
        inference_count: 0,
        execution_count: 0,
        inference_stats: InferenceStats::default(),
        batch_stats: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_add_up_per_tenant_model_and_version() {
        let store = StatsStore::default();
        let ok = |rows| Outcome {
            ok: true,
            duration: Duration::from_micros(100),
            rows,
            queue: Duration::from_micros(10),
            compute: Duration::from_micros(50),
        };
        store.record("a", "mlp", "1", &ok(2));
        store.record("a", "mlp", "1", &ok(2));
        store.record("a", "mlp", "1", &ok(3));
        store.record("a", "mlp", "1", &Outcome { ok: false, ..ok(1) });
        store.record("b", "mlp", "1", &ok(1));
        let stats = store.snapshot("a", Some("mlp"), None);
        assert_eq!(stats.len(), 1);
        let mlp = &stats[0];
        assert_eq!(mlp.inference_count, 7);
        assert_eq!(mlp.execution_count, 3);
        assert_eq!(
            mlp.inference_stats.success,
            DurationStat {
                count: 3,
                ns: 300_000
            }
        );
        assert_eq!(mlp.inference_stats.fail.count, 1);
        assert_eq!(mlp.inference_stats.queue.ns, 30_000);
        assert_eq!(mlp.batch_stats.len(), 2);
        assert_eq!(mlp.batch_stats[0].batch_size, 2);
        assert_eq!(mlp.batch_stats[0].compute_infer.count, 2);
        assert!(mlp.last_inference > 0);
        assert_eq!(store.snapshot("b", None, None)[0].inference_count, 1);
        assert!(store.snapshot("c", None, None).is_empty());
    }
}
