//! A rollout as a servable [`Model`]: each call picks an arm (sticky by the client's key, or
//! at random), runs it, records how it went in that arm's window, mirrors a share of the
//! stable's calls to the candidate (bounded, answer discarded, compared for drift) and says in
//! the response's parameters which arm answered.
//!
//! [`RolloutLive`] is the part that outlives a scope rebuild: weights, windows and the shadow
//! pool of one rollout generation. The controller (in the tenancy layer) reads its windows and
//! sets its weights; a rollback takes effect on the next call of this replica.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::{Semaphore, oneshot};
use weft_core::{
    BoxFuture, DataType, Error, ErrorKind, Model, ModelMetadata, NamedTensor, Parameters,
    RequestContext, Result, Tensor,
};

use super::spec::{DriftMetric, MetricReduce, RolloutKind, RolloutSpec};
use super::window::{Counts, Outcome, Window};
use crate::sticky::{mix, sticky_hash_scoped};

/// Tickets per hundred percent: weights are kept in basis points.
const TICKETS: u32 = 10_000;
/// A drift that cannot be a number (outputs of different shapes) counts as this much.
const DRIFT_MISMATCH: f64 = 1e12;

fn to_basis_points(percent: f64) -> u32 {
    (percent.clamp(0.0, 100.0) * 100.0).round() as u32
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The live state of one rollout generation on this replica.
pub struct RolloutLive {
    spec: Arc<RolloutSpec>,
    /// The candidate's share (canary), in basis points.
    candidate_bp: AtomicU32,
    /// The share of the stable's calls mirrored to the candidate, in basis points.
    shadow_bp: AtomicU32,
    /// The arm that takes all traffic once an experiment ended (`usize::MAX` while it runs).
    winner: AtomicUsize,
    /// What each arm served, in [`RolloutSpec::arm_names`] order.
    served: Vec<Mutex<Window>>,
    /// What the candidate answered on mirrored calls.
    mirrored: Mutex<Window>,
    shadow_slots: Arc<Semaphore>,
    /// Mirrors in flight across all of the tenant's rollouts, when the tenant has a cap.
    tenant_shadow_slots: Option<Arc<Semaphore>>,
    shadow_sent: AtomicU64,
    shadow_dropped: AtomicU64,
    draws: AtomicU64,
    seed: u64,
}

/// What an arm did, for status, metrics and experiments.
#[derive(Clone, Debug)]
pub struct ArmReport {
    pub name: String,
    /// Its share of traffic now, in percent.
    pub weight: f64,
    pub recent: Counts,
    pub total: Counts,
}

impl RolloutLive {
    pub fn new(spec: Arc<RolloutSpec>) -> Arc<Self> {
        Self::build(spec, None)
    }

    /// Like [`RolloutLive::new`], with mirrors also bounded by `tenant_slots`, shared by every
    /// rollout of one tenant (so many rollouts cannot multiply a tenant's shadow traffic).
    pub fn with_tenant_slots(spec: Arc<RolloutSpec>, tenant_slots: Arc<Semaphore>) -> Arc<Self> {
        Self::build(spec, Some(tenant_slots))
    }

    fn build(spec: Arc<RolloutSpec>, tenant_shadow_slots: Option<Arc<Semaphore>>) -> Arc<Self> {
        let origin = Instant::now();
        let window = spec.analysis.window_seconds;
        let served = spec
            .arm_names()
            .iter()
            .map(|_| Mutex::new(Window::new(window, origin)))
            .collect();
        let seed = std::collections::hash_map::RandomState::new().hash_one(origin);
        Arc::new(RolloutLive {
            candidate_bp: AtomicU32::new(0),
            shadow_bp: AtomicU32::new(0),
            winner: AtomicUsize::new(usize::MAX),
            served,
            mirrored: Mutex::new(Window::new(window, origin)),
            shadow_slots: Arc::new(Semaphore::new(spec.shadow_max_in_flight)),
            tenant_shadow_slots,
            shadow_sent: AtomicU64::new(0),
            shadow_dropped: AtomicU64::new(0),
            draws: AtomicU64::new(0),
            seed,
            spec,
        })
    }

    pub fn spec(&self) -> &Arc<RolloutSpec> {
        &self.spec
    }

    /// Sets a canary's traffic: the candidate's share and the mirrored share, in percent.
    pub fn set_canary(&self, weight: f64, shadow: f64) {
        self.candidate_bp
            .store(to_basis_points(weight), Ordering::Release);
        self.shadow_bp
            .store(to_basis_points(shadow), Ordering::Release);
    }

    /// Sends all traffic to one arm (an experiment's winner), or back to the split (`None`).
    pub fn set_winner(&self, arm: Option<usize>) {
        self.winner
            .store(arm.unwrap_or(usize::MAX), Ordering::Release);
    }

    /// The candidate's share of a canary now, in percent.
    pub fn candidate_weight(&self) -> f64 {
        f64::from(self.candidate_bp.load(Ordering::Acquire)) / 100.0
    }

    pub fn shadow_weight(&self) -> f64 {
        f64::from(self.shadow_bp.load(Ordering::Acquire)) / 100.0
    }

    /// Mirrored calls sent and dropped (the shadow pool was full).
    pub fn shadow_counts(&self) -> (u64, u64) {
        (
            self.shadow_sent.load(Ordering::Relaxed),
            self.shadow_dropped.load(Ordering::Relaxed),
        )
    }

    /// A canary's window now: what the stable served, and what the candidate answered,
    /// served and mirrored together (drift comes from the mirrored ones).
    pub fn canary_window(&self, now: Instant) -> (Counts, Counts) {
        let stable = self
            .served
            .first()
            .map(|window| lock(window).recent(now))
            .unwrap_or_default();
        let mut candidate = self
            .served
            .get(1)
            .map(|window| lock(window).recent(now))
            .unwrap_or_default();
        candidate.add(&lock(&self.mirrored).recent(now));
        (stable, candidate)
    }

    /// Forgets the recent windows: a new step is judged on its own traffic.
    pub fn clear_recent(&self) {
        for window in &self.served {
            lock(window).clear_recent();
        }
        lock(&self.mirrored).clear_recent();
    }

    /// Each arm's weight and counts; a canary's mirrored calls are reported as the arm
    /// `candidate-shadow`.
    pub fn report(&self, now: Instant) -> Vec<ArmReport> {
        let names = self.spec.arm_names();
        let weights = self.weights_percent();
        let mut reports: Vec<ArmReport> = names
            .into_iter()
            .zip(&self.served)
            .zip(weights)
            .map(|((name, window), weight)| {
                let window = lock(window);
                ArmReport {
                    name,
                    weight,
                    recent: window.recent(now),
                    total: window.total().clone(),
                }
            })
            .collect();
        if self.spec.kind == RolloutKind::Canary {
            let window = lock(&self.mirrored);
            reports.push(ArmReport {
                name: "candidate-shadow".into(),
                weight: self.shadow_weight(),
                recent: window.recent(now),
                total: window.total().clone(),
            });
        }
        reports
    }

    /// Each arm's share of traffic now, in percent.
    pub fn weights_percent(&self) -> Vec<f64> {
        let winner = self.winner.load(Ordering::Acquire);
        let arms = self.served.len();
        if winner < arms {
            return (0..arms)
                .map(|arm| if arm == winner { 100.0 } else { 0.0 })
                .collect();
        }
        match self.spec.kind {
            RolloutKind::Canary => {
                let candidate = self.candidate_weight();
                vec![100.0 - candidate, candidate]
            }
            RolloutKind::Experiment => self.spec.arms.iter().map(|arm| arm.weight).collect(),
        }
    }

    /// A ticket in 0..10000: the client's own when it sent a key, else a fresh random one.
    fn ticket(&self, key: Option<&str>) -> u32 {
        let hash = match key {
            Some(key) => sticky_hash_scoped(self.spec.name.as_bytes(), key),
            None => mix(self.seed ^ self.draws.fetch_add(1, Ordering::Relaxed)),
        };
        (hash % u64::from(TICKETS)) as u32
    }

    /// The arm a ticket lands on. A canary's candidate holds the top `weight` tickets, so
    /// raising its weight only ever moves clients from the stable to the candidate.
    fn arm_for(&self, ticket: u32) -> usize {
        let winner = self.winner.load(Ordering::Acquire);
        if winner < self.served.len() {
            return winner;
        }
        match self.spec.kind {
            RolloutKind::Canary => {
                let candidate = self.candidate_bp.load(Ordering::Acquire).min(TICKETS);
                usize::from(ticket >= TICKETS - candidate)
            }
            RolloutKind::Experiment => {
                let mut cumulative = 0u32;
                for (index, arm) in self.spec.arms.iter().enumerate() {
                    cumulative += to_basis_points(arm.weight);
                    if ticket < cumulative {
                        return index;
                    }
                }
                self.spec.arms.len().saturating_sub(1)
            }
        }
    }

    /// Whether to mirror this stable call: the shadow share, drawn apart from the arm ticket.
    fn mirror_now(&self) -> bool {
        let share = self.shadow_bp.load(Ordering::Acquire);
        let draw = mix(self.seed.rotate_left(17) ^ self.draws.fetch_add(1, Ordering::Relaxed))
            % u64::from(TICKETS);
        share > 0 && u64::from(share) > draw
    }

    fn record(&self, arm: usize, outcome: &Outcome) {
        if let Some(window) = self.served.get(arm) {
            lock(window).record(Instant::now(), outcome);
        }
    }
}

/// One arm as served: its name, the version it reports and the model or graph behind it.
#[derive(Clone)]
pub struct RolloutArm {
    pub name: String,
    pub version: u64,
    pub model: Arc<dyn Model>,
}

/// A rollout's target name, served.
pub struct RolloutModel {
    live: Arc<RolloutLive>,
    arms: Vec<RolloutArm>,
    metadata: ModelMetadata,
}

impl RolloutModel {
    /// `arms` in [`RolloutSpec::arm_names`] order; they must take the same inputs and give
    /// the same outputs as the first (the stable), or the rollout is refused.
    pub fn new(live: Arc<RolloutLive>, arms: Vec<RolloutArm>) -> Result<Self> {
        let Some(first) = arms.first() else {
            return Err(Error::invalid("a rollout needs arms"));
        };
        let metadata = first.model.metadata().clone();
        for arm in &arms[1..] {
            let other = arm.model.metadata();
            if other.inputs != metadata.inputs || other.outputs != metadata.outputs {
                return Err(Error::invalid(format!(
                    "arm '{}' takes or gives other tensors than arm '{}'; every arm must serve the same inputs and outputs",
                    arm.name, first.name
                )));
            }
        }
        if arms.len() != live.served.len() {
            return Err(Error::internal("a rollout's arms do not match its windows"));
        }
        Ok(RolloutModel {
            live,
            arms,
            metadata,
        })
    }

    pub fn live(&self) -> &Arc<RolloutLive> {
        &self.live
    }
}

/// Whether a failure is the arm's: a bad request is the client's and is not counted.
fn is_server_failure(error: &Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::Internal
            | ErrorKind::Unavailable
            | ErrorKind::DeadlineExceeded
            | ErrorKind::Unsupported
    ) || error.is_trap()
}

fn outcome_of<T>(started: Instant, result: &Result<T>, metric: Option<f64>) -> Option<Outcome> {
    match result {
        Ok(_) => Some(Outcome {
            latency: started.elapsed(),
            failed: false,
            trapped: false,
            metric,
        }),
        Err(error) if is_server_failure(error) => Some(Outcome {
            latency: started.elapsed(),
            failed: true,
            trapped: error.is_trap(),
            metric: None,
        }),
        Err(_) => None,
    }
}

/// A numeric tensor's elements as f64; `None` for strings and half floats.
pub fn numbers(tensor: &Tensor) -> Option<Vec<f64>> {
    let data = tensor.data();
    macro_rules! read {
        ($type:ty, $width:expr) => {
            data.chunks_exact($width)
                .map(|chunk| {
                    let mut bytes = [0u8; $width];
                    bytes.copy_from_slice(chunk);
                    <$type>::from_le_bytes(bytes) as f64
                })
                .collect()
        };
    }
    Some(match tensor.datatype() {
        DataType::Bool | DataType::Uint8 => data.iter().map(|&b| f64::from(b)).collect(),
        DataType::Int8 => data.iter().map(|&b| f64::from(b as i8)).collect(),
        DataType::Uint16 => read!(u16, 2),
        DataType::Int16 => read!(i16, 2),
        DataType::Uint32 => read!(u32, 4),
        DataType::Int32 => read!(i32, 4),
        DataType::Uint64 => read!(u64, 8),
        DataType::Int64 => read!(i64, 8),
        DataType::Fp32 => read!(f32, 4),
        DataType::Fp64 => read!(f64, 8),
        DataType::Fp16 | DataType::Bf16 | DataType::Bytes => return None,
    })
}

/// How far the candidate's output is from the stable's; `None` when either is not numeric.
pub fn drift(metric: DriftMetric, stable: &Tensor, candidate: &Tensor) -> Option<f64> {
    let (left, right) = (numbers(stable)?, numbers(candidate)?);
    if stable.shape() != candidate.shape() {
        return Some(match metric {
            DriftMetric::MeanAbsDiff => DRIFT_MISMATCH,
            DriftMetric::Top1Disagreement => 1.0,
        });
    }
    if left.is_empty() {
        return Some(0.0);
    }
    Some(match metric {
        DriftMetric::MeanAbsDiff => {
            let sum: f64 = left.iter().zip(&right).map(|(a, b)| (a - b).abs()).sum();
            (sum / left.len() as f64).min(DRIFT_MISMATCH)
        }
        DriftMetric::Top1Disagreement => {
            let row = stable.shape().last().copied().unwrap_or(1).max(1);
            let argmax = |values: &[f64]| {
                values
                    .iter()
                    .enumerate()
                    .fold((0, f64::NEG_INFINITY), |best, (index, &value)| {
                        if value > best.1 { (index, value) } else { best }
                    })
                    .0
            };
            let rows = left.len() / row;
            let disagreeing = left
                .chunks(row)
                .zip(right.chunks(row))
                .filter(|(a, b)| argmax(a) != argmax(b))
                .count();
            disagreeing as f64 / rows.max(1) as f64
        }
    })
}

fn reduce(reduce: MetricReduce, tensor: &Tensor) -> Option<f64> {
    let values = numbers(tensor)?;
    if values.is_empty() {
        return None;
    }
    Some(match reduce {
        MetricReduce::Mean => values.iter().sum::<f64>() / values.len() as f64,
        MetricReduce::Max => values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    })
}

fn output<'a>(outputs: &'a [NamedTensor], name: &str) -> Option<&'a Tensor> {
    outputs
        .iter()
        .find(|output| output.name == name)
        .map(|output| &output.tensor)
}

/// The client's sticky key: the configured request parameter, or the header the edge copied.
fn sticky_key<'a>(
    spec: &RolloutSpec,
    request: &'a RequestContext,
    parameters: &'a Parameters,
) -> Option<std::borrow::Cow<'a, str>> {
    let sticky = spec.sticky.as_ref()?;
    if let Some(parameter) = &sticky.parameter {
        return match parameters.get(parameter)? {
            serde_json::Value::String(text) => Some(text.as_str().into()),
            serde_json::Value::Number(number) => Some(number.to_string().into()),
            serde_json::Value::Bool(flag) => Some(flag.to_string().into()),
            _ => None,
        };
    }
    request.sticky_key().map(Into::into)
}

impl RolloutModel {
    /// Starts the mirrored call of the candidate; the stable's answer follows on the channel.
    fn mirror(
        &self,
        request: &RequestContext,
        inputs: Vec<NamedTensor>,
        parameters: &Parameters,
    ) -> Option<oneshot::Sender<Option<Tensor>>> {
        let live = Arc::clone(&self.live);
        let Ok(slot) = Arc::clone(&live.shadow_slots).try_acquire_owned() else {
            live.shadow_dropped.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let tenant_slot = match &live.tenant_shadow_slots {
            Some(slots) => match Arc::clone(slots).try_acquire_owned() {
                Ok(slot) => Some(slot),
                Err(_) => {
                    live.shadow_dropped.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            },
            None => None,
        };
        let candidate = Arc::clone(&self.arms.get(1)?.model);
        live.shadow_sent.fetch_add(1, Ordering::Relaxed);
        // The mirror runs for the same tenant and deadline, on an account of its own: what it
        // costs is not the client's answer's.
        let mut context = match request.tenant() {
            Some(tenant) => RequestContext::for_tenant(tenant),
            None => RequestContext::background(),
        };
        if let Some(deadline) = request.deadline() {
            context = context.with_deadline(deadline);
        }
        let parameters = parameters.clone();
        let (sender, receiver) = oneshot::channel::<Option<Tensor>>();
        tokio::spawn(async move {
            let started = Instant::now();
            let result = candidate
                .infer_with_parameters(&context, inputs, &parameters)
                .await;
            if let Some(outcome) = outcome_of(started, &result, None) {
                lock(&live.mirrored).record(Instant::now(), &outcome);
            }
            drop((slot, tenant_slot));
            let drift_rule = live.spec.analysis.drift.clone();
            if let (Ok((outputs, _)), Some(rule), Ok(Some(stable))) =
                (result, drift_rule, receiver.await)
                && let Some(candidate) = output(&outputs, &rule.output)
                && let Some(value) = drift(rule.metric, &stable, candidate)
            {
                lock(&live.mirrored).record_drift(Instant::now(), value);
            }
        });
        Some(sender)
    }
}

impl Model for RolloutModel {
    fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    fn health(&self) -> std::result::Result<(), String> {
        self.arms
            .first()
            .map_or(Err("no arms".to_string()), |arm| arm.model.health())
    }

    fn sticky_header(&self) -> Option<&str> {
        self.live.spec.sticky.as_ref()?.header.as_deref()
    }

    fn infer<'a>(
        &'a self,
        request: &'a RequestContext,
        inputs: Vec<NamedTensor>,
    ) -> BoxFuture<'a, Result<Vec<NamedTensor>>> {
        Box::pin(async move {
            let parameters = Parameters::new();
            Ok(self
                .infer_with_parameters(request, inputs, &parameters)
                .await?
                .0)
        })
    }

    fn infer_with_parameters<'a>(
        &'a self,
        request: &'a RequestContext,
        inputs: Vec<NamedTensor>,
        parameters: &'a Parameters,
    ) -> BoxFuture<'a, Result<(Vec<NamedTensor>, Parameters)>> {
        Box::pin(async move {
            let spec = &self.live.spec;
            let key = sticky_key(spec, request, parameters);
            let index = self.live.arm_for(self.live.ticket(key.as_deref()));
            let arm = self
                .arms
                .get(index)
                .ok_or_else(|| Error::internal("a rollout picked an arm it does not have"))?;
            let stable_call = spec.kind == RolloutKind::Canary && index == 0;
            let mirror = if stable_call && self.live.mirror_now() {
                self.mirror(request, inputs.clone(), parameters)
            } else {
                None
            };
            let started = Instant::now();
            let result = arm
                .model
                .infer_with_parameters(request, inputs, parameters)
                .await;
            let metric = match (&spec.metric, &result) {
                (Some(metric), Ok((outputs, _))) => {
                    output(outputs, &metric.output).and_then(|tensor| reduce(metric.reduce, tensor))
                }
                _ => None,
            };
            if let Some(outcome) = outcome_of(started, &result, metric) {
                self.live.record(index, &outcome);
            }
            if let Some(sender) = mirror {
                let stable = match (&spec.analysis.drift, &result) {
                    (Some(rule), Ok((outputs, _))) => output(outputs, &rule.output).cloned(),
                    _ => None,
                };
                let _ = sender.send(stable);
            }
            let (outputs, mut reply) = result?;
            reply.insert("rollout".into(), spec.name.clone().into());
            reply.insert("rollout_arm".into(), arm.name.clone().into());
            reply.insert("rollout_version".into(), arm.version.into());
            Ok((outputs, reply))
        })
    }
}
