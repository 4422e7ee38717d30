//! Models and plugins loaded on first use and unloaded under a memory budget.
//!
//! Why: a replica set holds thousands of stored models and plugins of hundreds of tenants, of
//! which a few are in use at a time. Loading every one at start-up makes memory grow with what
//! is stored and start-up with the number of tenants. A [`Lazy`] cell is registered with what
//! it needs to load and loads on its first use; [`LazyModel`] wraps one with the metadata and
//! serving config that routing, validation, graphs and `GET /v2/models/{m}` need before it
//! loads (the tenancy layer wraps one around a compiled plugin the same way):
//!
//! - **Single flight.** Concurrent first requests wait on one load, which runs in a task of its
//!   own (a caller that gives up does not throw the load away). The wait counts as the
//!   requests' `queue_us`. A failed load answers the callers of the next [`RETRY_FAILED_AFTER`]
//!   with the same error instead of retrying once per caller.
//! - **A budget.** Every loaded cell's bytes (a model's file size times its instances, a
//!   plugin's compiled image) are reserved in a shared [`Residency`] before it loads. When the
//!   budget would overflow, the least recently used cells that nothing is using and that are
//!   not pinned are unloaded first; a cell serving a request is never unloaded (a request
//!   counts itself in before it looks at the cell, and the unloader checks the count under the
//!   same lock). While the budget is held by cells serving requests, a load waits (up to
//!   [`WAIT_FOR_ROOM`], in the request's queue time) for one of them to finish rather than
//!   exceed the budget; then it is refused (503).
//! - **Explicit control** for Triton's repository extension: [`OnDemand`] loads (warms) or
//!   unloads a model by name.
//!
//! Engine-level and backend-free: the loader is a closure the tenancy layer supplies.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::Shared;
use weft_core::{
    BoxFuture, Error, ErrorKind, Model, ModelMetadata, NamedTensor, OnDemand, Parameters,
    RequestContext, Residence, Result, ServingConfig, Spent,
};

/// Loads a model version; blocking (it runs on the blocking pool).
pub type LoadFn = Arc<dyn Fn() -> Result<Arc<dyn Model>> + Send + Sync>;

/// Loads what a [`Lazy`] cell holds; blocking (it runs on the blocking pool).
pub type Loader<T> = Arc<dyn Fn() -> Result<T> + Send + Sync>;

/// How long a failed load's error answers new requests before the next one tries again.
pub const RETRY_FAILED_AFTER: Duration = Duration::from_secs(5);

/// How long a load waits for room while the budget is held by cells serving requests.
pub const WAIT_FOR_ROOM: Duration = Duration::from_secs(30);

/// What the residency reports, for metrics.
pub trait ResidencyObserver: Send + Sync {
    /// A load finished (`ok` or not) after `elapsed`.
    fn loaded(&self, elapsed: Duration, ok: bool);
    /// A cell was unloaded to make room, or on request.
    fn evicted(&self);
    /// Bytes reserved by loaded and loading cells, after a change.
    fn resident(&self, bytes: u64);
}

/// A cell a [`Residency`] can unload, whatever it holds.
trait Resident: Send + Sync {
    fn terms(&self) -> &Terms;
    /// Unloads it if loaded and idle; whether it did. Called under the residency's lock.
    fn try_unload(&self) -> bool;
}

/// How a cell stands in its budget: fixed at registration, plus its use and reservation.
struct Terms {
    label: String,
    cost: u64,
    pinned: bool,
    group: Option<String>,
    in_flight: AtomicUsize,
    last_used: AtomicU64,
    reserved: AtomicBool,
}

/// The cells loaded (or loading) under one memory budget.
pub struct Residency {
    budget: u64,
    /// Names the budget in refusals: `model memory budget (--model-memory-budget)`.
    what: &'static str,
    /// What a group (a tenant's model worker process) costs while any of its cells is
    /// loaded, on top of the cells' own bytes.
    group_cost: u64,
    members: Mutex<Members>,
    /// Woken whenever room may have appeared: a cell's last request ended, bytes came back.
    room: tokio::sync::Notify,
    observer: Option<Arc<dyn ResidencyObserver>>,
    epoch: Instant,
}

#[derive(Default)]
struct Members {
    bytes: u64,
    cells: Vec<Weak<dyn Resident>>,
    /// Reserved cells per group.
    groups: std::collections::HashMap<String, usize>,
}

impl Members {
    /// What reserving a cell on `terms` adds now: its bytes, and its group's if none of the
    /// group is in.
    fn need(&self, terms: &Terms, group_cost: u64) -> u64 {
        match &terms.group {
            Some(group) if self.groups.get(group).copied().unwrap_or(0) == 0 => {
                terms.cost.saturating_add(group_cost)
            }
            _ => terms.cost,
        }
    }
}

impl std::fmt::Debug for Residency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Residency")
            .field("what", &self.what)
            .field("budget", &self.budget)
            .field("resident_bytes", &self.resident_bytes())
            .finish()
    }
}

impl Residency {
    /// A model budget of `budget` bytes (`u64::MAX`: unbounded, models still load on first
    /// use).
    pub fn new(budget: u64, observer: Option<Arc<dyn ResidencyObserver>>) -> Arc<Self> {
        Self::with_group_cost(budget, 0, observer)
    }

    /// A model budget whose groups cost `group_cost` bytes while any of their models is
    /// loaded (a tenant's model worker process, which starts with its first loaded model and
    /// ends with its last).
    pub fn with_group_cost(
        budget: u64,
        group_cost: u64,
        observer: Option<Arc<dyn ResidencyObserver>>,
    ) -> Arc<Self> {
        Self::build(
            budget,
            "model memory budget (--model-memory-budget)",
            group_cost,
            observer,
        )
    }

    /// The budget of compiled plugins (`--plugin-cache-budget`).
    pub fn for_plugins(budget: u64, observer: Option<Arc<dyn ResidencyObserver>>) -> Arc<Self> {
        Self::build(
            budget,
            "plugin cache budget (--plugin-cache-budget)",
            0,
            observer,
        )
    }

    fn build(
        budget: u64,
        what: &'static str,
        group_cost: u64,
        observer: Option<Arc<dyn ResidencyObserver>>,
    ) -> Arc<Self> {
        Arc::new(Residency {
            budget,
            what,
            group_cost,
            members: Mutex::default(),
            room: tokio::sync::Notify::new(),
            observer,
            epoch: Instant::now(),
        })
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Bytes reserved now.
    pub fn resident_bytes(&self) -> u64 {
        self.lock().bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Members> {
        // Every update leaves the list and its sum consistent: a poisoned lock is still usable.
        self.members
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn report(&self, bytes: u64) {
        if let Some(observer) = &self.observer {
            observer.resident(bytes);
        }
    }

    /// Reserves `cell`'s bytes, waiting up to [`WAIT_FOR_ROOM`] while the budget is held by
    /// cells serving requests.
    async fn reserve_waiting<T: Clone + Send + Sync + 'static>(
        &self,
        cell: &Arc<Lazy<T>>,
    ) -> Result<()> {
        let deadline = Instant::now() + WAIT_FOR_ROOM;
        loop {
            // Registered before the attempt, so room that appears in between is not missed.
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.reserve(cell) {
                Ok(()) => return Ok(()),
                Err(Refused::Full(error)) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(error);
                    }
                    let _ = tokio::time::timeout(left, notified).await;
                }
                Err(Refused::TooBig(error)) => return Err(error),
            }
        }
    }

    /// Reserves `cell`'s bytes, unloading least recently used idle, unpinned cells to make
    /// room; refuses when it cannot.
    fn reserve<T: Clone + Send + Sync + 'static>(
        &self,
        cell: &Arc<Lazy<T>>,
    ) -> std::result::Result<(), Refused> {
        let terms = &cell.terms;
        // Cells upgraded while deciding what to evict are held here, declared before the
        // lock so they are dropped after it: dropping a cell's last reference releases its
        // bytes, which takes the lock.
        let mut upgraded: Vec<Arc<dyn Resident>> = Vec::new();
        let mut members = self.lock();
        if terms.reserved.load(Ordering::Acquire) {
            return Ok(());
        }
        let alone = match &terms.group {
            Some(_) => terms.cost.saturating_add(self.group_cost),
            None => terms.cost,
        };
        if alone > self.budget {
            let worker = if terms.group.is_some() && self.group_cost > 0 {
                " (with its model worker)"
            } else {
                ""
            };
            return Err(Refused::TooBig(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "{} needs {alone} bytes of memory{worker}, more than the whole {} of {} \
                     bytes",
                    terms.label, self.what, self.budget
                ),
            )));
        }
        let me = Arc::as_ptr(cell).cast::<()>();
        let mut evicted = 0;
        if members
            .bytes
            .saturating_add(members.need(terms, self.group_cost))
            > self.budget
        {
            members.cells.retain(|member| member.strong_count() > 0);
            let mut candidates: Vec<Arc<dyn Resident>> = members
                .cells
                .iter()
                .filter(|member| member.as_ptr().cast::<()>() != me)
                .filter_map(Weak::upgrade)
                .filter(|member| !member.terms().pinned)
                .collect();
            candidates.sort_by_key(|member| member.terms().last_used.load(Ordering::Relaxed));
            for candidate in &candidates {
                if members
                    .bytes
                    .saturating_add(members.need(terms, self.group_cost))
                    <= self.budget
                {
                    break;
                }
                if candidate.try_unload() {
                    let candidate_ptr = Arc::as_ptr(candidate).cast::<()>();
                    Self::remove(
                        &mut members,
                        candidate_ptr,
                        candidate.terms(),
                        self.group_cost,
                    );
                    evicted += 1;
                }
            }
            upgraded.extend(candidates);
        }
        if let Some(observer) = &self.observer {
            for _ in 0..evicted {
                observer.evicted();
            }
        }
        let need = members.need(terms, self.group_cost);
        if members.bytes.saturating_add(need) > self.budget {
            let bytes = members.bytes;
            drop(members);
            self.report(bytes);
            return Err(Refused::Full(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "{} cannot load now: the {} ({} bytes) stayed held by what is serving \
                     requests or pinned for {} s; retry shortly",
                    terms.label,
                    self.what,
                    self.budget,
                    WAIT_FOR_ROOM.as_secs()
                ),
            )));
        }
        members.bytes += need;
        let weak: Weak<dyn Resident> = Arc::downgrade(cell) as Weak<dyn Resident>;
        members.cells.push(weak);
        if let Some(group) = &terms.group {
            *members.groups.entry(group.clone()).or_default() += 1;
        }
        terms.reserved.store(true, Ordering::Release);
        let bytes = members.bytes;
        drop(members);
        self.report(bytes);
        Ok(())
    }

    /// Takes the cell at `ptr` out of the members (its bytes with it, and its group's when it
    /// was the group's last); the caller holds the lock.
    fn remove(members: &mut Members, ptr: *const (), terms: &Terms, group_cost: u64) {
        let before = members.cells.len();
        members
            .cells
            .retain(|member| member.as_ptr().cast::<()>() != ptr);
        if members.cells.len() < before {
            members.bytes = members.bytes.saturating_sub(terms.cost);
            if let Some(group) = &terms.group
                && let Some(count) = members.groups.get_mut(group)
            {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    members.groups.remove(group);
                    members.bytes = members.bytes.saturating_sub(group_cost);
                }
            }
        }
        terms.reserved.store(false, Ordering::Release);
    }

    /// Gives back a cell's reservation (a failed load, an explicit unload, a dropped cell).
    fn release(&self, ptr: *const (), terms: &Terms) {
        let mut members = self.lock();
        Self::remove(&mut members, ptr, terms, self.group_cost);
        let bytes = members.bytes;
        drop(members);
        self.report(bytes);
        self.room.notify_waiters();
    }

    /// Unloads `cell` now unless a request is using it (or it is pinned).
    fn unload<T: Clone + Send + Sync + 'static>(&self, cell: &Lazy<T>) -> Result<()> {
        let terms = &cell.terms;
        let mut members = self.lock();
        if terms.pinned {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "{} is pinned (pin = true): it is never unloaded",
                    terms.label
                ),
            ));
        }
        if !cell.try_unload() {
            if terms.in_flight.load(Ordering::SeqCst) > 0 {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!(
                        "{} is serving requests; unload it when they are done",
                        terms.label
                    ),
                ));
            }
            // Not loaded: nothing to do.
            return Ok(());
        }
        Self::remove(&mut members, cell.ptr(), terms, self.group_cost);
        let bytes = members.bytes;
        drop(members);
        if let Some(observer) = &self.observer {
            observer.evicted();
        }
        self.report(bytes);
        self.room.notify_waiters();
        Ok(())
    }
}

/// Why a reservation failed.
enum Refused {
    /// Larger than the whole budget: it can never load.
    TooBig(Error),
    /// The budget is held by cells serving requests (or pinned) now.
    Full(Error),
}

type PendingLoad<T> = Shared<BoxFuture<'static, std::result::Result<T, Error>>>;

enum State<T: Clone> {
    Unloaded,
    Loading(PendingLoad<T>),
    Loaded(T),
    Failed { error: Error, at: Instant },
}

/// What a [`Lazy`] cell is registered with.
pub struct CellSpec<T> {
    /// Names it in errors and logs (`model 'name'`, `plugin 'name'`).
    pub label: String,
    /// Bytes it holds once loaded.
    pub cost: u64,
    /// Never unloaded once loaded.
    pub pinned: bool,
    /// The group whose cost it shares while loaded (its tenant's model worker), if any.
    pub group: Option<String>,
    pub loader: Loader<T>,
}

/// A value (a loaded model, a compiled plugin) loaded on first use and unloaded when its
/// budget needs the room.
pub struct Lazy<T: Clone + Send + Sync + 'static> {
    terms: Terms,
    loader: Loader<T>,
    residency: Arc<Residency>,
    state: Mutex<State<T>>,
    me: Weak<Lazy<T>>,
}

/// A use counted in on a cell; counted out when dropped (the cell's last one makes it
/// unloadable, which a load waiting for room hears).
pub struct InUse<'a, T: Clone + Send + Sync + 'static>(&'a Lazy<T>);

impl<T: Clone + Send + Sync + 'static> Drop for InUse<'_, T> {
    fn drop(&mut self) {
        if self.0.terms.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.residency.room.notify_waiters();
        }
    }
}

impl<T: Clone + Send + Sync + 'static> Resident for Lazy<T> {
    fn terms(&self) -> &Terms {
        &self.terms
    }

    fn try_unload(&self) -> bool {
        let mut state = self.lock();
        if self.terms.in_flight.load(Ordering::SeqCst) > 0 || !matches!(*state, State::Loaded(_)) {
            return false;
        }
        let unloaded = std::mem::replace(&mut *state, State::Unloaded);
        drop(state);
        // What it held (a model's sessions and batcher, a compiled image) goes with the last
        // reference.
        drop(unloaded);
        true
    }
}

impl<T: Clone + Send + Sync + 'static> Lazy<T> {
    /// Registers a cell under `residency`; nothing is loaded.
    pub fn new(spec: CellSpec<T>, residency: Arc<Residency>) -> Arc<Self> {
        Arc::new_cyclic(|me| Lazy {
            terms: Terms {
                label: spec.label,
                cost: spec.cost,
                pinned: spec.pinned,
                group: spec.group,
                in_flight: AtomicUsize::new(0),
                last_used: AtomicU64::new(0),
                reserved: AtomicBool::new(false),
            },
            loader: spec.loader,
            residency,
            state: Mutex::new(State::Unloaded),
            me: me.clone(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        // Every transition replaces the whole state: a poisoned lock still holds a valid one.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn ptr(&self) -> *const () {
        (self as *const Self).cast::<()>()
    }

    /// Bytes it reserves when loaded.
    pub fn cost(&self) -> u64 {
        self.terms.cost
    }

    /// What it names itself in errors.
    pub fn label(&self) -> &str {
        &self.terms.label
    }

    /// Takes a value already loaded (a push loads it to prove it) as its loaded state, if the
    /// budget has room for it (making room as a load would); otherwise it stays registered
    /// and loads on its first use.
    pub fn adopt(self: &Arc<Self>, value: T) {
        if self.residency.reserve(self).is_err() {
            return;
        }
        let mut state = self.lock();
        if matches!(*state, State::Unloaded | State::Failed { .. }) {
            *state = State::Loaded(value);
        }
    }

    /// The loaded value, if it is loaded now.
    pub fn resident(&self) -> Option<T> {
        match &*self.lock() {
            State::Loaded(value) => Some(value.clone()),
            _ => None,
        }
    }

    /// Where it stands: loaded, loading, or registered (failed loads included).
    pub fn residence(&self) -> Residence {
        match &*self.lock() {
            State::Loaded(_) => Residence::Loaded,
            State::Loading(_) => Residence::Loading,
            _ => Residence::Registered,
        }
    }

    /// The error of a load that failed less than [`RETRY_FAILED_AFTER`] ago.
    pub fn recent_failure(&self) -> Option<Error> {
        match &*self.lock() {
            State::Failed { error, at } if at.elapsed() < RETRY_FAILED_AFTER => Some(error.clone()),
            _ => None,
        }
    }

    /// Unloads it now unless something is using it (or it is pinned).
    pub fn unload(&self) -> Result<()> {
        self.residency.unload(self)
    }

    /// The loaded value, loading it first if needed (one load however many callers wait).
    pub async fn ensure_loaded(&self) -> Result<T> {
        let pending = {
            let state = self.lock();
            match &*state {
                State::Loaded(value) => return Ok(value.clone()),
                State::Loading(pending) => Some(pending.clone()),
                State::Failed { error, at } if at.elapsed() < RETRY_FAILED_AFTER => {
                    return Err(error.clone());
                }
                _ => None,
            }
        };
        if let Some(pending) = pending {
            return pending.await;
        }
        let me = self.me.upgrade().ok_or_else(|| {
            Error::internal(format!("{} was dropped while in use", self.terms.label))
        })?;
        self.residency.reserve_waiting(&me).await?;
        let pending = {
            let mut state = self.lock();
            match &*state {
                State::Loaded(value) => return Ok(value.clone()),
                State::Loading(pending) => pending.clone(),
                _ => {
                    let pending = Self::start_load(me);
                    *state = State::Loading(pending.clone());
                    pending
                }
            }
        };
        pending.await
    }

    /// Starts the load in a task of its own; the returned future is shared by every waiter.
    fn start_load(me: Arc<Self>) -> PendingLoad<T> {
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let loader = Arc::clone(&me.loader);
            let loaded = match tokio::task::spawn_blocking(move || loader()).await {
                Ok(loaded) => loaded,
                Err(error) => Err(Error::internal(format!("the load stopped: {error}"))),
            };
            let loaded = loaded.map_err(|error| {
                Error::new(
                    ErrorKind::Unavailable,
                    format!("{} failed to load: {}", me.terms.label, error.message()),
                )
            });
            {
                let mut state = me.lock();
                *state = match &loaded {
                    Ok(value) => State::Loaded(value.clone()),
                    Err(error) => State::Failed {
                        error: error.clone(),
                        at: Instant::now(),
                    },
                };
            }
            if loaded.is_err() {
                me.residency.release(me.ptr(), &me.terms);
            }
            if let Some(observer) = &me.residency.observer {
                observer.loaded(started.elapsed(), loaded.is_ok());
            }
            loaded
        });
        let joined: BoxFuture<'static, std::result::Result<T, Error>> =
            Box::pin(task.map(|joined| {
                joined.unwrap_or_else(|error| {
                    Err(Error::internal(format!("the load task failed: {error}")))
                })
            }));
        joined.shared()
    }

    /// Counts a use in and loads if needed (the wait goes to the request's queue time). The
    /// cell is not unloaded while the returned guard lives.
    pub async fn enter(&self, request: &RequestContext) -> Result<(InUse<'_, T>, T)> {
        self.terms.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = InUse(self);
        self.terms
            .last_used
            .store(self.residency.now(), Ordering::Relaxed);
        // The usual case, loaded: one look at the state. Otherwise the wait is queue time.
        let value = match self.resident() {
            Some(value) => value,
            None => {
                let started = Instant::now();
                let value = self.ensure_loaded().await?;
                request.add(Spent::Queue, started.elapsed());
                value
            }
        };
        Ok((guard, value))
    }
}

impl<T: Clone + Send + Sync + 'static> Drop for Lazy<T> {
    fn drop(&mut self) {
        if self.terms.reserved.load(Ordering::Acquire) {
            self.residency.release(self.ptr(), &self.terms);
        }
    }
}

/// What to register: a model version's identity, what it reports before it loads, and how to
/// load it.
pub struct LazySpec {
    /// Names it in errors and logs (`model 'name'`).
    pub label: String,
    pub metadata: ModelMetadata,
    pub serving: ServingConfig,
    /// Bytes it holds once loaded (its file size times its instances).
    pub cost: u64,
    /// Never unloaded once loaded.
    pub pinned: bool,
    /// The group whose cost it shares while loaded (its tenant's model worker), if any.
    pub group: Option<String>,
    pub loader: LoadFn,
}

/// A model version loaded on its first request and unloaded when its budget needs the room.
pub struct LazyModel {
    metadata: ModelMetadata,
    serving: ServingConfig,
    cell: Arc<Lazy<Arc<dyn Model>>>,
}

impl LazyModel {
    /// Registers a model version under `residency`; nothing is loaded. A load that comes back
    /// with other metadata than registered is refused (the graphs and clients that validated
    /// against the registered one would be wrong).
    pub fn new(spec: LazySpec, residency: Arc<Residency>) -> Arc<LazyModel> {
        let loader: Loader<Arc<dyn Model>> = {
            let (inner, metadata, label) = (spec.loader, spec.metadata.clone(), spec.label.clone());
            Arc::new(move || {
                let model = inner()?;
                if model.metadata() == &metadata {
                    Ok(model)
                } else {
                    Err(Error::unavailable(format!(
                        "{label} loaded with other inputs or outputs than it was registered \
                         with; push it again"
                    )))
                }
            })
        };
        let cell = Lazy::new(
            CellSpec {
                label: spec.label,
                cost: spec.cost,
                pinned: spec.pinned,
                group: spec.group,
                loader,
            },
            residency,
        );
        Arc::new(LazyModel {
            metadata: spec.metadata,
            serving: spec.serving,
            cell,
        })
    }

    /// Bytes it reserves when loaded.
    pub fn cost(&self) -> u64 {
        self.cell.cost()
    }

    /// Takes a model already loaded (a push loads it to prove it) as its loaded state, if the
    /// budget has room for it (making room as a load would); otherwise it stays registered
    /// and loads on its first request.
    pub fn adopt(&self, model: Arc<dyn Model>) {
        if model.metadata() == &self.metadata {
            self.cell.adopt(model);
        }
    }
}

impl Model for LazyModel {
    fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    fn serving(&self) -> ServingConfig {
        self.serving.clone()
    }

    fn health(&self) -> std::result::Result<(), String> {
        if let Some(model) = self.cell.resident() {
            return model.health();
        }
        match self.cell.recent_failure() {
            Some(error) => Err(error.message().to_string()),
            // Registered: it loads on its first request.
            None => Ok(()),
        }
    }

    fn infer<'a>(
        &'a self,
        request: &'a RequestContext,
        inputs: Vec<NamedTensor>,
    ) -> BoxFuture<'a, Result<Vec<NamedTensor>>> {
        Box::pin(async move {
            let (_in_use, model) = self.cell.enter(request).await?;
            model.infer(request, inputs).await
        })
    }

    fn infer_with_parameters<'a>(
        &'a self,
        request: &'a RequestContext,
        inputs: Vec<NamedTensor>,
        parameters: &'a Parameters,
    ) -> BoxFuture<'a, Result<(Vec<NamedTensor>, Parameters)>> {
        Box::pin(async move {
            let (_in_use, model) = self.cell.enter(request).await?;
            model
                .infer_with_parameters(request, inputs, parameters)
                .await
        })
    }

    fn on_demand(&self) -> Option<&dyn OnDemand> {
        Some(self)
    }
}

impl OnDemand for LazyModel {
    fn residence(&self) -> Residence {
        self.cell.residence()
    }

    fn load(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { self.cell.ensure_loaded().await.map(drop) })
    }

    fn unload(&self) -> Result<()> {
        self.cell.unload()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::atomic::AtomicUsize;

    use weft_core::{DataType, TensorSpec};

    use super::*;

    fn metadata() -> ModelMetadata {
        ModelMetadata {
            platform: "fake".into(),
            inputs: vec![TensorSpec {
                name: "x".into(),
                datatype: DataType::Fp32,
                shape: vec![-1],
            }],
            outputs: vec![],
            max_batch_size: 0,
        }
    }

    /// A loaded model whose calls wait for `gate` when it is set.
    struct Fake {
        metadata: ModelMetadata,
        gate: Option<Arc<tokio::sync::Semaphore>>,
    }

    impl Model for Fake {
        fn metadata(&self) -> &ModelMetadata {
            &self.metadata
        }

        fn infer<'a>(
            &'a self,
            _: &'a RequestContext,
            inputs: Vec<NamedTensor>,
        ) -> BoxFuture<'a, Result<Vec<NamedTensor>>> {
            Box::pin(async move {
                if let Some(gate) = &self.gate {
                    let _ = gate.acquire().await;
                }
                Ok(inputs)
            })
        }
    }

    #[derive(Default)]
    struct Recorder {
        loads: AtomicUsize,
        failures: AtomicUsize,
        evictions: AtomicUsize,
    }

    impl ResidencyObserver for Recorder {
        fn loaded(&self, _: Duration, ok: bool) {
            if ok {
                self.loads.fetch_add(1, Ordering::SeqCst);
            } else {
                self.failures.fetch_add(1, Ordering::SeqCst);
            }
        }
        fn evicted(&self) {
            self.evictions.fetch_add(1, Ordering::SeqCst);
        }
        fn resident(&self, _: u64) {}
    }

    struct Setup {
        residency: Arc<Residency>,
        recorder: Arc<Recorder>,
    }

    fn setup(budget: u64) -> Setup {
        let recorder = Arc::new(Recorder::default());
        let residency = Residency::new(
            budget,
            Some(Arc::clone(&recorder) as Arc<dyn ResidencyObserver>),
        );
        Setup {
            residency,
            recorder,
        }
    }

    /// A loader of [`Fake`] models.
    fn fake_loader() -> LoadFn {
        Arc::new(|| {
            Ok(Arc::new(Fake {
                metadata: metadata(),
                gate: None,
            }) as Arc<dyn Model>)
        })
    }

    /// What registers `label` at `cost` bytes, unpinned and in no group.
    fn spec(label: &str, cost: u64, loader: LoadFn) -> LazySpec {
        LazySpec {
            label: label.into(),
            metadata: metadata(),
            serving: ServingConfig::default(),
            cost,
            pinned: false,
            group: None,
            loader,
        }
    }

    /// A model of `cost` bytes whose loads are counted in `loads` and take `delay`.
    fn model(
        setup: &Setup,
        name: &str,
        cost: u64,
        pinned: bool,
        loads: &Arc<AtomicUsize>,
        delay: Duration,
        gate: Option<Arc<tokio::sync::Semaphore>>,
    ) -> Arc<LazyModel> {
        let loads = Arc::clone(loads);
        let loader: LoadFn = Arc::new(move || {
            loads.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(delay);
            Ok(Arc::new(Fake {
                metadata: metadata(),
                gate: gate.clone(),
            }) as Arc<dyn Model>)
        });
        LazyModel::new(
            LazySpec {
                pinned,
                ..spec(name, cost, loader)
            },
            Arc::clone(&setup.residency),
        )
    }

    fn input() -> Vec<NamedTensor> {
        vec![NamedTensor::new(
            "x",
            weft_core::Tensor::new(DataType::Fp32, vec![1], bytes::Bytes::from(vec![0u8; 4]))
                .unwrap(),
        )]
    }

    async fn call(model: &LazyModel) -> Result<u64> {
        let request = RequestContext::for_tenant("acme");
        model.infer(&request, input()).await?;
        Ok(request.cost().queue_us.load(Ordering::Relaxed))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_first_requests_share_one_load_and_wait_in_queue_time() {
        let setup = setup(u64::MAX);
        let loads = Arc::new(AtomicUsize::new(0));
        let model = model(
            &setup,
            "a",
            10,
            false,
            &loads,
            Duration::from_millis(200),
            None,
        );
        assert_eq!(model.residence(), Residence::Registered);
        assert!(model.health().is_ok(), "registered counts as ready");
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let model = Arc::clone(&model);
                tokio::spawn(async move { call(&model).await })
            })
            .collect();
        for call in calls {
            let queued = call.await.unwrap().unwrap();
            assert!(
                queued >= 150_000,
                "the load's wait is queue time: {queued} us"
            );
        }
        assert_eq!(
            loads.load(Ordering::SeqCst),
            1,
            "one load for eight callers"
        );
        assert_eq!(model.residence(), Residence::Loaded);
        assert_eq!(
            call(&model).await.unwrap(),
            0,
            "a loaded model adds no wait"
        );
        assert_eq!(setup.residency.resident_bytes(), 10);
        assert_eq!(setup.recorder.loads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn the_least_recently_used_idle_model_makes_room() {
        let setup = setup(20);
        let loads = Arc::new(AtomicUsize::new(0));
        let [a, b, c] = ["a", "b", "c"]
            .map(|name| model(&setup, name, 10, false, &loads, Duration::ZERO, None));
        call(&a).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        call(&b).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        call(&c).await.unwrap();
        assert_eq!(
            a.residence(),
            Residence::Registered,
            "a was used least recently"
        );
        assert_eq!(b.residence(), Residence::Loaded);
        assert_eq!(setup.residency.resident_bytes(), 20);
        // a comes back (b is now the oldest) and answers as before.
        tokio::time::sleep(Duration::from_millis(5)).await;
        call(&a).await.unwrap();
        assert_eq!(b.residence(), Residence::Registered);
        assert_eq!(loads.load(Ordering::SeqCst), 4);
        assert_eq!(setup.recorder.evictions.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_model_serving_a_request_is_never_unloaded() {
        let setup = setup(10);
        let loads = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let busy = model(
            &setup,
            "busy",
            10,
            false,
            &loads,
            Duration::ZERO,
            Some(Arc::clone(&gate)),
        );
        let other = model(&setup, "other", 10, false, &loads, Duration::ZERO, None);
        let held = {
            let busy = Arc::clone(&busy);
            tokio::spawn(async move { call(&busy).await })
        };
        while busy.residence() != Residence::Loaded {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The other model's load waits for room instead of unloading the busy one...
        let waiting = {
            let other = Arc::clone(&other);
            tokio::spawn(async move { call(&other).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !waiting.is_finished(),
            "it waits while the budget is in use"
        );
        assert_eq!(busy.residence(), Residence::Loaded);
        let unload = busy.unload().unwrap_err();
        assert_eq!(unload.kind(), ErrorKind::Conflict);
        // ...and loads as soon as the busy model's request ends, the wait in its queue time.
        gate.add_permits(1);
        held.await.unwrap().unwrap();
        let queued = waiting.await.unwrap().unwrap();
        assert!(queued >= 100_000, "{queued} us");
        assert_eq!(busy.residence(), Residence::Registered);
        assert_eq!(other.residence(), Residence::Loaded);
    }

    #[tokio::test]
    async fn pinned_models_stay_and_too_big_ones_are_refused() {
        let setup = setup(20);
        let loads = Arc::new(AtomicUsize::new(0));
        let pinned = model(&setup, "pinned", 10, true, &loads, Duration::ZERO, None);
        let b = model(&setup, "b", 10, false, &loads, Duration::ZERO, None);
        let c = model(&setup, "c", 10, false, &loads, Duration::ZERO, None);
        call(&pinned).await.unwrap();
        call(&b).await.unwrap();
        call(&c).await.unwrap();
        assert_eq!(pinned.residence(), Residence::Loaded);
        assert_eq!(b.residence(), Residence::Registered);
        assert_eq!(pinned.unload().unwrap_err().kind(), ErrorKind::Conflict);
        let huge = model(&setup, "huge", 21, false, &loads, Duration::ZERO, None);
        let refused = call(&huge).await.unwrap_err();
        assert!(
            refused
                .message()
                .contains("more than the whole model memory budget"),
            "{refused}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_load_answers_its_waiters_once_and_frees_its_bytes() {
        let setup = setup(100);
        let attempts = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&attempts);
        let loader: LoadFn = Arc::new(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(50));
            Err(Error::invalid("not an ONNX model"))
        });
        let failing = LazyModel::new(
            spec("acme/broken version 1", 10, loader),
            Arc::clone(&setup.residency),
        );
        let calls: Vec<_> = (0..4)
            .map(|_| {
                let failing = Arc::clone(&failing);
                tokio::spawn(async move { call(&failing).await })
            })
            .collect();
        for call in calls {
            let error = call.await.unwrap().unwrap_err();
            assert_eq!(error.kind(), ErrorKind::Unavailable);
            assert!(
                error
                    .message()
                    .contains("acme/broken version 1 failed to load: not an ONNX model"),
                "{error}"
            );
        }
        // Within the retry window the error answers without another attempt.
        assert!(call(&failing).await.is_err());
        assert_eq!(attempts.load(Ordering::SeqCst), 1);
        assert!(failing.health().is_err());
        assert_eq!(setup.residency.resident_bytes(), 0);
        assert_eq!(setup.recorder.failures.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_group_costs_its_share_while_any_of_its_models_is_loaded() {
        let residency = Residency::with_group_cost(100, 40, None);
        let grouped = |name: &str, group: &str, cost: u64| {
            LazyModel::new(
                LazySpec {
                    group: Some(group.into()),
                    ..spec(name, cost, fake_loader())
                },
                Arc::clone(&residency),
            )
        };
        let (a1, a2, b1) = (
            grouped("a1", "a", 10),
            grouped("a2", "a", 10),
            grouped("b1", "b", 10),
        );
        call(&a1).await.unwrap();
        assert_eq!(
            residency.resident_bytes(),
            50,
            "the first model brings its group's cost"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
        call(&a2).await.unwrap();
        assert_eq!(residency.resident_bytes(), 60, "the second shares it");
        tokio::time::sleep(Duration::from_millis(5)).await;
        // b1 needs 50 (its group is new): a1, the oldest, makes room; group a stays for a2.
        call(&b1).await.unwrap();
        assert_eq!(a1.residence(), Residence::Registered);
        assert_eq!(residency.resident_bytes(), 100);
        a2.unload().unwrap();
        assert_eq!(
            residency.resident_bytes(),
            50,
            "group a's last model takes its cost along"
        );
        let too_big = grouped("c", "c", 70);
        let error = call(&too_big).await.unwrap_err();
        assert!(error.message().contains("with its model worker"), "{error}");
    }

    #[tokio::test]
    async fn explicit_load_unload_and_a_dropped_model_give_back_their_bytes() {
        let setup = setup(100);
        let loads = Arc::new(AtomicUsize::new(0));
        let a = model(&setup, "a", 30, false, &loads, Duration::ZERO, None);
        a.load().await.unwrap();
        assert_eq!(a.residence(), Residence::Loaded);
        assert_eq!(setup.residency.resident_bytes(), 30);
        a.unload().unwrap();
        assert_eq!(a.residence(), Residence::Registered);
        assert_eq!(setup.residency.resident_bytes(), 0);
        a.unload().unwrap();
        call(&a).await.unwrap();
        assert_eq!(setup.residency.resident_bytes(), 30);
        drop(a);
        assert_eq!(
            setup.residency.resident_bytes(),
            0,
            "a deleted version frees its bytes"
        );
    }

    #[tokio::test]
    async fn a_model_that_loads_with_other_metadata_is_refused() {
        let setup = setup(100);
        let other = LazyModel::new(
            LazySpec {
                metadata: ModelMetadata {
                    max_batch_size: 8,
                    ..metadata()
                },
                ..spec("acme/m version 2", 1, fake_loader())
            },
            Arc::clone(&setup.residency),
        );
        let error = call(&other).await.unwrap_err();
        assert!(
            error.message().contains("other inputs or outputs"),
            "{error}"
        );
    }
}
