//! What one control-plane commit costs the embedded store as the number of stored versions
//! grows, against SQLite doing the same commit (WAL, `synchronous = FULL`, so both are durable
//! when they return), measured in one run on the same disk.
//!
//! The embedded store rewrites and fsyncs the whole `state.json` per commit, so its cost grows
//! with what is stored; SQLite appends one row and its WAL frame. The figures decide whether the
//! embedded backend should move to SQLite (BENCHMARKS.md, "Embedded store: state.json or
//! SQLite"). Run: `cargo bench -p weft-store --bench commit_cost` (optional argument: commits
//! per measurement, default 40).
//!
//! The state is 50 tenants sharing the versions evenly, each version a model pointing at real
//! 64-hex digests, which is what a push adds. Each measured commit adds one model version to
//! one tenant and bumps that tenant's revision, in both backends.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use sqlx::ConnectOptions as _;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use weft_store::{ModelVersion, Quotas, State, Store, Tenant};

const TENANTS: usize = 50;

fn version(onnx: &str, config: &str) -> ModelVersion {
    ModelVersion {
        onnx_digest: onnx.to_string(),
        config_digest: config.to_string(),
        size: 4096,
        created_unix: 1_700_000_000,
        served: None,
    }
}

fn tenant_name(index: usize) -> String {
    format!("tenant-{index:03}")
}

/// p50 and mean of `samples`, in microseconds.
fn summary(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort_unstable();
    let p50 = samples[samples.len() / 2].as_secs_f64() * 1e6;
    let mean = samples.iter().map(Duration::as_secs_f64).sum::<f64>() / samples.len() as f64 * 1e6;
    (p50, mean)
}

struct Embedded {
    commit_p50_us: f64,
    commit_mean_us: f64,
    clone_p50_us: f64,
    state_bytes: u64,
}

/// The embedded store holding `stored` model versions; times `commits` one-version pushes.
fn embedded(stored: usize, commits: usize) -> Embedded {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let onnx = store.put_blob(b"an onnx model").unwrap();
    let config = store.put_blob(b"a model.toml").unwrap();
    store
        .transact(|state| {
            for t in 0..TENANTS {
                let mut record = Tenant::new(tenant_name(t), 1_700_000_000, Quotas::default());
                for v in (t..stored).step_by(TENANTS) {
                    record
                        .models
                        .entry(format!("model-{}", v % 200))
                        .or_default()
                        .insert(v as u64 + 1, version(&onnx, &config));
                }
                state.tenants.insert(record.name.clone(), record);
            }
            Ok(())
        })
        .unwrap();
    let mut samples = Vec::with_capacity(commits);
    for i in 0..commits {
        let began = Instant::now();
        store
            .transact(|state| {
                let record = state.tenants.get_mut(&tenant_name(i % TENANTS)).unwrap();
                record
                    .models
                    .entry("pushed".to_string())
                    .or_default()
                    .insert(i as u64 + 1, version(&onnx, &config));
                record.revision += 1;
                Ok(())
            })
            .unwrap();
        samples.push(began.elapsed());
    }
    let (commit_p50_us, commit_mean_us) = summary(&mut samples);
    // What any backend pays as long as the server publishes whole-state snapshots.
    let snapshot = store.state();
    let mut clones: Vec<Duration> = (0..commits)
        .map(|_| {
            let began = Instant::now();
            let copy = State::clone(&snapshot);
            let spent = began.elapsed();
            drop(copy);
            spent
        })
        .collect();
    let (clone_p50_us, _) = summary(&mut clones);
    let state_bytes = std::fs::metadata(store.dir().join("state.json"))
        .unwrap()
        .len();
    Embedded {
        commit_p50_us,
        commit_mean_us,
        clone_p50_us,
        state_bytes,
    }
}

/// SQLite holding `stored` version rows; times `commits` transactions of one insert plus the
/// tenant's revision bump.
async fn sqlite(stored: usize, commits: usize) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let mut db = SqliteConnectOptions::new()
        .filename(dir.path().join("weft.db"))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .connect()
        .await
        .unwrap();
    sqlx::raw_sql(
        "CREATE TABLE tenants (name TEXT PRIMARY KEY, revision INTEGER NOT NULL);
         CREATE TABLE model_versions (
             tenant TEXT NOT NULL REFERENCES tenants(name),
             name TEXT NOT NULL,
             version INTEGER NOT NULL,
             onnx_digest TEXT NOT NULL,
             config_digest TEXT NOT NULL,
             size INTEGER NOT NULL,
             created_unix INTEGER NOT NULL,
             PRIMARY KEY (tenant, name, version));",
    )
    .execute(&mut db)
    .await
    .unwrap();
    let digest = "0".repeat(64);
    let mut setup = sqlx::Connection::begin(&mut db).await.unwrap();
    for t in 0..TENANTS {
        sqlx::query("INSERT INTO tenants (name, revision) VALUES (?, 0)")
            .bind(tenant_name(t))
            .execute(&mut *setup)
            .await
            .unwrap();
    }
    for v in 0..stored {
        sqlx::query("INSERT INTO model_versions VALUES (?, ?, ?, ?, ?, 4096, 1700000000)")
            .bind(tenant_name(v % TENANTS))
            .bind(format!("model-{}", v % 200))
            .bind(v as i64 + 1)
            .bind(&digest)
            .bind(&digest)
            .execute(&mut *setup)
            .await
            .unwrap();
    }
    setup.commit().await.unwrap();
    let mut samples = Vec::with_capacity(commits);
    for i in 0..commits {
        let began = Instant::now();
        let mut tx = sqlx::Connection::begin(&mut db).await.unwrap();
        sqlx::query("INSERT INTO model_versions VALUES (?, 'pushed', ?, ?, ?, 4096, 1700000000)")
            .bind(tenant_name(i % TENANTS))
            .bind(i as i64 + 1)
            .bind(&digest)
            .bind(&digest)
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::query("UPDATE tenants SET revision = revision + 1 WHERE name = ?")
            .bind(tenant_name(i % TENANTS))
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        samples.push(began.elapsed());
    }
    summary(&mut samples)
}

fn main() {
    let commits = std::env::args()
        .skip(1)
        .find_map(|a| a.parse::<usize>().ok())
        .unwrap_or(40)
        .max(1);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    println!(
        "one durable commit (a model version pushed), {commits} commits per row, {TENANTS} tenants"
    );
    println!(
        "{:>9}  {:>11}  {:>18}  {:>18}  {:>16}  {:>7}  {:>18}",
        "versions",
        "state.json",
        "embedded p50/mean",
        "sqlite p50/mean",
        "embedded/sqlite",
        "",
        "State::clone p50"
    );
    for stored in [100, 1_000, 10_000] {
        let embedded = embedded(stored, commits);
        let (sqlite_p50, sqlite_mean) = runtime.block_on(sqlite(stored, commits));
        println!(
            "{stored:>9}  {:>8} KiB  {:>8.0} /{:>6.0} us  {:>8.0} /{:>6.0} us  {:>15.2}x  {:>7}  {:>15.0} us",
            embedded.state_bytes / 1024,
            embedded.commit_p50_us,
            embedded.commit_mean_us,
            sqlite_p50,
            sqlite_mean,
            embedded.commit_p50_us / sqlite_p50,
            "",
            embedded.clone_p50_us,
        );
    }
}
