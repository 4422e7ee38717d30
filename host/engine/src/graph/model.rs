//! A validated graph served as a V2 model: [`GraphModel`] implements [`weft_core::Model`], so the
//! HTTP layer, the repository index and readiness treat graphs and models alike.
//!
//! Request parameters reach every node (plugins see them as `request.<name>`; the built-in
//! splitter and switch read them). The `trace` parameter (`true` or `"tensors"`) returns, in
//! the response parameters, each node's duration and router choice, and with `"tensors"` each
//! node's outputs: the intermediate results other graph servers hide.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use weft_core::{
    BoxFuture, Error, Model, ModelMetadata, NamedTensor, Parameters, RequestContext, Result,
    TensorSpec,
};

use super::execute::{NodeRunner, NodeTrace, execute};
use super::validate::GraphPlan;

/// What `GET /v2/models/{graph}` reports as the platform.
pub const GRAPH_PLATFORM: &str = "weft_graph";

/// The whole-request deadline of a graph that declares no `deadline_ms`.
pub const DEFAULT_GRAPH_DEADLINE: Duration = Duration::from_secs(10);

/// How much of the execution a response reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TraceLevel {
    Off,
    Durations,
    Tensors,
}

impl TraceLevel {
    fn from_parameters(parameters: &Parameters) -> Result<Self> {
        match parameters.get("trace") {
            None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(TraceLevel::Off),
            Some(Value::Bool(true)) => Ok(TraceLevel::Durations),
            Some(Value::String(text)) => match text.as_str() {
                "false" => Ok(TraceLevel::Off),
                "true" => Ok(TraceLevel::Durations),
                "tensors" => Ok(TraceLevel::Tensors),
                other => Err(trace_error(other)),
            },
            Some(other) => Err(trace_error(&other.to_string())),
        }
    }
}

fn trace_error(got: &str) -> Error {
    Error::invalid(format!(
        "parameter 'trace' must be true, false or \"tensors\", not {got}"
    ))
}

/// Sees every node that ran, for metrics.
pub trait GraphObserver: Send + Sync {
    fn node(&self, graph: &str, node: &str, duration: Duration);
    /// Called once per node when the observer is attached, so series exist before traffic.
    fn declare(&self, graph: &str, node: &str) {
        let _ = (graph, node);
    }
}

/// A graph ready to serve: its plan, the runner its nodes call, and its V2 metadata.
pub struct GraphModel {
    plan: Arc<GraphPlan>,
    runner: Arc<dyn NodeRunner>,
    metadata: ModelMetadata,
    deadline: Duration,
    observer: Option<Arc<dyn GraphObserver>>,
}

impl GraphModel {
    pub fn new(plan: GraphPlan, runner: Arc<dyn NodeRunner>) -> Self {
        let spec = &plan.spec;
        let metadata = ModelMetadata {
            platform: GRAPH_PLATFORM.to_string(),
            inputs: spec
                .inputs
                .iter()
                .map(|t| TensorSpec {
                    name: t.name.clone(),
                    datatype: t.datatype,
                    shape: t.shape.clone(),
                })
                .collect(),
            outputs: spec
                .outputs
                .iter()
                .map(|t| TensorSpec {
                    name: t.name.clone(),
                    datatype: t.datatype,
                    shape: t.shape.clone(),
                })
                .collect(),
            // The models inside enforce their own batch limits.
            max_batch_size: 0,
        };
        let deadline = spec
            .deadline_ms
            .map_or(DEFAULT_GRAPH_DEADLINE, Duration::from_millis);
        GraphModel {
            plan: Arc::new(plan),
            runner,
            metadata,
            deadline,
            observer: None,
        }
    }

    /// Reports every node's duration to `observer` (metrics).
    pub fn with_observer(mut self, observer: Arc<dyn GraphObserver>) -> Self {
        for node in &self.plan.spec.nodes {
            observer.declare(&self.plan.spec.name, &node.name);
        }
        self.observer = Some(observer);
        self
    }

    pub fn plan(&self) -> &GraphPlan {
        &self.plan
    }

    async fn run(
        &self,
        request: &RequestContext,
        inputs: Vec<NamedTensor>,
        parameters: &Parameters,
    ) -> Result<(Vec<NamedTensor>, Parameters)> {
        let level = TraceLevel::from_parameters(parameters)?;
        let request_params = node_parameters(parameters);
        let execution = execute(
            &self.plan,
            self.runner.as_ref(),
            request,
            inputs,
            &request_params,
            self.deadline,
        )
        .await?;
        if let Some(observer) = &self.observer {
            for node in &execution.trace {
                observer.node(&self.plan.spec.name, &node.node, node.duration);
            }
        }
        for (output, spec) in execution.outputs.iter().zip(&self.metadata.outputs) {
            spec.check_as("graph output", &output.name, &output.tensor)
                .map_err(|error| {
                    Error::internal(format!(
                        "graph '{}' produced a tensor its declaration does not allow: {}",
                        self.plan.spec.name,
                        error.message()
                    ))
                })?;
        }
        let mut response = Parameters::new();
        if level != TraceLevel::Off {
            let nodes = execution
                .trace
                .iter()
                .map(|node| trace_entry(node, level == TraceLevel::Tensors))
                .collect();
            response.insert("trace".to_string(), Value::Array(nodes));
        }
        Ok((execution.outputs, response))
    }
}

/// Request parameters as nodes see them: text values, numbers and booleans written out.
fn node_parameters(parameters: &Parameters) -> BTreeMap<String, String> {
    parameters
        .iter()
        .filter_map(|(key, value)| {
            let text = match value {
                Value::Null => return None,
                Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            Some((key.clone(), text))
        })
        .collect()
}

fn trace_entry(node: &NodeTrace, tensors: bool) -> Value {
    let mut entry = json!({
        "node": node.node,
        "duration_us": u64::try_from(node.duration.as_micros()).unwrap_or(u64::MAX),
    });
    if let Some(route) = &node.route {
        entry["route"] = Value::String(route.clone());
    }
    if tensors {
        let outputs = node
            .outputs
            .iter()
            .map(|tensor| {
                weft_protocol::tensor_json(tensor).unwrap_or_else(
                    |error| json!({ "name": tensor.name, "error": error.message() }),
                )
            })
            .collect();
        entry["outputs"] = Value::Array(outputs);
    }
    entry
}

impl Model for GraphModel {
    fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    fn infer<'a>(
        &'a self,
        request: &'a RequestContext,
        inputs: Vec<NamedTensor>,
    ) -> BoxFuture<'a, Result<Vec<NamedTensor>>> {
        Box::pin(async move {
            let parameters = Parameters::new();
            Ok(self.run(request, inputs, &parameters).await?.0)
        })
    }

    fn infer_with_parameters<'a>(
        &'a self,
        request: &'a RequestContext,
        inputs: Vec<NamedTensor>,
        parameters: &'a Parameters,
    ) -> BoxFuture<'a, Result<(Vec<NamedTensor>, Parameters)>> {
        Box::pin(self.run(request, inputs, parameters))
    }
}
