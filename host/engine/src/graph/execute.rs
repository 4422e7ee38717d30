//! The graph executor: runs a [`GraphPlan`] for one request, in-process.
//!
//! Nodes start as soon as everything they read is ready, so independent branches run
//! concurrently (all on the request's task, polled together). A router prunes the routes it did
//! not choose and everything that only they feed. A hard failure cancels the nodes still running
//! and names the failing node; a combiner's `soft` inputs may fail and are left out. One deadline
//! spans the whole request. Models and plugins are reached through [`NodeRunner`], so this file
//! is tested with fakes.
//!
//! Scheduling is event-driven and linear in the graph: each node counts its dependencies not yet
//! settled, and settling a node (it ran, failed softly or was skipped) touches only the nodes
//! that read it. Tensors are found by name through an index built once per node's outputs (and
//! once for the request), so neither a wide request nor a wide node makes lookups quadratic.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::BuildHasher;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use weft_core::{BoxFuture, Error, ErrorKind, NamedTensor, RequestContext, Result};

use super::schema::{BuiltinRouter, NodeKind, NodeSpec};
use super::validate::{GraphPlan, Source};

/// What a plugin node asks of its plugin.
#[derive(Debug)]
pub enum PluginCall<'a> {
    Transform {
        plugin: &'a str,
        inputs: Vec<NamedTensor>,
    },
    Combine {
        plugin: &'a str,
        branches: Vec<(String, Vec<NamedTensor>)>,
    },
    Route {
        plugin: &'a str,
        inputs: Vec<NamedTensor>,
    },
}

/// What a plugin returned.
#[derive(Debug)]
pub enum PluginReply {
    Tensors(Vec<NamedTensor>),
    Route(String),
}

/// Per-node settings handed to the runner with each call.
#[derive(Clone, Debug, Default)]
pub struct NodeContext {
    pub node: String,
    /// The node's params plus the request's parameters as `request.<name>`.
    pub params: Vec<(String, String)>,
    pub deadline: Option<Duration>,
    pub memory_bytes: Option<u64>,
    /// Models the plugin may load by name (the node's `models`).
    pub models: Vec<String>,
}

/// Runs models and plugins for the executor (the server wires it to the backends and runtime).
pub trait NodeRunner: Send + Sync {
    fn model<'a>(
        &'a self,
        request: &'a RequestContext,
        model: &'a str,
        version: Option<&'a str>,
        inputs: Vec<NamedTensor>,
    ) -> BoxFuture<'a, Result<Vec<NamedTensor>>>;

    fn plugin<'a>(
        &'a self,
        request: &'a RequestContext,
        context: &'a NodeContext,
        call: PluginCall<'a>,
    ) -> BoxFuture<'a, Result<PluginReply>>;
}

/// One node's record in a trace.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeTrace {
    pub node: String,
    pub duration: Duration,
    /// The route a router chose.
    pub route: Option<String>,
    pub outputs: Vec<NamedTensor>,
}

/// A finished request: the graph outputs and, in execution order, what each node did.
#[derive(Clone, Debug)]
pub struct Execution {
    pub outputs: Vec<NamedTensor>,
    pub trace: Vec<NodeTrace>,
}

/// Tensors with an index by name (the first of a name wins, as a linear search would find).
#[derive(Debug)]
struct Tensors {
    list: Vec<NamedTensor>,
    by_name: HashMap<String, usize>,
}

impl Tensors {
    fn new(list: Vec<NamedTensor>) -> Self {
        let mut by_name = HashMap::with_capacity(list.len());
        for (i, tensor) in list.iter().enumerate() {
            by_name.entry(tensor.name.clone()).or_insert(i);
        }
        Tensors { list, by_name }
    }

    fn get(&self, name: &str) -> Option<&NamedTensor> {
        self.by_name.get(name).map(|&i| &self.list[i])
    }
}

#[derive(Debug)]
enum State {
    Waiting,
    Running,
    Done(Tensors),
    /// Not run: pruned by a router, or a soft dependency that failed.
    Skipped,
}

/// Runs `plan` on the request's inputs and parameters within `deadline`.
/// The request's own deadline, when it comes first, bounds the run too.
pub async fn execute(
    plan: &GraphPlan,
    runner: &dyn NodeRunner,
    request: &RequestContext,
    inputs: Vec<NamedTensor>,
    request_params: &BTreeMap<String, String>,
    deadline: Duration,
) -> Result<Execution> {
    let name = &plan.spec.name;
    let (limit, whose) = match request.remaining() {
        Some(left) if left < deadline => (left, "the request's deadline"),
        _ => (deadline, "its deadline"),
    };
    let run = run(plan, runner, request, inputs, request_params);
    match tokio::time::timeout(limit, run).await {
        Ok(result) => result,
        Err(_) if whose == "its deadline" => Err(Error::new(
            ErrorKind::DeadlineExceeded,
            format!("graph '{name}' exceeded its deadline of {deadline:?}"),
        )),
        Err(_) => Err(Error::new(
            ErrorKind::DeadlineExceeded,
            format!("graph '{name}' did not finish before {whose}"),
        )),
    }
}

/// Which nodes may start: how many dependencies each still waits for, and those waiting for
/// none that have not been looked at yet.
struct Schedule {
    unsettled: Vec<usize>,
    ready: VecDeque<usize>,
}

impl Schedule {
    fn new(plan: &GraphPlan) -> Self {
        let unsettled: Vec<usize> = plan.deps.iter().map(Vec::len).collect();
        let ready = (0..unsettled.len())
            .filter(|&i| unsettled[i] == 0)
            .collect();
        Schedule { unsettled, ready }
    }

    /// `index` finished, failed softly or was skipped: its readers wait for one fewer.
    fn settled(&mut self, plan: &GraphPlan, index: usize) {
        for &reader in &plan.dependents[index] {
            let left = &mut self.unsettled[reader];
            *left = left.saturating_sub(1);
            if *left == 0 {
                self.ready.push_back(reader);
            }
        }
    }
}

async fn run(
    plan: &GraphPlan,
    runner: &dyn NodeRunner,
    request_context: &RequestContext,
    inputs: Vec<NamedTensor>,
    request_params: &BTreeMap<String, String>,
) -> Result<Execution> {
    let nodes = &plan.spec.nodes;
    let request = Tensors::new(inputs);
    // The request's parameters as every plugin sees them, written out once.
    let request_params_seen: Vec<(String, String)> = request_params
        .iter()
        .map(|(k, v)| (format!("request.{k}"), v.clone()))
        .collect();
    let mut states: Vec<State> = nodes.iter().map(|_| State::Waiting).collect();
    let mut schedule = Schedule::new(plan);
    let mut trace = Vec::new();
    let mut running = FuturesUnordered::new();
    loop {
        // Start or skip every node whose dependencies are settled.
        while let Some(index) = schedule.ready.pop_front() {
            // Pruned by a router before it could start.
            if !matches!(states[index], State::Waiting) {
                continue;
            }
            if should_skip(plan, index, &states) {
                states[index] = State::Skipped;
                schedule.settled(plan, index);
                continue;
            }
            let node_inputs = gather(plan, index, &states, &request)?;
            states[index] = State::Running;
            running.push(run_node(
                plan,
                runner,
                request_context,
                index,
                node_inputs,
                request_params,
                &request_params_seen,
            ));
        }
        let Some((index, started, result)) = running.next().await else {
            break;
        };
        let node: &NodeSpec = &nodes[index];
        // A router pruned this node while it ran (validation makes routes wait for their
        // router, so only a plan built without it gets here): its answer must not count.
        if matches!(states[index], State::Skipped) {
            continue;
        }
        match result {
            Ok((outputs, route)) => {
                if let Some(route) = &route {
                    if !node.routes.contains(route) {
                        return Err(Error::invalid(format!(
                            "node '{}': router chose '{route}', which is not one of its routes {:?}",
                            node.name, node.routes
                        )));
                    }
                    for &other in &plan.routes[index] {
                        if nodes[other].name != *route {
                            prune(plan, other, &mut states, &mut schedule);
                        }
                    }
                }
                trace.push(NodeTrace {
                    node: node.name.clone(),
                    duration: started.elapsed(),
                    route,
                    outputs: outputs.clone(),
                });
                states[index] = State::Done(Tensors::new(outputs));
                schedule.settled(plan, index);
            }
            Err(error) if is_soft(plan, index) => {
                tracing::warn!(node = %node.name, %error, "soft dependency failed; a combiner leaves it out");
                states[index] = State::Skipped;
                schedule.settled(plan, index);
            }
            Err(error) => return Err(error.context(format!("node '{}'", node.name))),
        }
    }
    let outputs = collect_outputs(plan, &states, &request)?;
    Ok(Execution { outputs, trace })
}

/// A route the router did not choose: it and everything only it feeds is skipped. It settles
/// here unless it already had (a plan built without validation may have run it already).
fn prune(plan: &GraphPlan, index: usize, states: &mut [State], schedule: &mut Schedule) {
    let was = std::mem::replace(&mut states[index], State::Skipped);
    if matches!(was, State::Waiting | State::Running) {
        schedule.settled(plan, index);
    }
}

/// A node is skipped when something it needs was skipped; a combiner only when all its
/// branches were.
fn should_skip(plan: &GraphPlan, index: usize, states: &[State]) -> bool {
    let skipped = |d: &usize| matches!(states[*d], State::Skipped);
    let deps = &plan.deps[index];
    if plan.spec.nodes[index].kind == NodeKind::Combiner {
        !deps.is_empty() && deps.iter().all(skipped)
    } else {
        deps.iter().any(skipped)
    }
}

/// True if every combiner that reads this node lists it as soft (and some combiner does).
fn is_soft(plan: &GraphPlan, index: usize) -> bool {
    let name = &plan.spec.nodes[index].name;
    let readers = &plan.dependents[index];
    !readers.is_empty()
        && readers.iter().all(|&reader| {
            let reader = &plan.spec.nodes[reader];
            reader.kind == NodeKind::Combiner && reader.soft.contains(name)
        })
}

fn resolve(
    source: &Source,
    states: &[State],
    request: &Tensors,
    plan: &GraphPlan,
) -> Result<Vec<NamedTensor>> {
    let pick = |tensors: &Tensors, name: &Option<String>, from: &dyn Fn() -> String| match name {
        None => Ok(tensors.list.clone()),
        Some(name) => tensors
            .get(name)
            .cloned()
            .map(|t| vec![t])
            .ok_or_else(|| Error::invalid(format!("{} has no tensor '{name}'", from()))),
    };
    match source {
        Source::Request(name) => pick(request, name, &|| "the request".to_string()),
        Source::Node(index, name) => match &states[*index] {
            State::Done(outputs) => pick(outputs, name, &|| {
                format!("node '{}'", plan.spec.nodes[*index].name)
            }),
            _ => Ok(Vec::new()),
        },
    }
}

/// The tensors a node sees: its sources, then its renames (which replace same-named tensors).
fn gather(
    plan: &GraphPlan,
    index: usize,
    states: &[State],
    request: &Tensors,
) -> Result<NodeInputs> {
    let node = &plan.spec.nodes[index];
    let context = |e: Error| e.context(format!("node '{}'", node.name));
    if node.kind == NodeKind::Combiner {
        let mut branches = Vec::new();
        for (source, input) in plan.sources[index].iter().zip(&node.inputs) {
            if let Source::Node(dep, _) = source
                && matches!(states[*dep], State::Skipped)
            {
                continue;
            }
            branches.push((
                input.split('.').next().unwrap_or(input).to_string(),
                resolve(source, states, request, plan).map_err(context)?,
            ));
        }
        return Ok(NodeInputs::Branches(branches));
    }
    // Slots in order; a renamed-away tensor leaves an empty slot. Names are unique.
    let mut tensors: Vec<Option<NamedTensor>> = Vec::new();
    let mut slot_of: HashMap<String, usize> = HashMap::new();
    for source in &plan.sources[index] {
        for tensor in resolve(source, states, request, plan).map_err(context)? {
            if slot_of.contains_key(&tensor.name) {
                return Err(Error::invalid(format!(
                    "node '{}': two inputs are named '{}'; rename one with tensor_map",
                    node.name, tensor.name
                )));
            }
            slot_of.insert(tensor.name.clone(), tensors.len());
            tensors.push(Some(tensor));
        }
    }
    for (to, source) in &plan.renames[index] {
        let mut found = resolve(source, states, request, plan).map_err(context)?;
        if let Some(mut tensor) = found.pop() {
            // The renamed tensor replaces its original name and anything already called `to`.
            let original = match source {
                Source::Node(_, Some(name)) | Source::Request(Some(name)) => Some(name.as_str()),
                _ => None,
            };
            for gone in std::iter::once(to.as_str()).chain(original) {
                if let Some(slot) = slot_of.remove(gone) {
                    tensors[slot] = None;
                }
            }
            tensor.name = to.clone();
            slot_of.insert(to.clone(), tensors.len());
            tensors.push(Some(tensor));
        }
    }
    Ok(NodeInputs::Tensors(tensors.into_iter().flatten().collect()))
}

enum NodeInputs {
    Tensors(Vec<NamedTensor>),
    Branches(Vec<(String, Vec<NamedTensor>)>),
}

type NodeResult = Result<(Vec<NamedTensor>, Option<String>)>;

fn run_node<'a>(
    plan: &'a GraphPlan,
    runner: &'a dyn NodeRunner,
    request: &'a RequestContext,
    index: usize,
    inputs: NodeInputs,
    request_params: &'a BTreeMap<String, String>,
    request_params_seen: &'a [(String, String)],
) -> BoxFuture<'a, (usize, Instant, NodeResult)> {
    let node = &plan.spec.nodes[index];
    let started = Instant::now();
    Box::pin(async move {
        let mut params: Vec<(String, String)> =
            Vec::with_capacity(node.params.len() + request_params_seen.len());
        params.extend(node.params.iter().map(|(k, v)| (k.clone(), v.clone())));
        params.extend_from_slice(request_params_seen);
        let context = NodeContext {
            node: node.name.clone(),
            params,
            deadline: node.deadline_ms.map(Duration::from_millis),
            memory_bytes: node.memory_mb.map(|mb| mb << 20),
            models: node.models.clone(),
        };
        let result = match (node.kind, inputs) {
            (NodeKind::Model, NodeInputs::Tensors(tensors)) => {
                let model = node.model.as_deref().unwrap_or_default();
                let call = runner.model(request, model, node.version.as_deref(), tensors);
                // A plugin's deadline is enforced inside the sandbox; a model's here.
                match context.deadline {
                    Some(deadline) => tokio::time::timeout(deadline, call).await.unwrap_or_else(
                        |_| {
                            Err(Error::new(
                                ErrorKind::DeadlineExceeded,
                                format!(
                                    "model '{model}' exceeded the node's deadline of {deadline:?}"
                                ),
                            ))
                        },
                    ),
                    None => call.await,
                }
                .map(|t| (t, None))
            }
            (NodeKind::Router, NodeInputs::Tensors(tensors)) => {
                match (node.builtin, &node.plugin) {
                    (Some(builtin), _) => builtin_route(node, builtin, request_params)
                        .map(|route| (tensors, Some(route))),
                    (None, Some(plugin)) => {
                        let call = PluginCall::Route {
                            plugin,
                            inputs: tensors.clone(),
                        };
                        match runner.plugin(request, &context, call).await {
                            Ok(PluginReply::Route(route)) => Ok((tensors, Some(route))),
                            Ok(PluginReply::Tensors(_)) => {
                                Err(Error::internal("router returned tensors"))
                            }
                            Err(error) => Err(error),
                        }
                    }
                    (None, None) => Err(Error::internal("router without plugin or builtin")),
                }
            }
            (NodeKind::Combiner, NodeInputs::Branches(branches)) => {
                let plugin = node.plugin.as_deref().unwrap_or_default();
                tensors_of(
                    runner
                        .plugin(request, &context, PluginCall::Combine { plugin, branches })
                        .await,
                )
            }
            (_, NodeInputs::Tensors(tensors)) => {
                let plugin = node.plugin.as_deref().unwrap_or_default();
                tensors_of(
                    runner
                        .plugin(
                            request,
                            &context,
                            PluginCall::Transform {
                                plugin,
                                inputs: tensors,
                            },
                        )
                        .await,
                )
            }
            (_, NodeInputs::Branches(_)) => Err(Error::internal("branches for a non-combiner")),
        };
        (index, started, result)
    })
}

fn tensors_of(reply: Result<PluginReply>) -> NodeResult {
    match reply? {
        PluginReply::Tensors(tensors) => Ok((tensors, None)),
        PluginReply::Route(_) => Err(Error::internal("a non-router plugin returned a route")),
    }
}

/// The splitter (weighted, optionally sticky) and the switch.
fn builtin_route(
    node: &NodeSpec,
    builtin: BuiltinRouter,
    request: &BTreeMap<String, String>,
) -> Result<String> {
    match builtin {
        BuiltinRouter::Splitter => {
            let ticket = match node.sticky.as_ref().and_then(|key| request.get(key)) {
                // The same value lands on the same route, across restarts and Rust releases.
                Some(value) => crate::sticky::sticky_hash(value) % 100,
                None => {
                    std::collections::hash_map::RandomState::new().hash_one(Instant::now()) % 100
                }
            };
            let mut cumulative = 0u64;
            for route in &node.routes {
                cumulative += u64::from(node.weights.get(route).copied().unwrap_or(0));
                if ticket < cumulative {
                    return Ok(route.clone());
                }
            }
            Err(Error::internal(format!(
                "node '{}': splitter weights do not cover {ticket}",
                node.name
            )))
        }
        BuiltinRouter::Switch => {
            let key = node.on.as_deref().unwrap_or_default();
            let value = request.get(key);
            value
                .and_then(|v| node.cases.get(v))
                .or(node.default.as_ref())
                .cloned()
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "node '{}': request parameter '{key}' is {} and there is no default route",
                        node.name,
                        value.map_or("missing".to_string(), |v| format!(
                            "'{v}', which matches no case"
                        ))
                    ))
                })
        }
    }
}

fn collect_outputs(
    plan: &GraphPlan,
    states: &[State],
    request: &Tensors,
) -> Result<Vec<NamedTensor>> {
    plan.spec
        .outputs
        .iter()
        .zip(&plan.outputs)
        .map(|(output, candidates)| {
            for source in candidates {
                let found = resolve(source, states, request, plan)?;
                if let Some(mut tensor) = found.into_iter().next() {
                    tensor.name = output.name.clone();
                    return Ok(tensor);
                }
            }
            Err(Error::internal(format!(
                "graph output '{}' was not produced: none of {:?} ran",
                output.name,
                output.from.items()
            )))
        })
        .collect()
}
