//! Rollouts as a tenant's resource: the record in the store (its TOML, phase, step and decision
//! log), its arms resolved in the tenant's own namespace, the live routing state that outlives
//! scope rebuilds, and the controller that judges each canary's window and commits what it
//! decides.
//!
//! Every replica judges the traffic it served itself, on a [`CONTROL_INTERVAL`] tick. A failing
//! window sets the candidate's share to 0 % on this replica at once, before anything is
//! written; the decision is then committed (compare-and-set on the rollout's generation, phase
//! and step, so two replicas deciding together commit once), and the other replicas apply it as
//! soon as the store tells them (PostgreSQL `NOTIFY`, [`crate::follow_shared_store`]). Weights
//! follow the committed record at every scope build, so a restart resumes where the rollout
//! stood, and sticky tickets depend only on the rollout's name and the client's key, so a
//! restart never moves a client to another arm.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use weft_core::{Error, Model, Result};
use weft_engine::rollout::window::bucket_upper_ms;
use weft_engine::rollout::{
    Action, ArmSpec, Counts, RolloutArm, RolloutKind, RolloutLive, RolloutModel, RolloutSpec,
    judge, next_action,
};
use weft_engine::{ModelRegistry, ModelState};
use weft_store::{
    RolloutEvent, RolloutPhase, RolloutRecord, State, Tenant, check_name, unix_now, unix_now_ms,
};

use crate::backends::SandboxPlugin;
use crate::graphs::{ScopeCatalog, ScopeRunner, load_graph};
use crate::lifecycle::{graph_path, tenant_mut, tenant_of};
use crate::scope::{TenantScope, plugin_notes};
use crate::tenancy::{LoadedPluginKey, Tenancy, lock};

/// Most rollouts one tenant keeps (every phase counts, until deleted).
pub const MAX_ROLLOUTS: usize = 16;

/// Most mirrored calls in flight for one tenant, all its rollouts together (each rollout's
/// own `shadow_max_in_flight` bounds it further). Past it, mirrors are dropped and counted.
pub const MAX_TENANT_SHADOW: usize = 64;

/// How often the controller judges every canary's window.
pub const CONTROL_INTERVAL: Duration = Duration::from_millis(100);

/// (tenant, rollout name).
pub(crate) type RolloutKey = (String, String);

/// What the routing state was last set from: a change of any of these resets the weights.
#[derive(Clone, Debug, PartialEq)]
struct Applied {
    phase: RolloutPhase,
    step: usize,
    winner: Option<String>,
    /// The tenant's revision of the record these came from: an older record never overwrites
    /// a newer one (a status read racing a rebuild).
    revision: u64,
}

/// One rollout generation's live state on this replica.
pub(crate) struct LiveRollout {
    generation: u64,
    live: Arc<RolloutLive>,
    applied: Mutex<Option<Applied>>,
    /// Decisions this replica committed, by action, for `weft_rollout_decisions_total`.
    decisions: Mutex<BTreeMap<String, u64>>,
}

/// A plugin version a rollout pins: its metrics label, the compiled plugin and its cache key.
pub(crate) struct PinnedPlugin {
    pub(crate) label: String,
    pub(crate) plugin: Arc<dyn SandboxPlugin>,
    pub(crate) key: LoadedPluginKey,
}

/// One rollout as `/metrics` reports it.
pub struct RolloutMetrics {
    pub tenant: String,
    pub name: String,
    pub phase: RolloutPhase,
    pub arms: Vec<weft_engine::rollout::ArmReport>,
    /// Mirrored calls sent and dropped.
    pub shadow: (u64, u64),
    /// Decisions this replica committed, by action.
    pub decisions: BTreeMap<String, u64>,
}

/// A rollout file's name in messages.
fn rollout_path(name: &str) -> String {
    format!("rollouts/{name}.toml")
}

/// The weights a record asks for, set on `live`. A new step is judged on its own traffic.
/// `revision` is the tenant's revision the record was read at; a record older than the one
/// already applied is ignored.
fn follow_record(live: &LiveRollout, record: &RolloutRecord, revision: u64) {
    let spec = live.live.spec();
    let Ok(mut applied) = lock(&live.applied) else {
        return;
    };
    if applied
        .as_ref()
        .is_some_and(|before| before.revision > revision)
    {
        return;
    }
    let wanted = Applied {
        phase: record.phase,
        step: record.step,
        winner: record.winner.clone(),
        revision,
    };
    let unchanged = applied.as_ref().is_some_and(|before| {
        (&before.phase, before.step, &before.winner) == (&wanted.phase, wanted.step, &wanted.winner)
    });
    if unchanged {
        *applied = Some(wanted);
        return;
    }
    let new_step = applied
        .as_ref()
        .is_some_and(|before| before.step != wanted.step);
    match record.phase {
        RolloutPhase::Progressing => {
            let step = spec.steps.get(record.step);
            live.live.set_canary(
                step.map_or(0.0, |step| step.weight),
                step.map_or(0.0, |step| step.shadow),
            );
            live.live.set_winner(None);
        }
        RolloutPhase::Promoted => {
            live.live.set_canary(100.0, 0.0);
            live.live.set_winner(Some(1));
        }
        RolloutPhase::RolledBack | RolloutPhase::Aborted => {
            live.live.set_canary(0.0, 0.0);
            live.live.set_winner(Some(0));
        }
        RolloutPhase::Running => live.live.set_winner(None),
        RolloutPhase::Concluded => live.live.set_winner(Some(winner_index(spec, record))),
    }
    if new_step {
        live.live.clear_recent();
    }
    *applied = Some(wanted);
}

impl Tenancy {
    /// The live state of a rollout generation: the one this replica already has, or a new one.
    fn live_rollout(
        &self,
        tenant: &str,
        name: &str,
        generation: u64,
        spec: &Arc<RolloutSpec>,
    ) -> Result<Arc<LiveRollout>> {
        let mut rollouts = lock(&self.rollouts)?;
        let key = (tenant.to_string(), name.to_string());
        if let Some(live) = rollouts.get(&key)
            && live.generation == generation
        {
            return Ok(Arc::clone(live));
        }
        let slots = Arc::clone(
            lock(&self.shadow_slots)?
                .entry(tenant.to_string())
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(MAX_TENANT_SHADOW))),
        );
        let live = Arc::new(LiveRollout {
            generation,
            live: RolloutLive::with_tenant_slots(Arc::clone(spec), slots),
            applied: Mutex::new(None),
            decisions: Mutex::default(),
        });
        rollouts.insert(key, Arc::clone(&live));
        Ok(live)
    }

    /// Forgets the live state of rollouts no longer stored (or replaced by a new generation).
    pub(crate) fn forget_rollouts(&self, state: &State) -> Result<()> {
        lock(&self.rollouts)?.retain(|(tenant, name), live| {
            state
                .tenants
                .get(tenant)
                .and_then(|tenant| tenant.rollouts.get(name))
                .is_some_and(|record| record.generation == live.generation)
        });
        Ok(())
    }

    /// Serves the tenant's rollouts in `registry`: each target's unversioned calls go through
    /// its rollout. Arms resolve in `registry` as it is before any rollout is added. A rollout
    /// that cannot be built leaves its target as it was (or, for a name nothing else serves,
    /// UNAVAILABLE with the reason). Returns the plugin versions the rollouts pin.
    pub(crate) fn serve_rollouts(
        &self,
        tenant: &Tenant,
        scope: &TenantScope,
        registry: &mut ModelRegistry,
    ) -> Vec<PinnedPlugin> {
        let arms_from = registry.clone();
        let mut pinned = Vec::new();
        for (name, record) in &tenant.rollouts {
            let spec = match self.rollout_spec(&tenant.name, name, record) {
                Ok(spec) => spec,
                Err(error) => {
                    tracing::error!(tenant = %tenant.name, rollout = %name, %error, "rollout not served");
                    continue;
                }
            };
            let built = self.build_rollout(
                tenant,
                scope,
                &arms_from,
                (name, record),
                &spec,
                &mut pinned,
            );
            match built {
                Ok((version, model)) => {
                    registry.set_route(&spec.target, version, ModelState::Ready(model))
                }
                Err(error) => {
                    tracing::error!(tenant = %tenant.name, rollout = %name, %error, "rollout not served");
                    if registry.versions(&spec.target).is_none() {
                        registry.set_route(
                            &spec.target,
                            0,
                            ModelState::Unavailable(format!("rollout '{name}': {error}")),
                        );
                    }
                }
            }
        }
        pinned
    }

    /// A rollout's parsed file: the one its live state already holds for this generation
    /// (parsed once per generation, not at every rebuild), or parsed now.
    fn rollout_spec(
        &self,
        tenant: &str,
        name: &str,
        record: &RolloutRecord,
    ) -> Result<Arc<RolloutSpec>> {
        let held = lock(&self.rollouts)?
            .get(&(tenant.to_string(), name.to_string()))
            .filter(|live| live.generation == record.generation)
            .map(|live| Arc::clone(live.live.spec()));
        match held {
            Some(spec) => Ok(spec),
            None => Ok(Arc::new(RolloutSpec::parse(
                &rollout_path(name),
                &record.toml,
            )?)),
        }
    }

    /// One rollout (`name` and its record), built: the version it reports (the stable's, or
    /// the first arm's) and the routing model, with its live state following the record.
    fn build_rollout(
        &self,
        tenant: &Tenant,
        scope: &TenantScope,
        registry: &ModelRegistry,
        (name, record): (&str, &RolloutRecord),
        spec: &Arc<RolloutSpec>,
        pinned: &mut Vec<PinnedPlugin>,
    ) -> Result<(u64, Arc<dyn Model>)> {
        let arms = self.rollout_arms(tenant, scope, registry, spec, pinned)?;
        let live = self.live_rollout(&tenant.name, name, record.generation, spec)?;
        let version = arms.first().map_or(0, |arm| arm.version);
        let model = RolloutModel::new(Arc::clone(&live.live), arms)?;
        follow_record(&live, record, tenant.revision);
        Ok((version, Arc::new(model)))
    }

    /// The arms of `spec`, in its order, resolved in the tenant's namespace; the plugin
    /// versions they pin are added to `pinned`.
    fn rollout_arms(
        &self,
        tenant: &Tenant,
        scope: &TenantScope,
        registry: &ModelRegistry,
        spec: &RolloutSpec,
        pinned: &mut Vec<PinnedPlugin>,
    ) -> Result<Vec<RolloutArm>> {
        let names = spec.arm_names();
        let mut arms = Vec::new();
        for (arm, arm_name) in spec.all_arms().zip(names) {
            let model = match (&arm.plugin, &arm.plugin_version) {
                (Some(plugin), Some(version)) => {
                    self.graph_with_plugin(tenant, scope, arm, (plugin, version), pinned)?
                }
                _ => {
                    let version = arm.version.to_string();
                    let (_, model) = registry
                        .resolve(arm.served_name(), Some(&version))
                        .map_err(|error| {
                            error.context(format!("arm '{arm_name}' ({})", arm.describe()))
                        })?;
                    if registry.is_graph(arm.served_name()) != arm.is_graph() {
                        let is = if arm.is_graph() { "a model" } else { "a graph" };
                        return Err(Error::invalid(format!(
                            "arm '{arm_name}': '{}' is {is}; name it with {} = ",
                            arm.served_name(),
                            if arm.is_graph() { "model" } else { "graph" }
                        )));
                    }
                    model
                }
            };
            arms.push(RolloutArm {
                name: arm_name,
                version: arm.version,
                model,
            });
        }
        Ok(arms)
    }

    /// A graph version of the tenant built with one plugin at another version than its
    /// current one (a canary of a plugin inside a graph); the pinned plugin goes to `pinned`.
    fn graph_with_plugin(
        &self,
        tenant: &Tenant,
        scope: &TenantScope,
        arm: &ArmSpec,
        (plugin, version): (&str, &str),
        pinned: &mut Vec<PinnedPlugin>,
    ) -> Result<Arc<dyn Model>> {
        let graph = arm.served_name();
        let record = tenant
            .graphs
            .get(graph)
            .and_then(|versions| versions.get(&arm.version))
            .ok_or_else(|| {
                Error::not_found(format!(
                    "unknown version {} of graph '{graph}'",
                    arm.version
                ))
            })?;
        let stored = plugin_version(tenant, plugin, version).ok_or_else(|| {
            Error::not_found(format!("unknown version '{version}' of plugin '{plugin}'"))
        })?;
        let loaded = self.tenant_plugin(tenant, plugin, stored)?;
        let mut plugins = scope.plugins.clone();
        plugins.insert(plugin.to_string(), Ok(Arc::clone(&loaded)));
        let noted = plugin_notes(&tenant.name, plugin, stored);
        pinned.push(PinnedPlugin {
            label: noted.label.clone().unwrap_or_default(),
            plugin: Arc::clone(&loaded),
            key: (
                tenant.name.clone(),
                plugin.to_string(),
                stored.digest.clone(),
            ),
        });
        let notes = HashMap::from([(plugin.to_string(), noted)]);
        let runner = Arc::new(
            ScopeRunner::new(
                Arc::clone(&scope.models),
                &plugins,
                scope.limits,
                Arc::clone(&self.observer),
            )
            .with_notes(notes),
        );
        let catalog = ScopeCatalog {
            models: &scope.models,
            plugins: &plugins,
            ..scope.catalog()
        };
        let text = String::from_utf8(self.store.read_blob(&record.toml_digest)?)
            .map_err(|_| Error::invalid("the stored graph is not UTF-8"))?;
        let observer = self.observer.graph_observer(Some(&tenant.name));
        let (_, _, model) = load_graph(&graph_path(graph), &text, &catalog, &runner, observer)
            .map_err(|failure| failure.error)?;
        Ok(model)
    }

    /// Compiles the plugin versions `pins` names that `tenant` stores, into the cache the
    /// scope build reads: the slow part, done before the writer lock is taken.
    pub(crate) fn preload_pinned(&self, tenant: &Tenant, pins: &[(String, String)]) {
        for (plugin, version) in pins {
            if let Some(record) = plugin_version(tenant, plugin, version) {
                let _ = self.tenant_plugin(tenant, plugin, record);
            }
        }
    }

    /// Every (plugin, version) a rollout of `tenant` pins, so their compiled plugins stay
    /// cached although they are not the current versions.
    pub(crate) fn pinned_plugins(tenant: &Tenant) -> Vec<(String, String)> {
        tenant
            .rollouts
            .iter()
            .filter_map(|(name, record)| RolloutSpec::parse(&rollout_path(name), &record.toml).ok())
            .flat_map(|spec| {
                spec.all_arms()
                    .filter_map(|arm| Some((arm.plugin.clone()?, arm.plugin_version.clone()?)))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    // ---- the resource ----

    /// Applies a rollout (`PUT /api/v1/rollouts/{name}`): validated, its arms resolved in the
    /// tenant's namespace, then stored. The same text again changes nothing; a new text starts
    /// a new generation at the first step. Returns the rollout's view and whether it changed.
    /// Blocking.
    pub fn apply_rollout(&self, tenant: &str, name: &str, text: &str) -> Result<(Value, bool)> {
        check_name("rollout", name)?;
        let spec = RolloutSpec::parse(&rollout_path(name), text)?;
        if spec.name != name {
            return Err(Error::invalid(format!(
                "{}: the file names rollout '{}', but it is applied as '{name}'",
                rollout_path(name),
                spec.name
            )));
        }
        // Pinned plugin versions compile before the writer lock: other tenants' changes and
        // the controller's decisions never wait on a compile.
        let pins: Vec<(String, String)> = spec
            .all_arms()
            .filter_map(|arm| Some((arm.plugin.clone()?, arm.plugin_version.clone()?)))
            .collect();
        if let Ok(record) = tenant_of(&self.store.state(), tenant) {
            self.preload_pinned(record, &pins);
        }
        let writer = self.writer()?;
        let state = writer.state();
        let record = tenant_of(&state, tenant)?;
        if let Some(existing) = record.rollouts.get(name)
            && existing.toml == text
        {
            return Ok((self.rollout_view(record, name, existing), false));
        }
        if !record.rollouts.contains_key(name) && record.rollouts.len() >= MAX_ROLLOUTS {
            return Err(Error::new(
                weft_core::ErrorKind::PermissionDenied,
                format!(
                    "tenant '{tenant}' has {MAX_ROLLOUTS} rollouts, the most it may keep: delete \
                     a finished one first"
                ),
            ));
        }
        for (other, existing) in &record.rollouts {
            if other != name
                && RolloutSpec::parse(&rollout_path(other), &existing.toml)
                    .is_ok_and(|other| other.target == spec.target)
            {
                return Err(Error::conflict(format!(
                    "rollout '{other}' already serves '{}'; one rollout per name clients call",
                    spec.target
                )));
            }
        }
        let scope = writer
            .scope(tenant)
            .ok_or_else(|| Error::not_found(format!("unknown tenant '{tenant}'")))?;
        // The arms must serve now, with the same tensors, exactly as the scope will build them
        // (arms name exact versions, which no rollout's route takes over).
        let arms = self.rollout_arms(record, &scope, &scope.registry, &spec, &mut Vec::new())?;
        for arm in &arms {
            arm.model.health().map_err(|reason| {
                Error::unavailable(format!("arm '{}' is not ready: {reason}", arm.name))
            })?;
        }
        RolloutModel::new(RolloutLive::new(Arc::new(spec.clone())), arms)?;
        let now = unix_now_ms();
        let previous_generation = record.rollouts.get(name).map_or(0, |r| r.generation);
        let phase = match spec.kind {
            RolloutKind::Canary => RolloutPhase::Progressing,
            RolloutKind::Experiment => RolloutPhase::Running,
        };
        let mut stored = RolloutRecord {
            toml: text.to_string(),
            generation: now.max(previous_generation + 1),
            phase,
            step: 0,
            step_started_unix_ms: now,
            winner: None,
            created_unix: unix_now(),
            events: Vec::new(),
        };
        stored.record(RolloutEvent {
            unix_ms: now,
            action: "applied".into(),
            step: 0,
            reason: if previous_generation == 0 {
                "applied".into()
            } else {
                "a new version of the rollout was applied; it starts again at the first step".into()
            },
            evidence: Value::Null,
            replica: self.replica_id.clone(),
        });
        let view = {
            let kept = stored.clone();
            writer.commit(Some(tenant), |state| {
                tenant_mut(state, tenant)?
                    .rollouts
                    .insert(name.to_string(), kept);
                Ok(())
            })?;
            let state = self.store.state();
            let record = tenant_of(&state, tenant)?;
            self.rollout_view(record, name, &stored)
        };
        Ok((view, true))
    }

    /// The tenant's rollouts, each as [`Tenancy::rollout`] shows it.
    pub fn list_rollouts(&self, tenant: &str) -> Result<Value> {
        let state = self.store.state();
        let record = tenant_of(&state, tenant)?;
        let views: Vec<Value> = record
            .rollouts
            .iter()
            .map(|(name, rollout)| self.rollout_view(record, name, rollout))
            .collect();
        Ok(json!({ "rollouts": views }))
    }

    /// One rollout: its record, decisions and what each arm served on this replica.
    pub fn rollout(&self, tenant: &str, name: &str) -> Result<Value> {
        let state = self.store.state();
        let record = tenant_of(&state, tenant)?;
        let rollout = record
            .rollouts
            .get(name)
            .ok_or_else(|| unknown_rollout(name))?;
        Ok(self.rollout_view(record, name, rollout))
    }

    /// Ends a rollout by hand: a canary's candidate takes all traffic; an experiment's `arm`
    /// does (required for an experiment). Blocking.
    pub fn promote_rollout(&self, tenant: &str, name: &str, arm: Option<&str>) -> Result<Value> {
        self.end_rollout(tenant, name, End::Promote(arm.map(str::to_owned)))
    }

    /// Stops a rollout by hand: a canary's stable takes all traffic again, an experiment's
    /// first arm does. Blocking.
    pub fn abort_rollout(&self, tenant: &str, name: &str) -> Result<Value> {
        self.end_rollout(tenant, name, End::Abort)
    }

    /// Deletes a rollout; its target serves as it did before. Blocking.
    pub fn delete_rollout(&self, tenant: &str, name: &str) -> Result<()> {
        let writer = self.writer()?;
        let state = writer.state();
        let record = tenant_of(&state, tenant)?;
        let rollout = record
            .rollouts
            .get(name)
            .ok_or_else(|| unknown_rollout(name))?;
        if let Ok(spec) = RolloutSpec::parse(&rollout_path(name), &rollout.toml)
            && matches!(
                rollout.phase,
                RolloutPhase::RolledBack | RolloutPhase::Aborted
            )
            && let Some(candidate) = &spec.candidate
            && falls_to(record, &spec.target, candidate)
        {
            return Err(Error::conflict(format!(
                "deleting rollout '{name}' would send the calls of '{}' to the candidate it \
                 rolled back ({}), which is what '{}' serves without a rollout: delete that \
                 version first, or keep the rollout",
                spec.target,
                candidate.describe(),
                spec.target
            )));
        }
        writer.commit(Some(tenant), |state| {
            tenant_mut(state, tenant)?.rollouts.remove(name);
            Ok(())
        })
    }

    fn end_rollout(&self, tenant: &str, name: &str, end: End) -> Result<Value> {
        let writer = self.writer()?;
        let state = writer.state();
        let record = tenant_of(&state, tenant)?;
        let rollout = record
            .rollouts
            .get(name)
            .ok_or_else(|| unknown_rollout(name))?;
        let spec = RolloutSpec::parse(&rollout_path(name), &rollout.toml)?;
        let (phase, winner, action) = match (&end, spec.kind) {
            (End::Promote(Some(_)), RolloutKind::Canary) => {
                return Err(Error::invalid(
                    "a canary is promoted to its candidate; arm= is for experiments",
                ));
            }
            (End::Promote(None), RolloutKind::Canary) => (RolloutPhase::Promoted, None, "promoted"),
            (End::Promote(None), RolloutKind::Experiment) => {
                return Err(Error::invalid(format!(
                    "name the winning arm of experiment '{name}' (one of {}): promote ?arm=NAME",
                    spec.arm_names().join(", ")
                )));
            }
            (End::Promote(Some(arm)), RolloutKind::Experiment) => {
                if !spec.arm_names().contains(arm) {
                    return Err(Error::invalid(format!(
                        "experiment '{name}' has no arm '{arm}'; its arms are {}",
                        spec.arm_names().join(", ")
                    )));
                }
                (RolloutPhase::Concluded, Some(arm.clone()), "concluded")
            }
            (End::Abort, _) => (RolloutPhase::Aborted, None, "aborted"),
        };
        if rollout.phase == phase && rollout.winner == winner {
            // Already so: nothing to write (and nothing for the other replicas to rebuild).
            drop(writer);
            return self.rollout(tenant, name);
        }
        let generation = rollout.generation;
        let (from_phase, step) = (rollout.phase, rollout.step);
        let replica = self.replica_id.clone();
        let reason = match &winner {
            Some(arm) => format!("arm '{arm}' chosen by hand"),
            None => format!("{action} by hand"),
        };
        writer.commit(Some(tenant), |state| {
            let rollout = tenant_mut(state, tenant)?
                .rollouts
                .get_mut(name)
                .filter(|rollout| rollout.generation == generation && rollout.phase == from_phase)
                .ok_or_else(|| {
                    Error::conflict(format!(
                        "rollout '{name}' changed meanwhile (another replica decided); look again"
                    ))
                })?;
            rollout.phase = phase;
            rollout.winner = winner;
            rollout.record(RolloutEvent {
                unix_ms: unix_now_ms(),
                action: action.into(),
                step,
                reason,
                evidence: Value::Null,
                replica,
            });
            Ok(())
        })?;
        self.count_decision(tenant, name, action);
        drop(writer);
        self.rollout(tenant, name)
    }

    fn count_decision(&self, tenant: &str, name: &str, action: &str) {
        let live = lock(&self.rollouts).ok().and_then(|rollouts| {
            rollouts
                .get(&(tenant.to_string(), name.to_string()))
                .cloned()
        });
        if let Some(live) = live
            && let Ok(mut decisions) = lock(&live.decisions)
        {
            *decisions.entry(action.to_string()).or_default() += 1;
        }
    }

    /// A rollout as the API shows it: the record, the weights now, each arm's numbers on this
    /// replica and, for a progressing canary, how its window is judged now.
    fn rollout_view(&self, tenant: &Tenant, name: &str, record: &RolloutRecord) -> Value {
        let spec = RolloutSpec::parse(&rollout_path(name), &record.toml).ok();
        let live = lock(&self.rollouts).ok().and_then(|rollouts| {
            rollouts
                .get(&(tenant.name.clone(), name.to_string()))
                .filter(|live| live.generation == record.generation)
                .cloned()
        });
        // The committed record leads: the rebuild that follows a commit sets the same weights.
        if let Some(live) = &live {
            follow_record(live, record, tenant.revision);
        }
        let now = Instant::now();
        let arms: Vec<Value> = live
            .as_ref()
            .map(|live| live.live.report(now).iter().map(arm_view).collect())
            .unwrap_or_default();
        let analysis = match (&live, &spec) {
            (Some(live), Some(spec))
                if spec.kind == RolloutKind::Canary && record.phase.is_active() =>
            {
                let (stable, candidate) = live.live.canary_window(now);
                let (verdict, evidence) = judge(&spec.analysis, &stable, &candidate);
                json!({ "verdict": format!("{verdict:?}"), "evidence": evidence })
            }
            _ => Value::Null,
        };
        json!({
            "name": name,
            "target": spec.as_ref().map(|spec| spec.target.clone()),
            "kind": spec.as_ref().map(|spec| match spec.kind {
                RolloutKind::Canary => "canary",
                RolloutKind::Experiment => "experiment",
            }),
            "phase": record.phase,
            "generation": record.generation,
            "step": record.step,
            "steps": spec.as_ref().map_or(0, |spec| spec.steps.len()),
            "step_started_unix_ms": record.step_started_unix_ms,
            "winner": record.winner,
            "served": live.is_some(),
            "weights": live.as_ref().map(|live| {
                live.live.spec().arm_names().into_iter().zip(live.live.weights_percent())
                    .map(|(arm, weight)| (arm, json!(weight)))
                    .collect::<serde_json::Map<String, Value>>()
            }),
            "shadow_percent": live.as_ref().map(|live| live.live.shadow_weight()),
            "shadow": live.as_ref().map(|live| {
                let (sent, dropped) = live.live.shadow_counts();
                json!({ "sent": sent, "dropped": dropped })
            }),
            "arms": arms,
            "analysis": analysis,
            "events": record.events,
            "toml": record.toml,
            "created_unix": record.created_unix,
        })
    }

    /// Every rollout this replica serves, for `/metrics`.
    pub fn rollout_metrics(&self) -> Vec<RolloutMetrics> {
        let Ok(rollouts) = lock(&self.rollouts) else {
            return Vec::new();
        };
        let state = self.store.state();
        let now = Instant::now();
        rollouts
            .iter()
            .filter_map(|((tenant, name), live)| {
                let record = state.tenants.get(tenant)?.rollouts.get(name)?;
                Some(RolloutMetrics {
                    tenant: tenant.clone(),
                    name: name.clone(),
                    phase: record.phase,
                    arms: live.live.report(now),
                    shadow: live.live.shadow_counts(),
                    decisions: lock(&live.decisions)
                        .map(|decisions| decisions.clone())
                        .unwrap_or_default(),
                })
            })
            .collect()
    }

    /// Which rollout of `tenant` still needs `name` (a model, graph or plugin) at `version`
    /// (`None`: any version), so that it cannot be deleted from under it.
    pub(crate) fn rollout_using(
        tenant: &Tenant,
        name: &str,
        plugin: bool,
        version: Option<&str>,
    ) -> Option<String> {
        tenant.rollouts.iter().find_map(|(rollout, record)| {
            let spec = RolloutSpec::parse(&rollout_path(rollout), &record.toml).ok()?;
            let serving = serving_arms(&spec, record);
            spec.all_arms()
                .enumerate()
                .filter(|(index, _)| serving.contains(index))
                .any(|(_, arm)| {
                    if plugin {
                        arm.plugin.as_deref() == Some(name)
                            && version.is_none_or(|v| arm.plugin_version.as_deref() == Some(v))
                    } else {
                        arm.served_name() == name
                            && version.is_none_or(|v| v == arm.version.to_string())
                    }
                })
                .then(|| rollout.clone())
        })
    }

    // ---- the controller ----

    /// Judges every progressing canary this replica serves and commits what it decides.
    /// Every rollback takes effect here, for all of them, before anything is written; then
    /// the decisions are committed one by one. Returns the decisions committed. Blocking.
    pub fn control_rollouts(&self) -> Vec<(String, String, String)> {
        let lives: Vec<(RolloutKey, Arc<LiveRollout>)> = match lock(&self.rollouts) {
            Ok(rollouts) => rollouts
                .iter()
                .map(|(key, live)| (key.clone(), Arc::clone(live)))
                .collect(),
            Err(_) => return Vec::new(),
        };
        let state = self.store.state();
        let now = Instant::now();
        let now_ms = unix_now_ms();
        let mut decided = Vec::new();
        for ((tenant, name), live) in lives {
            let Some(record) = state
                .tenants
                .get(&tenant)
                .and_then(|t| t.rollouts.get(&name))
                .filter(|record| {
                    record.generation == live.generation
                        && record.phase == RolloutPhase::Progressing
                })
            else {
                continue;
            };
            let spec = live.live.spec();
            let (stable, candidate) = live.live.canary_window(now);
            let (verdict, evidence) = judge(&spec.analysis, &stable, &candidate);
            let held = now_ms.saturating_sub(record.step_started_unix_ms) / 1000;
            let decision = match next_action(spec, record.step, held, &verdict) {
                Action::Hold => continue,
                Action::RollBack(reasons) => {
                    // At once, on this replica; the commit tells the others.
                    live.live.set_canary(0.0, 0.0);
                    Decision {
                        phase: RolloutPhase::RolledBack,
                        step: record.step,
                        action: "rolled_back",
                        reason: reasons.join("; "),
                    }
                }
                Action::Advance(next) => Decision {
                    phase: RolloutPhase::Progressing,
                    step: next,
                    action: "advanced",
                    reason: format!("step {} held {held} s on a passing window", record.step + 1),
                },
                Action::Promote => Decision {
                    phase: RolloutPhase::Promoted,
                    step: record.step,
                    action: "promoted",
                    reason: "the last step held on a passing window".to_string(),
                },
            };
            let evidence = serde_json::to_value(&evidence).unwrap_or(Value::Null);
            decided.push((
                tenant,
                name,
                live,
                record.generation,
                record.step,
                decision,
                evidence,
            ));
        }
        let mut committed = Vec::new();
        for (tenant, name, live, generation, from_step, decision, evidence) in decided {
            let replica = self.replica_id.clone();
            let Decision {
                phase,
                step,
                action,
                reason,
            } = decision;
            let result = self.change(Some(&tenant), |state| {
                let Some(rollout) =
                    tenant_mut(state, &tenant)?
                        .rollouts
                        .get_mut(&name)
                        .filter(|r| {
                            r.generation == generation
                                && r.phase == RolloutPhase::Progressing
                                && r.step == from_step
                        })
                else {
                    // Another replica decided first.
                    return Ok(false);
                };
                rollout.phase = phase;
                if step != rollout.step {
                    rollout.step = step;
                    rollout.step_started_unix_ms = unix_now_ms();
                }
                rollout.record(RolloutEvent {
                    unix_ms: unix_now_ms(),
                    action: action.into(),
                    step,
                    reason: reason.clone(),
                    evidence,
                    replica,
                });
                Ok(true)
            });
            match result {
                Ok(true) => {
                    tracing::info!(tenant = %tenant, rollout = %name, action, %reason, "rollout decision");
                    self.count_decision(&tenant, &name, action);
                    committed.push((tenant, name, action.to_string()));
                }
                Ok(false) => {
                    // Another replica's decision stands: take its weights again, whatever
                    // this replica set locally.
                    let state = self.store.state();
                    if let Some(current) = state.tenants.get(&tenant)
                        && let Some(record) = current.rollouts.get(&name)
                        && record.generation == live.generation
                    {
                        if let Ok(mut applied) = lock(&live.applied) {
                            *applied = None;
                        }
                        follow_record(&live, record, current.revision);
                    }
                }
                // The candidate stays at 0 % here if this was a rollback (the safe side);
                // the next round decides again.
                Err(error) => {
                    tracing::warn!(tenant = %tenant, rollout = %name, %error, "cannot record a rollout decision yet")
                }
            }
        }
        committed
    }
}

/// The index of a concluded experiment's winner among its arms (the first if it is unknown).
fn winner_index(spec: &RolloutSpec, record: &RolloutRecord) -> usize {
    record
        .winner
        .as_ref()
        .and_then(|winner| spec.arm_names().iter().position(|arm| arm == winner))
        .unwrap_or(0)
}

/// A stored version of one of the tenant's plugins.
fn plugin_version<'a>(
    tenant: &'a Tenant,
    plugin: &str,
    version: &str,
) -> Option<&'a weft_store::PluginVersion> {
    tenant
        .plugins
        .get(plugin)?
        .iter()
        .find(|stored| stored.version == version)
}

/// The arms (indices in [`RolloutSpec::all_arms`] order) that can still take traffic in the
/// rollout's phase: all while it runs; the candidate once promoted; the stable (an
/// experiment's first arm) once rolled back or aborted; the winner once concluded.
fn serving_arms(spec: &RolloutSpec, record: &RolloutRecord) -> Vec<usize> {
    match record.phase {
        RolloutPhase::Progressing | RolloutPhase::Running => (0..spec.arm_names().len()).collect(),
        RolloutPhase::Promoted => vec![1],
        RolloutPhase::RolledBack | RolloutPhase::Aborted => vec![0],
        RolloutPhase::Concluded => vec![winner_index(spec, record)],
    }
}

/// Whether `target`, without its rollout, would serve what `arm` serves: the arm is the
/// target's own latest version, or pins the current version of a plugin of the target graph.
fn falls_to(tenant: &Tenant, target: &str, arm: &ArmSpec) -> bool {
    if arm.served_name() != target {
        return false;
    }
    if let (Some(plugin), Some(version)) = (&arm.plugin, &arm.plugin_version) {
        return tenant
            .plugins
            .get(plugin)
            .and_then(|versions| versions.last())
            .is_some_and(|current| &current.version == version);
    }
    let latest = if arm.is_graph() {
        tenant.graphs.get(target).and_then(|v| v.keys().next_back())
    } else {
        tenant.models.get(target).and_then(|v| v.keys().next_back())
    };
    latest == Some(&arm.version)
}

/// What the controller decided for one canary.
struct Decision {
    phase: RolloutPhase,
    step: usize,
    action: &'static str,
    reason: String,
}

/// How a rollout is ended by hand.
enum End {
    Promote(Option<String>),
    Abort,
}

fn unknown_rollout(name: &str) -> Error {
    Error::not_found(format!("unknown rollout '{name}'"))
}

fn counts_view(counts: &Counts) -> Value {
    let histogram: Vec<Value> = counts
        .latency
        .iter()
        .enumerate()
        .filter(|(_, count)| **count > 0)
        .map(|(index, count)| json!([bucket_upper_ms(index), count]))
        .collect();
    json!({
        "requests": counts.requests,
        "failures": counts.failures,
        "traps": counts.traps,
        "error_rate": counts.failure_rate(),
        "p50_ms": counts.quantile_ms(0.5),
        "p99_ms": counts.quantile_ms(0.99),
        "compared": counts.compared,
        "drift": counts.drift(),
        "metric": counts.metric_mean(),
        "latency_ms_histogram": histogram,
    })
}

fn arm_view(report: &weft_engine::rollout::ArmReport) -> Value {
    json!({
        "arm": report.name,
        "weight": report.weight,
        "window": counts_view(&report.recent),
        "total": counts_view(&report.total),
    })
}

/// Runs the controller on a [`CONTROL_INTERVAL`] tick until the process ends.
pub fn run_rollout_controller(tenancy: Arc<Tenancy>) {
    tokio::spawn(async move {
        let mut timer = tokio::time::interval(CONTROL_INTERVAL);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            timer.tick().await;
            let tenancy = Arc::clone(&tenancy);
            if let Err(error) =
                tokio::task::spawn_blocking(move || tenancy.control_rollouts()).await
            {
                tracing::warn!(%error, "the rollout controller failed a round");
            }
        }
    });
}
