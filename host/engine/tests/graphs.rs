//! Graph validation (golden files) and the executor, with fake models and plugins: ordering,
//! concurrency, deadline, cancellation, soft dependencies and routing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use weft_core::{
    BoxFuture, DataType, ErrorKind, ModelMetadata, NamedTensor, RequestContext, Result, Tensor,
    TensorSpec,
};
use weft_engine::graph::{
    Catalog, GRAPH_PLATFORM, GraphModel, GraphPlan, GraphSpec, NodeContext, NodeLimits, NodeRunner,
    PluginCall, PluginReply, PluginRole, execute, validate,
};

/// Models: `mlp` (x FP32 [-1,4] -> y FP32 [-1,2]), `ids` (x INT64 [-1,4] -> y FP32 [-1,2]).
/// Plugins: transformers `scale`, `slow`, `fail`; combiner `sum`; router `pick`.
struct FakeCatalog;

fn spec(name: &str, datatype: DataType, shape: Vec<i64>) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        datatype,
        shape,
    }
}

impl Catalog for FakeCatalog {
    fn model(&self, name: &str, version: Option<&str>) -> Option<ModelMetadata> {
        let input = match (name, version) {
            ("mlp", None | Some("1") | Some("2")) | ("sleepy", None) => DataType::Fp32,
            ("ids", None) => DataType::Int64,
            _ => return None,
        };
        Some(ModelMetadata {
            platform: "fake".into(),
            inputs: vec![spec("x", input, vec![-1, 4])],
            outputs: vec![spec("y", DataType::Fp32, vec![-1, 2])],
            max_batch_size: 0,
        })
    }

    fn plugin(&self, name: &str) -> Option<PluginRole> {
        match name {
            "scale" | "slow" | "fail" => Some(PluginRole::Transformer),
            "sum" => Some(PluginRole::Combiner),
            "pick" => Some(PluginRole::Router),
            _ => None,
        }
    }

    fn node_limits(&self) -> Option<NodeLimits> {
        Some(NodeLimits {
            deadline_ms: 2000,
            memory_mb: 64,
        })
    }
}

fn golden_dir(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/graphs")
        .join(kind)
}

fn plan_of(path: &Path) -> Result<GraphPlan> {
    let text = std::fs::read_to_string(path).unwrap();
    let relative = path.strip_prefix(env!("CARGO_MANIFEST_DIR")).unwrap();
    let spec = GraphSpec::parse(relative, &text)?;
    validate(relative, &text, spec, &FakeCatalog)
}

#[test]
fn valid_graphs_validate() {
    let mut count = 0;
    for entry in std::fs::read_dir(golden_dir("valid")).unwrap() {
        let path = entry.unwrap().path();
        if let Err(error) = plan_of(&path) {
            panic!("{} should be valid: {error}", path.display());
        }
        count += 1;
    }
    assert!(count >= 4);
}

#[test]
fn invalid_graphs_fail_with_the_expected_text() {
    let mut count = 0;
    for entry in std::fs::read_dir(golden_dir("invalid")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let error = plan_of(&path)
            .err()
            .unwrap_or_else(|| panic!("{} should be invalid", path.display()));
        if std::env::var_os("WEFT_BLESS").is_some() {
            // Rewrites the expected text; review the diff before committing it.
            std::fs::write(path.with_extension("err"), format!("{error}\n")).unwrap();
        }
        let expected = std::fs::read_to_string(path.with_extension("err")).unwrap();
        assert_eq!(error.to_string(), expected.trim_end(), "{}", path.display());
        count += 1;
    }
    assert!(count >= 10);
}

fn f32_tensor(name: &str, values: &[f32]) -> NamedTensor {
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    NamedTensor::new(
        name,
        Tensor::new(DataType::Fp32, vec![1, values.len()], Bytes::from(data)).unwrap(),
    )
}

fn values(tensor: &NamedTensor) -> Vec<f32> {
    tensor
        .tensor
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Runs fakes and records when each node started and finished.
#[derive(Default)]
struct FakeRunner {
    log: Mutex<Vec<String>>,
}

impl FakeRunner {
    fn note(&self, event: String) {
        self.log.lock().unwrap().push(event);
    }
}

impl NodeRunner for FakeRunner {
    fn model<'a>(
        &'a self,
        _: &'a RequestContext,
        model: &'a str,
        version: Option<&'a str>,
        inputs: Vec<NamedTensor>,
    ) -> BoxFuture<'a, Result<Vec<NamedTensor>>> {
        Box::pin(async move {
            self.note(format!("model {model} {version:?}"));
            if model == "sleepy" {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            // y = [sum(x), version]
            let x = values(&inputs[0]);
            let version: f32 = version.and_then(|v| v.parse().ok()).unwrap_or(0.0);
            Ok(vec![f32_tensor("y", &[x.iter().sum(), version])])
        })
    }

    fn plugin<'a>(
        &'a self,
        _: &'a RequestContext,
        context: &'a NodeContext,
        call: PluginCall<'a>,
    ) -> BoxFuture<'a, Result<PluginReply>> {
        Box::pin(async move {
            match call {
                PluginCall::Transform {
                    plugin: "slow",
                    inputs,
                } => {
                    self.note(format!("start {}", context.node));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    self.note(format!("end {}", context.node));
                    Ok(PluginReply::Tensors(inputs))
                }
                PluginCall::Transform { plugin: "fail", .. } => {
                    self.note(format!("fail {}", context.node));
                    Err(weft_core::Error::invalid("the fake plugin failed"))
                }
                PluginCall::Transform { inputs, .. } => {
                    let factor: f32 = context
                        .params
                        .iter()
                        .find(|(k, _)| k == "factor")
                        .map_or(1.0, |(_, v)| v.parse().unwrap());
                    let scaled = inputs
                        .iter()
                        .map(|t| {
                            f32_tensor(
                                &t.name,
                                &values(t).iter().map(|v| v * factor).collect::<Vec<_>>(),
                            )
                        })
                        .collect();
                    Ok(PluginReply::Tensors(scaled))
                }
                PluginCall::Combine { branches, .. } => {
                    self.note(format!(
                        "combine {:?}",
                        branches.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>()
                    ));
                    let total: Vec<f32> = branches.iter().fold(vec![0.0, 0.0], |acc, (_, t)| {
                        acc.iter().zip(values(&t[0])).map(|(a, b)| a + b).collect()
                    });
                    Ok(PluginReply::Tensors(vec![f32_tensor("y", &total)]))
                }
                PluginCall::Route { .. } => {
                    let arm = context
                        .params
                        .iter()
                        .find(|(k, _)| k == "request.arm")
                        .map(|(_, v)| v.clone());
                    Ok(PluginReply::Route(arm.unwrap_or_else(|| "v1".into())))
                }
            }
        })
    }
}

fn inline(text: &str) -> GraphPlan {
    let spec = GraphSpec::parse(Path::new("inline.toml"), text).unwrap();
    validate(Path::new("inline.toml"), text, spec, &FakeCatalog).unwrap()
}

const HEADER: &str = r#"
name = "g"
[[input]]
name = "x"
datatype = "FP32"
shape = [-1, 4]
[[output]]
name = "out"
datatype = "FP32"
shape = [-1, 2]
"#;

fn request() -> Vec<NamedTensor> {
    vec![f32_tensor("x", &[1.0, 2.0, 3.0, 4.0])]
}

#[tokio::test]
async fn a_sequence_runs_in_order_with_params_and_renames() {
    let plan = inline(&format!(
        r#"{HEADER}
from = "mlp.y"
[[node]]
name = "pre"
kind = "transformer"
plugin = "scale"
inputs = ["request.x"]
tensor_map = {{ features = "request.x" }}
params = {{ factor = "10" }}
[[node]]
name = "mlp"
kind = "model"
model = "mlp"
inputs = ["pre"]
tensor_map = {{ x = "pre.features" }}
"#
    ));
    let runner = FakeRunner::default();
    let result = execute(
        &plan,
        &runner,
        &RequestContext::background(),
        request(),
        &BTreeMap::new(),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(result.outputs.len(), 1);
    assert_eq!(result.outputs[0].name, "out");
    assert_eq!(values(&result.outputs[0]), vec![100.0, 0.0]);
    let order: Vec<&str> = result.trace.iter().map(|t| t.node.as_str()).collect();
    assert_eq!(order, vec!["pre", "mlp"]);
}

const ENSEMBLE: &str = r#"
[[node]]
name = "a"
kind = "transformer"
plugin = "slow"
inputs = ["request"]
[[node]]
name = "b"
kind = "transformer"
plugin = "slow"
inputs = ["request"]
[[node]]
name = "ma"
kind = "model"
model = "mlp"
inputs = ["a"]
[[node]]
name = "mb"
kind = "model"
model = "mlp"
inputs = ["b"]
[[node]]
name = "sum"
kind = "combiner"
plugin = "sum"
inputs = ["ma", "mb"]
"#;

#[tokio::test]
async fn independent_branches_run_concurrently_and_a_combiner_joins_them() {
    let plan = inline(&format!("{HEADER}from = \"sum.y\"\n{ENSEMBLE}"));
    let runner = FakeRunner::default();
    let started = Instant::now();
    let result = execute(
        &plan,
        &runner,
        &RequestContext::background(),
        request(),
        &BTreeMap::new(),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_millis(380),
        "two 200 ms branches took {elapsed:?}: not concurrent"
    );
    assert_eq!(values(&result.outputs[0]), vec![20.0, 0.0]);
    let log = runner.log.lock().unwrap().clone();
    assert_eq!(&log[..2], &["start a", "start b"], "{log:?}");
    assert_eq!(log.last().unwrap(), "combine [\"ma\", \"mb\"]");
}

#[tokio::test]
async fn the_deadline_spans_the_whole_request() {
    let plan = inline(&format!("{HEADER}from = \"sum.y\"\n{ENSEMBLE}"));
    let runner = FakeRunner::default();
    let error = execute(
        &plan,
        &runner,
        &RequestContext::background(),
        request(),
        &BTreeMap::new(),
        Duration::from_millis(100),
    )
    .await
    .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::DeadlineExceeded);
    assert_eq!(
        error.to_string(),
        "graph 'g' exceeded its deadline of 100ms"
    );
}

#[tokio::test]
async fn a_hard_failure_cancels_the_rest_and_names_the_node() {
    let text = format!("{HEADER}from = \"sum.y\"\n{ENSEMBLE}").replace(
        "name = \"b\"\nkind = \"transformer\"\nplugin = \"slow\"",
        "name = \"b\"\nkind = \"transformer\"\nplugin = \"fail\"",
    );
    let plan = inline(&text);
    let runner = FakeRunner::default();
    let started = Instant::now();
    let error = execute(
        &plan,
        &runner,
        &RequestContext::background(),
        request(),
        &BTreeMap::new(),
        Duration::from_secs(5),
    )
    .await
    .unwrap_err();
    assert_eq!(error.to_string(), "node 'b': the fake plugin failed");
    assert_eq!(error.kind(), ErrorKind::InvalidArgument);
    assert!(
        started.elapsed() < Duration::from_millis(150),
        "did not cancel the slow branch"
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(
        !runner.log.lock().unwrap().contains(&"end a".to_string()),
        "the slow branch kept running"
    );
}

#[tokio::test]
async fn a_soft_dependency_may_fail_and_the_combiner_leaves_it_out() {
    let text = format!("{HEADER}from = \"sum.y\"\n{ENSEMBLE}")
        .replace(
            "name = \"b\"\nkind = \"transformer\"\nplugin = \"slow\"",
            "name = \"b\"\nkind = \"transformer\"\nplugin = \"fail\"",
        )
        .replace(
            "inputs = [\"ma\", \"mb\"]",
            "inputs = [\"ma\", \"mb\"]\nsoft = [\"mb\"]",
        );
    let plan = inline(&text);
    let runner = FakeRunner::default();
    let result = execute(
        &plan,
        &runner,
        &RequestContext::background(),
        request(),
        &BTreeMap::new(),
        Duration::from_secs(5),
    )
    .await;
    // `b` failed and `mb` depends on it: `mb` is skipped, which the combiner tolerates only
    // because `mb` is soft... but `b` itself is a hard input of `mb`. So this graph must fail.
    assert_eq!(
        result.unwrap_err().to_string(),
        "node 'b': the fake plugin failed"
    );

    let soft_model = format!("{HEADER}from = \"sum.y\"\n{ENSEMBLE}")
        .replace(
            "name = \"mb\"\nkind = \"model\"\nmodel = \"mlp\"\ninputs = [\"b\"]",
            "name = \"mb\"\nkind = \"transformer\"\nplugin = \"fail\"\ninputs = [\"b\"]",
        )
        .replace(
            "inputs = [\"ma\", \"mb\"]",
            "inputs = [\"ma\", \"mb\"]\nsoft = [\"mb\"]",
        );
    let plan = inline(&soft_model);
    let result = execute(
        &plan,
        &runner,
        &RequestContext::background(),
        request(),
        &BTreeMap::new(),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(values(&result.outputs[0]), vec![10.0, 0.0]);
    assert!(
        runner
            .log
            .lock()
            .unwrap()
            .contains(&"combine [\"ma\"]".to_string())
    );
}

fn routed(router: &str) -> GraphPlan {
    inline(&format!(
        r#"{HEADER}from = ["v1.y", "v2.y"]
[[node]]
name = "route"
kind = "router"
{router}
routes = ["v1", "v2"]
inputs = ["request"]
[[node]]
name = "v1"
kind = "model"
model = "mlp"
version = "1"
inputs = ["route"]
[[node]]
name = "v2"
kind = "model"
model = "mlp"
version = "2"
inputs = ["route"]
"#
    ))
}

fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn a_router_prunes_the_branches_it_did_not_pick() {
    let plan = routed("plugin = \"pick\"");
    let runner = FakeRunner::default();
    let result = execute(
        &plan,
        &runner,
        &RequestContext::background(),
        request(),
        &params(&[("arm", "v2")]),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(values(&result.outputs[0]), vec![10.0, 2.0]);
    assert_eq!(result.trace[0].route.as_deref(), Some("v2"));
    assert_eq!(
        *runner.log.lock().unwrap(),
        vec!["model mlp Some(\"2\")".to_string()]
    );

    let error = execute(
        &plan,
        &runner,
        &RequestContext::background(),
        request(),
        &params(&[("arm", "v9")]),
        Duration::from_secs(5),
    )
    .await
    .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("router chose 'v9', which is not one of its routes"),
        "{error}"
    );
}

#[tokio::test]
async fn the_switch_follows_a_request_parameter() {
    let plan =
        routed("builtin = \"switch\"\non = \"tier\"\ncases = { gold = \"v2\" }\ndefault = \"v1\"");
    let runner = FakeRunner::default();
    let version = |result: weft_engine::graph::Execution| values(&result.outputs[0])[1];
    let gold = execute(
        &plan,
        &runner,
        &RequestContext::background(),
        request(),
        &params(&[("tier", "gold")]),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(version(gold), 2.0);
    let other = execute(
        &plan,
        &runner,
        &RequestContext::background(),
        request(),
        &params(&[("tier", "tin")]),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(version(other), 1.0);
}

#[tokio::test]
async fn the_splitter_keeps_its_proportions_and_sticky_keys_stay_put() {
    let plan = routed("builtin = \"splitter\"\nweights = { v1 = 90, v2 = 10 }\nsticky = \"user\"");
    let runner = FakeRunner::default();
    let mut v2 = 0;
    let n = 2000;
    for _ in 0..n {
        let result = execute(
            &plan,
            &runner,
            &RequestContext::background(),
            request(),
            &BTreeMap::new(),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        if values(&result.outputs[0])[1] == 2.0 {
            v2 += 1;
        }
    }
    // 10% of 2000 = 200, standard deviation ~13.4: 5 sigma either side.
    assert!((133..=267).contains(&v2), "v2 got {v2} of {n}");
    for user in ["alice", "bob", "carol"] {
        let first = execute(
            &plan,
            &runner,
            &RequestContext::background(),
            request(),
            &params(&[("user", user)]),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        for _ in 0..20 {
            let again = execute(
                &plan,
                &runner,
                &RequestContext::background(),
                request(),
                &params(&[("user", user)]),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
            assert_eq!(again.trace[0].route, first.trace[0].route, "{user} moved");
        }
    }
}

#[tokio::test]
async fn a_model_node_deadline_stops_that_node_and_names_it() {
    let plan = inline(&format!(
        r#"{HEADER}
from = "m.y"
[[node]]
name = "m"
kind = "model"
model = "sleepy"
inputs = ["request"]
deadline_ms = 50
"#
    ));
    let started = Instant::now();
    let error = execute(
        &plan,
        &FakeRunner::default(),
        &RequestContext::background(),
        request(),
        &BTreeMap::new(),
        Duration::from_secs(5),
    )
    .await
    .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::DeadlineExceeded);
    assert!(error.to_string().contains("node 'm'"), "{error}");
    assert!(started.elapsed() < Duration::from_millis(400));
}

const TRACED: &str = r#"
from = "mlp.y"
[[node]]
name = "pre"
kind = "transformer"
plugin = "scale"
inputs = ["request"]
params = { factor = 2 }
[[node]]
name = "mlp"
kind = "model"
model = "mlp"
inputs = ["pre"]
"#;

fn graph_model(text: &str) -> GraphModel {
    GraphModel::new(inline(text), Arc::new(FakeRunner::default()))
}

#[tokio::test]
async fn a_graph_model_reports_its_declaration_and_traces_on_request() {
    use weft_core::{Model, Parameters};
    let model = graph_model(&format!("{HEADER}{TRACED}"));
    let metadata = model.metadata();
    assert_eq!(metadata.platform, GRAPH_PLATFORM);
    assert_eq!(
        metadata.inputs,
        vec![spec("x", DataType::Fp32, vec![-1, 4])]
    );
    assert_eq!(
        metadata.outputs,
        vec![spec("out", DataType::Fp32, vec![-1, 2])]
    );

    // No trace unless asked; numbers in TOML params reach the plugin as text.
    let (outputs, parameters) = model
        .infer_with_parameters(&RequestContext::background(), request(), &Parameters::new())
        .await
        .unwrap();
    assert_eq!(values(&outputs[0]), vec![20.0, 0.0]);
    assert!(parameters.is_empty());

    let mut ask = Parameters::new();
    ask.insert("trace".into(), true.into());
    let (_, parameters) = model
        .infer_with_parameters(&RequestContext::background(), request(), &ask)
        .await
        .unwrap();
    let trace = parameters["trace"].as_array().unwrap();
    let nodes: Vec<&str> = trace.iter().map(|n| n["node"].as_str().unwrap()).collect();
    assert_eq!(nodes, vec!["pre", "mlp"]);
    assert!(trace.iter().all(|n| n["duration_us"].is_u64()));
    assert!(trace.iter().all(|n| n.get("outputs").is_none()));

    ask.insert("trace".into(), "tensors".into());
    let (_, parameters) = model
        .infer_with_parameters(&RequestContext::background(), request(), &ask)
        .await
        .unwrap();
    let pre = &parameters["trace"][0]["outputs"][0];
    assert_eq!(pre["name"], "x");
    assert_eq!(pre["shape"], serde_json::json!([1, 4]));
    assert_eq!(pre["data"], serde_json::json!([2.0, 4.0, 6.0, 8.0]));

    ask.insert("trace".into(), "loud".into());
    let error = model
        .infer_with_parameters(&RequestContext::background(), request(), &ask)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::InvalidArgument);
    assert!(error.to_string().contains("'trace'"), "{error}");
}

#[tokio::test]
async fn a_graph_output_that_breaks_its_declaration_is_an_error() {
    use weft_core::Model;
    let header = HEADER.replace("shape = [-1, 2]", "shape = [-1, 3]");
    let model = graph_model(&format!("{header}{TRACED}"));
    let error = model
        .infer(&RequestContext::background(), request())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Internal);
    assert!(
        error
            .to_string()
            .contains("graph output 'out': expected shape [-1, 3]"),
        "{error}"
    );
}

#[tokio::test]
async fn the_request_deadline_bounds_a_graph_before_the_graph_deadline_does() {
    let plan = inline(&format!(
        r#"{HEADER}
from = "m.y"
[[node]]
name = "m"
kind = "model"
model = "sleepy"
inputs = ["request"]
"#
    ));
    let started = Instant::now();
    let hurried = RequestContext::for_tenant("acme")
        .with_deadline(Instant::now() + Duration::from_millis(50));
    let error = execute(
        &plan,
        &FakeRunner::default(),
        &hurried,
        request(),
        &BTreeMap::new(),
        Duration::from_secs(5),
    )
    .await
    .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::DeadlineExceeded);
    assert!(
        error.to_string().contains("the request's deadline"),
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_millis(400));
}
