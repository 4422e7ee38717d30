//! The graph executor: runs a [`GraphPlan`] for one request, in-process.
//!
//! Nodes start as soon as everything they read is ready, so independent branches run
//! concurrently (all on the request's task, polled together). A router prunes the routes it did
//! not choose and everything that only they feed. A hard failure cancels the nodes still running
//! and names the failing node; a combiner's `soft` inputs may fail and are left out. One deadline
//! spans the whole request. Models and plugins are reached through [`NodeRunner`], so this file
//! is tested with fakes.

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use weft_core::{BoxFuture, Error, ErrorKind, NamedTensor, Result};

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
        model: &'a str,
        version: Option<&'a str>,
        inputs: Vec<NamedTensor>,
    ) -> BoxFuture<'a, Result<Vec<NamedTensor>>>;

    fn plugin<'a>(
        &'a self,
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

#[derive(Clone, Debug)]
enum State {
    Waiting,
    Running,
    Done(Vec<NamedTensor>),
    /// Not run: pruned by a router, or a soft dependency that failed.
    Skipped,
}

/// Runs `plan` on the request's inputs and parameters within `deadline`.
pub async fn execute(
    plan: &GraphPlan,
    runner: &dyn NodeRunner,
    inputs: Vec<NamedTensor>,
    request_params: &BTreeMap<String, String>,
    deadline: Duration,
) -> Result<Execution> {
    let name = &plan.spec.name;
    match tokio::time::timeout(deadline, run(plan, runner, inputs, request_params)).await {
        Ok(result) => result,
        Err(_) => Err(Error::new(
            ErrorKind::DeadlineExceeded,
            format!("graph '{name}' exceeded its deadline of {deadline:?}"),
        )),
    }
}

async fn run(
    plan: &GraphPlan,
    runner: &dyn NodeRunner,
    inputs: Vec<NamedTensor>,
    request_params: &BTreeMap<String, String>,
) -> Result<Execution> {
    let nodes = &plan.spec.nodes;
    let mut states = vec![State::Waiting; nodes.len()];
    let mut trace = Vec::new();
    let mut running = FuturesUnordered::new();
    loop {
        // Start or skip every node whose dependencies are settled.
        let mut changed = true;
        while changed {
            changed = false;
            for index in 0..nodes.len() {
                if !matches!(states[index], State::Waiting) {
                    continue;
                }
                let deps = &plan.deps[index];
                if deps
                    .iter()
                    .any(|&d| matches!(states[d], State::Waiting | State::Running))
                {
                    continue;
                }
                changed = true;
                if should_skip(plan, index, &states) {
                    states[index] = State::Skipped;
                    continue;
                }
                let node_inputs = gather(plan, index, &states, &inputs)?;
                states[index] = State::Running;
                running.push(run_node(plan, runner, index, node_inputs, request_params));
            }
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
                    for other in node.routes.iter().filter(|r| *r != route) {
                        if let Some(pruned) = plan.index_of(other) {
                            states[pruned] = State::Skipped;
                        }
                    }
                }
                trace.push(NodeTrace {
                    node: node.name.clone(),
                    duration: started.elapsed(),
                    route,
                    outputs: outputs.clone(),
                });
                states[index] = State::Done(outputs);
            }
            Err(error) if is_soft(plan, index) => {
                tracing::warn!(node = %node.name, %error, "soft dependency failed; a combiner leaves it out");
                states[index] = State::Skipped;
            }
            Err(error) => return Err(error.context(format!("node '{}'", node.name))),
        }
    }
    let outputs = collect_outputs(plan, &states, &inputs)?;
    Ok(Execution { outputs, trace })
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
    let readers: Vec<&NodeSpec> = plan
        .spec
        .nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| plan.deps[*i].contains(&index))
        .map(|(_, n)| n)
        .collect();
    !readers.is_empty()
        && readers
            .iter()
            .all(|n| n.kind == NodeKind::Combiner && n.soft.contains(name))
}

fn resolve(
    source: &Source,
    states: &[State],
    request: &[NamedTensor],
    plan: &GraphPlan,
) -> Result<Vec<NamedTensor>> {
    let pick =
        |tensors: &[NamedTensor], name: &Option<String>, from: &str| -> Result<Vec<NamedTensor>> {
            match name {
                None => Ok(tensors.to_vec()),
                Some(name) => tensors
                    .iter()
                    .find(|t| &t.name == name)
                    .cloned()
                    .map(|t| vec![t])
                    .ok_or_else(|| Error::invalid(format!("{from} has no tensor '{name}'"))),
            }
        };
    match source {
        Source::Request(name) => pick(request, name, "the request"),
        Source::Node(index, name) => match &states[*index] {
            State::Done(outputs) => pick(
                outputs,
                name,
                &format!("node '{}'", plan.spec.nodes[*index].name),
            ),
            _ => Ok(Vec::new()),
        },
    }
}

/// The tensors a node sees: its sources, then its renames (which replace same-named tensors).
fn gather(
    plan: &GraphPlan,
    index: usize,
    states: &[State],
    request: &[NamedTensor],
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
    let mut tensors: Vec<NamedTensor> = Vec::new();
    for source in &plan.sources[index] {
        for tensor in resolve(source, states, request, plan).map_err(context)? {
            if tensors.iter().any(|t| t.name == tensor.name) {
                return Err(Error::invalid(format!(
                    "node '{}': two inputs are named '{}'; rename one with tensor_map",
                    node.name, tensor.name
                )));
            }
            tensors.push(tensor);
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
            tensors.retain(|t| t.name != *to && Some(t.name.as_str()) != original);
            tensor.name = to.clone();
            tensors.push(tensor);
        }
    }
    Ok(NodeInputs::Tensors(tensors))
}

enum NodeInputs {
    Tensors(Vec<NamedTensor>),
    Branches(Vec<(String, Vec<NamedTensor>)>),
}

type NodeResult = Result<(Vec<NamedTensor>, Option<String>)>;

fn run_node<'a>(
    plan: &'a GraphPlan,
    runner: &'a dyn NodeRunner,
    index: usize,
    inputs: NodeInputs,
    request_params: &'a BTreeMap<String, String>,
) -> BoxFuture<'a, (usize, Instant, NodeResult)> {
    let node = &plan.spec.nodes[index];
    let started = Instant::now();
    Box::pin(async move {
        let mut params: Vec<(String, String)> = node
            .params
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        params.extend(
            request_params
                .iter()
                .map(|(k, v)| (format!("request.{k}"), v.clone())),
        );
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
                let call = runner.model(model, node.version.as_deref(), tensors);
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
                        match runner.plugin(&context, call).await {
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
                        .plugin(&context, PluginCall::Combine { plugin, branches })
                        .await,
                )
            }
            (_, NodeInputs::Tensors(tensors)) => {
                let plugin = node.plugin.as_deref().unwrap_or_default();
                tensors_of(
                    runner
                        .plugin(
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
/// A stable ticket in 0..100 for a sticky value: FNV-1a, then splitmix64's finalizer so that
/// keys differing in one character spread over every ticket.
fn sticky_ticket(value: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in value.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^= hash >> 31;
    hash % 100
}

fn builtin_route(
    node: &NodeSpec,
    builtin: BuiltinRouter,
    request: &BTreeMap<String, String>,
) -> Result<String> {
    match builtin {
        BuiltinRouter::Splitter => {
            let ticket = match node.sticky.as_ref().and_then(|key| request.get(key)) {
                // The same value lands on the same route, across restarts and Rust releases.
                Some(value) => sticky_ticket(value),
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
    request: &[NamedTensor],
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
