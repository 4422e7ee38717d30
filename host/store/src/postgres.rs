//! Tenant metadata in PostgreSQL, shared by every replica (`--database-url`).
//!
//! The shape follows the embedded store so that everything above it stays the same: readers
//! take a cached [`State`] snapshot, and [`PostgresMeta::transact`] is the only way to change
//! it. Each tenant is one row (`weft_tenants`: name, its JSON record, a row version); one row
//! of `weft_meta` holds the global revision. A change runs as one PostgreSQL transaction:
//!
//! 1. `pg_advisory_xact_lock` serializes writers across all replicas (the embedded store's
//!    single writer, made global; control-plane changes are rare, so one at a time is cheap);
//! 2. the cached snapshot is brought up to date inside the transaction (only rows whose
//!    version differs are read), so the change is decided on the latest state: the checks that
//!    span tenants (a public key belongs to one tenant) hold across replicas;
//! 3. the caller's change runs once on a copy; only the tenants it changed are written, each
//!    guarded by its row version; the revision goes up by one and `NOTIFY weft_changes` tells
//!    the other replicas;
//! 4. commit, then the new snapshot is published.
//!
//! Other replicas apply changes in [`PostgresMeta::refresh`], which the server calls when a
//! notification arrives ([`PostgresMeta::listen`]) and on a timer (notifications are lost while
//! a connection is down, so the timer bounds how stale a replica can be).
//!
//! Replicas announce themselves every few seconds ([`PostgresMeta::heartbeat`], table
//! `weft_replicas`); the count of live ones lets each enforce its share of a tenant's rate and
//! concurrency quotas, so the quotas hold across replicas without a shared counter per request.
//!
//! The schema is created and upgraded at start ([`MIGRATIONS`], under an advisory lock, in one
//! transaction per step, recorded in `weft_schema`), so replicas starting together agree.
//!
//! sqlx is async and the store's interface is not (callers use it from blocking threads and
//! from plain code), so this module owns a small tokio runtime of its own; every call goes
//! there and the caller waits on a channel, which works from any thread, async or not.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{PgPool, Postgres, Row, Transaction};
use weft_core::{Error, Result};

use crate::records::{State, Tenant};

/// The channel replicas are told about changes on (payload: the new revision).
pub const CHANGES_CHANNEL: &str = "weft_changes";

/// Key of the advisory lock that serializes writers (and migrations) across replicas.
const WRITER_LOCK: i64 = 0x5745_4654_0001; // "WEFT" 1
const MIGRATION_LOCK: i64 = 0x5745_4654_0002;

/// Schema steps, applied in order; step N is recorded as version N in `weft_schema`. Never
/// edit a released step: add one.
pub const MIGRATIONS: &[&str] = &[
    // 1: tenants as JSON documents with a row version, and the global revision.
    "CREATE TABLE weft_tenants (
         name TEXT PRIMARY KEY,
         record JSONB NOT NULL,
         row_version BIGINT NOT NULL
     );
     CREATE TABLE weft_meta (
         id BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (id),
         revision BIGINT NOT NULL
     );
     INSERT INTO weft_meta (id, revision) VALUES (TRUE, 0);",
    // 2: replicas announce themselves, so each can take its share of a tenant's quotas.
    "CREATE TABLE weft_replicas (
         id TEXT PRIMARY KEY,
         seen_at TIMESTAMPTZ NOT NULL
     );",
    // 3: signing-key registration challenges, so any replica can take one another issued.
    "CREATE TABLE weft_challenges (
         nonce TEXT PRIMARY KEY,
         tenant TEXT NOT NULL,
         expires_at TIMESTAMPTZ NOT NULL
     );
     CREATE INDEX weft_challenges_tenant ON weft_challenges (tenant);",
];

/// What spending a challenge found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChallengeTaken {
    /// Issued to this tenant and still valid: spent now.
    Valid,
    /// Issued to this tenant but expired: spent (removed) now.
    Expired,
    /// Never issued to this tenant, or already spent.
    Unknown,
}

/// A replica that has not announced itself for this long no longer counts.
pub const REPLICA_TIMEOUT_SECONDS: i64 = 10;

/// How long one statement may take before the call fails (the database is down or stuck).
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The database's failure as an error a tenant may see: what failed, not how (hosts, URLs
/// and SQL stay in the operator's log; the URL with its password appears nowhere).
fn database_error(what: &str, error: &sqlx::Error) -> Error {
    tracing::warn!(%error, "shared store, database: {what}");
    Error::unavailable(format!(
        "the shared store's database is unavailable: {what} (details in the server log)"
    ))
}

/// Tenant metadata in PostgreSQL, with a local snapshot.
pub struct PostgresMeta {
    runtime: Option<tokio::runtime::Runtime>,
    pool: PgPool,
    url: String,
    state: RwLock<Arc<State>>,
    /// Row version of each tenant in `state`, to read only what changed.
    versions: Mutex<BTreeMap<String, i64>>,
    /// One local writer at a time (the advisory lock orders replicas).
    writer: Mutex<()>,
}

impl std::fmt::Debug for PostgresMeta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PostgresMeta")
    }
}

impl PostgresMeta {
    /// Connects to `url` (`postgres://user:password@host:port/database`), applies missing
    /// schema steps and loads every tenant.
    pub fn connect(url: &str) -> Result<PostgresMeta> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("weft-store-db")
            .enable_all()
            .build()
            .map_err(|error| {
                Error::internal(format!("cannot start the database runtime: {error}"))
            })?;
        let options: PgConnectOptions = url.parse().map_err(|error: sqlx::Error| {
            Error::invalid(format!(
                "--database-url is not a PostgreSQL URL ({})",
                error.to_string().replace(url, "<url>")
            ))
        })?;
        let options = options.options([(
            "statement_timeout",
            format!("{}", STATEMENT_TIMEOUT.as_millis()),
        )]);
        let pool = wait_on(&runtime, async move {
            PgPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(STATEMENT_TIMEOUT)
                .connect_with(options)
                .await
                .map_err(|error| database_error("cannot connect", &error))
        })??;
        let meta = PostgresMeta {
            runtime: Some(runtime),
            pool,
            url: url.to_string(),
            state: RwLock::new(Arc::new(State::default())),
            versions: Mutex::new(BTreeMap::new()),
            writer: Mutex::new(()),
        };
        meta.migrate()?;
        meta.refresh()?;
        Ok(meta)
    }

    /// Runs `future` on the store's runtime and waits for it, from any thread.
    fn run<T: Send + 'static>(
        &self,
        future: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        match &self.runtime {
            Some(runtime) => wait_on(runtime, future)?,
            None => Err(Error::unavailable("the shared store is closed")),
        }
    }

    fn migrate(&self) -> Result<()> {
        let pool = self.pool.clone();
        self.run(async move {
            let mut tx = begin(&pool).await?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(MIGRATION_LOCK)
                .execute(&mut *tx)
                .await
                .map_err(|e| database_error("cannot lock for migrations", &e))?;
            sqlx::query("CREATE TABLE IF NOT EXISTS weft_schema (version INTEGER PRIMARY KEY)")
                .execute(&mut *tx)
                .await
                .map_err(|e| database_error("cannot create weft_schema", &e))?;
            let applied: i64 =
                sqlx::query("SELECT COALESCE(MAX(version), 0)::BIGINT FROM weft_schema")
                    .fetch_one(&mut *tx)
                    .await
                    .and_then(|row| row.try_get(0))
                    .map_err(|e| database_error("cannot read the schema version", &e))?;
            if applied > MIGRATIONS.len() as i64 {
                return Err(Error::unavailable(format!(
                    "the database's schema is version {applied}, newer than this weft knows \
                     ({}); upgrade weft",
                    MIGRATIONS.len()
                )));
            }
            for (index, step) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
                sqlx::raw_sql(sqlx::AssertSqlSafe(*step))
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| database_error(&format!("schema step {}", index + 1), &e))?;
                sqlx::query("INSERT INTO weft_schema (version) VALUES ($1)")
                    .bind(index as i32 + 1)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| database_error("cannot record the schema version", &e))?;
            }
            tx.commit()
                .await
                .map_err(|e| database_error("cannot commit the schema", &e))
        })
    }

    /// The committed state as this replica last saw it.
    pub fn state(&self) -> Arc<State> {
        Arc::clone(&self.state.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Brings the snapshot up to date with the database; returns whether anything changed.
    pub fn refresh(&self) -> Result<bool> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let known = self.known_versions();
        let pool = self.pool.clone();
        let delta = self.run(async move {
            let mut tx = begin(&pool).await?;
            let delta = read_delta(&mut tx, &known).await?;
            tx.commit()
                .await
                .map_err(|e| database_error("cannot finish reading", &e))?;
            Ok(delta)
        })?;
        let changed = !delta.is_empty(&self.state().revision);
        if changed {
            self.publish(delta.apply(&self.state()), &delta.versions);
        }
        Ok(changed)
    }

    /// Runs `work` on the latest state while holding the cluster-wide writer lock, changing
    /// nothing: no replica can commit until it returns, so what `work` decides from the state
    /// (which blobs nothing references) still holds while it acts on it. The snapshot is not
    /// published here, so followers still see what changed at their next refresh.
    pub fn while_writing<T>(&self, work: impl FnOnce(&State) -> Result<T>) -> Result<T> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let known = self.known_versions();
        let pool = self.pool.clone();
        let (tx, delta) = self.run(begin_writing(pool, known))?;
        let out = work(&delta.apply(&self.state()));
        // Read-only: ending the transaction releases the lock.
        let _ = self.run(async move {
            tx.rollback()
                .await
                .map_err(|e| database_error("cannot release the writer lock", &e))
        });
        out
    }

    /// Runs `change` on the latest state under the cluster-wide writer lock and commits what it
    /// changed; see the module documentation. `check` runs on the new state before the commit
    /// (the store checks that new blobs exist).
    pub fn transact<T>(
        &self,
        change: impl FnOnce(&mut State) -> Result<T>,
        check: impl FnOnce(&State, &State) -> Result<()>,
    ) -> Result<T> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let known = self.known_versions();
        let pool = self.pool.clone();
        let (tx, delta) = self.run(begin_writing(pool, known))?;
        let current = delta.apply(&self.state());
        if !delta.is_empty(&self.state().revision) {
            // Publish what other replicas committed even if this change fails.
            self.publish(Arc::clone(&current), &delta.versions);
        }
        let mut next = State::clone(&current);
        let outcome = change(&mut next).and_then(|out| check(&current, &next).map(|()| out));
        let out = match outcome {
            Ok(out) => out,
            Err(error) => {
                let _ = self.run(async move {
                    tx.rollback()
                        .await
                        .map_err(|e| database_error("cannot roll back", &e))
                });
                return Err(error);
            }
        };
        let writes = changed_tenants(&current, &next);
        let versions = self.known_versions();
        let (revision, written) = self.run(async move {
            let mut tx = tx;
            let mut written = BTreeMap::new();
            for (name, record) in writes {
                match record {
                    Some(record) => {
                        let row: i64 = sqlx::query(
                            "INSERT INTO weft_tenants (name, record, row_version) VALUES ($1, $2, 1)
                             ON CONFLICT (name) DO UPDATE
                                 SET record = EXCLUDED.record,
                                     row_version = weft_tenants.row_version + 1
                             RETURNING row_version",
                        )
                        .bind(&name)
                        .bind(sqlx::types::Json(record))
                        .fetch_one(&mut *tx)
                        .await
                        .and_then(|row| row.try_get(0))
                        .map_err(|e| database_error("cannot write a tenant", &e))?;
                        written.insert(name, Some(row));
                    }
                    None => {
                        sqlx::query("DELETE FROM weft_tenants WHERE name = $1")
                            .bind(&name)
                            .execute(&mut *tx)
                            .await
                            .map_err(|e| database_error("cannot delete a tenant", &e))?;
                        written.insert(name, None);
                    }
                }
            }
            let revision: i64 =
                sqlx::query("UPDATE weft_meta SET revision = revision + 1 RETURNING revision")
                    .fetch_one(&mut *tx)
                    .await
                    .and_then(|row| row.try_get(0))
                    .map_err(|e| database_error("cannot advance the revision", &e))?;
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANGES_CHANNEL)
                .bind(revision.to_string())
                .execute(&mut *tx)
                .await
                .map_err(|e| database_error("cannot notify the replicas", &e))?;
            tx.commit()
                .await
                .map_err(|e| database_error("cannot commit", &e))?;
            Ok((revision, written))
        })?;
        next.revision = u64::try_from(revision).unwrap_or(0);
        let mut versions = versions;
        for (name, version) in written {
            match version {
                Some(version) => versions.insert(name, version),
                None => versions.remove(&name),
            };
        }
        self.publish_all(Arc::new(next), versions);
        Ok(out)
    }

    /// Announces the replica `id` as alive and returns the ids of the live replicas (itself
    /// included): those announced within [`REPLICA_TIMEOUT_SECONDS`]. Call it every few seconds.
    pub fn heartbeat(&self, id: &str) -> Result<Vec<String>> {
        let pool = self.pool.clone();
        let id = id.to_string();
        self.run(async move {
            sqlx::query(
                "INSERT INTO weft_replicas (id, seen_at) VALUES ($1, now())
                 ON CONFLICT (id) DO UPDATE SET seen_at = now()",
            )
            .bind(&id)
            .execute(&pool)
            .await
            .map_err(|e| database_error("cannot announce this replica", &e))?;
            sqlx::query("DELETE FROM weft_replicas WHERE seen_at < now() - interval '1 hour'")
                .execute(&pool)
                .await
                .map_err(|e| database_error("cannot forget old replicas", &e))?;
            let rows = sqlx::query(
                "SELECT id FROM weft_replicas
                 WHERE seen_at > now() - make_interval(secs => $1) ORDER BY id",
            )
            .bind(REPLICA_TIMEOUT_SECONDS as f64)
            .fetch_all(&pool)
            .await
            .map_err(|e| database_error("cannot list live replicas", &e))?;
            rows.iter()
                .map(|row| row.try_get::<String, _>(0))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| database_error("cannot list live replicas", &e))
        })
    }

    /// Says the replica `id` is leaving (a clean shutdown), so the others take over its share
    /// at once.
    pub fn leave(&self, id: &str) -> Result<()> {
        let pool = self.pool.clone();
        let id = id.to_string();
        self.run(async move {
            sqlx::query("DELETE FROM weft_replicas WHERE id = $1")
                .bind(&id)
                .execute(&pool)
                .await
                .map(|_| ())
                .map_err(|e| database_error("cannot sign this replica off", &e))
        })
    }

    /// Records a challenge `nonce` for `tenant`, valid for `ttl_seconds`, dropping expired
    /// challenges and the tenant's oldest beyond `per_tenant` (so the table stays bounded).
    pub fn issue_challenge(
        &self,
        tenant: &str,
        nonce: &str,
        ttl_seconds: u64,
        per_tenant: usize,
    ) -> Result<()> {
        let pool = self.pool.clone();
        let (tenant, nonce) = (tenant.to_string(), nonce.to_string());
        let keep = i64::try_from(per_tenant.max(1) - 1).unwrap_or(0);
        self.run(async move {
            let mut tx = begin(&pool).await?;
            sqlx::query("DELETE FROM weft_challenges WHERE expires_at <= now()")
                .execute(&mut *tx)
                .await
                .map_err(|e| database_error("cannot drop expired challenges", &e))?;
            sqlx::query(
                "DELETE FROM weft_challenges WHERE nonce IN (
                     SELECT nonce FROM weft_challenges WHERE tenant = $1
                     ORDER BY expires_at DESC OFFSET $2)",
            )
            .bind(&tenant)
            .bind(keep)
            .execute(&mut *tx)
            .await
            .map_err(|e| database_error("cannot bound the challenges", &e))?;
            sqlx::query(
                "INSERT INTO weft_challenges (nonce, tenant, expires_at)
                 VALUES ($1, $2, now() + make_interval(secs => $3))",
            )
            .bind(&nonce)
            .bind(&tenant)
            .bind(ttl_seconds as f64)
            .execute(&mut *tx)
            .await
            .map_err(|e| database_error("cannot record a challenge", &e))?;
            tx.commit()
                .await
                .map_err(|e| database_error("cannot commit a challenge", &e))
        })
    }

    /// Spends `tenant`'s challenge `nonce` (whatever is found, it is gone afterwards).
    pub fn take_challenge(&self, tenant: &str, nonce: &str) -> Result<ChallengeTaken> {
        let pool = self.pool.clone();
        let (tenant, nonce) = (tenant.to_string(), nonce.to_string());
        self.run(async move {
            let row = sqlx::query(
                "DELETE FROM weft_challenges WHERE nonce = $1 AND tenant = $2
                 RETURNING expires_at > now()",
            )
            .bind(&nonce)
            .bind(&tenant)
            .fetch_optional(&pool)
            .await
            .map_err(|e| database_error("cannot spend a challenge", &e))?;
            Ok(match row {
                None => ChallengeTaken::Unknown,
                Some(row) => match row.try_get::<bool, _>(0) {
                    Ok(true) => ChallengeTaken::Valid,
                    _ => ChallengeTaken::Expired,
                },
            })
        })
    }

    /// Drops a deleted tenant's challenges.
    pub fn forget_challenges(&self, tenant: &str) -> Result<()> {
        let pool = self.pool.clone();
        let tenant = tenant.to_string();
        self.run(async move {
            sqlx::query("DELETE FROM weft_challenges WHERE tenant = $1")
                .bind(&tenant)
                .execute(&pool)
                .await
                .map(|_| ())
                .map_err(|e| database_error("cannot drop a tenant's challenges", &e))
        })
    }

    /// Listens for other replicas' changes: returns a receiver that yields once per
    /// notification, and `None` after a reconnect (notifications may have been lost: refresh
    /// fully). The listener runs on the store's runtime until the store is dropped.
    pub fn listen(&self) -> Result<tokio::sync::mpsc::UnboundedReceiver<Option<u64>>> {
        let url = self.url.clone();
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        let runtime = self
            .runtime
            .as_ref()
            .ok_or_else(|| Error::unavailable("the shared store is closed"))?;
        let mut listener = wait_on(runtime, async move {
            let mut listener = PgListener::connect(&url)
                .await
                .map_err(|e| database_error("cannot listen", &e))?;
            listener
                .listen(CHANGES_CHANNEL)
                .await
                .map_err(|e| database_error("cannot listen", &e))?;
            Ok(listener)
        })??;
        runtime.spawn(async move {
            loop {
                let message = match listener.try_recv().await {
                    Ok(Some(notification)) => Some(notification.payload().parse().unwrap_or(0)),
                    // The connection was lost and re-established: anything may have been missed.
                    Ok(None) => None,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        None
                    }
                };
                if sender.send(message).is_err() {
                    return;
                }
            }
        });
        Ok(receiver)
    }

    fn known_versions(&self) -> BTreeMap<String, i64> {
        self.versions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn publish(&self, state: Arc<State>, changed: &BTreeMap<String, Option<i64>>) {
        let mut versions = self.known_versions();
        for (name, version) in changed {
            match version {
                Some(version) => versions.insert(name.clone(), *version),
                None => versions.remove(name),
            };
        }
        self.publish_all(state, versions);
    }

    fn publish_all(&self, state: Arc<State>, versions: BTreeMap<String, i64>) {
        *self.versions.lock().unwrap_or_else(|e| e.into_inner()) = versions;
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = state;
    }
}

impl Drop for PostgresMeta {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Runs `future` on `runtime` and waits for it on this thread (safe inside another runtime:
/// the wait is a plain channel, not `block_on`).
pub(crate) fn wait_on<T: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    future: impl Future<Output = T> + Send + 'static,
) -> Result<T> {
    let (sender, receiver) = std::sync::mpsc::sync_channel(1);
    runtime.spawn(async move {
        let _ = sender.send(future.await);
    });
    receiver
        .recv()
        .map_err(|_| Error::internal("the database runtime stopped during a call"))
}

/// Starts a transaction holding the cluster-wide writer lock, with what changed since `known`.
async fn begin_writing(
    pool: PgPool,
    known: BTreeMap<String, i64>,
) -> Result<(Transaction<'static, Postgres>, Delta)> {
    let mut tx = begin(&pool).await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(WRITER_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(|e| database_error("cannot take the writer lock", &e))?;
    let delta = read_delta(&mut tx, &known).await?;
    Ok((tx, delta))
}

async fn begin(pool: &PgPool) -> Result<Transaction<'static, Postgres>> {
    pool.begin()
        .await
        .map_err(|e| database_error("cannot start a transaction", &e))
}

/// What the database holds that the snapshot does not: changed or new tenants, deleted ones,
/// and the revision.
struct Delta {
    revision: u64,
    tenants: BTreeMap<String, Option<Tenant>>,
    versions: BTreeMap<String, Option<i64>>,
}

impl Delta {
    fn is_empty(&self, known_revision: &u64) -> bool {
        self.tenants.is_empty() && self.revision == *known_revision
    }

    fn apply(&self, state: &Arc<State>) -> Arc<State> {
        if self.is_empty(&state.revision) {
            return Arc::clone(state);
        }
        let mut next = State::clone(state);
        next.revision = self.revision;
        for (name, tenant) in &self.tenants {
            match tenant {
                Some(tenant) => next.tenants.insert(name.clone(), tenant.clone()),
                None => next.tenants.remove(name),
            };
        }
        Arc::new(next)
    }
}

async fn read_delta(
    tx: &mut Transaction<'static, Postgres>,
    known: &BTreeMap<String, i64>,
) -> Result<Delta> {
    let revision: i64 = sqlx::query("SELECT revision FROM weft_meta")
        .fetch_one(&mut **tx)
        .await
        .and_then(|row| row.try_get(0))
        .map_err(|e| database_error("cannot read the revision", &e))?;
    let rows = sqlx::query("SELECT name, row_version FROM weft_tenants")
        .fetch_all(&mut **tx)
        .await
        .map_err(|e| database_error("cannot list tenants", &e))?;
    let mut current = BTreeMap::new();
    for row in rows {
        let name: String = row
            .try_get(0)
            .map_err(|e| database_error("cannot read a tenant name", &e))?;
        let version: i64 = row
            .try_get(1)
            .map_err(|e| database_error("cannot read a row version", &e))?;
        current.insert(name, version);
    }
    let stale: Vec<String> = current
        .iter()
        .filter(|(name, version)| known.get(*name) != Some(version))
        .map(|(name, _)| name.clone())
        .collect();
    let mut tenants = BTreeMap::new();
    let mut versions = BTreeMap::new();
    if !stale.is_empty() {
        let rows =
            sqlx::query("SELECT name, record, row_version FROM weft_tenants WHERE name = ANY($1)")
                .bind(&stale)
                .fetch_all(&mut **tx)
                .await
                .map_err(|e| database_error("cannot read tenants", &e))?;
        for row in rows {
            let name: String = row
                .try_get(0)
                .map_err(|e| database_error("cannot read a tenant name", &e))?;
            let sqlx::types::Json(record): sqlx::types::Json<Tenant> = row
                .try_get(1)
                .map_err(|e| database_error(&format!("tenant '{name}' is unreadable"), &e))?;
            let version: i64 = row
                .try_get(2)
                .map_err(|e| database_error("cannot read a row version", &e))?;
            tenants.insert(name.clone(), Some(record));
            versions.insert(name, Some(version));
        }
    }
    for name in known.keys() {
        if !current.contains_key(name) {
            tenants.insert(name.clone(), None);
            versions.insert(name.clone(), None);
        }
    }
    Ok(Delta {
        revision: u64::try_from(revision).unwrap_or(0),
        tenants,
        versions,
    })
}

/// The tenants `next` added, changed (as their new record) or removed (`None`).
fn changed_tenants(current: &State, next: &State) -> Vec<(String, Option<Tenant>)> {
    let mut writes = Vec::new();
    for (name, tenant) in &next.tenants {
        if current.tenants.get(name) != Some(tenant) {
            writes.push((name.clone(), Some(tenant.clone())));
        }
    }
    for name in current.tenants.keys() {
        if !next.tenants.contains_key(name) {
            writes.push((name.clone(), None));
        }
    }
    writes
}
