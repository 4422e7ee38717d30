//! The graph examples (examples/classify, ensemble, ab-route, text) served by a real `weft`
//! process exactly as the README runs them, checked against the bare models they wrap; plus a
//! graph whose plugin traps, next to graphs that keep serving, and a router plugin choosing
//! branches in two versions of one graph.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;

use serde_json::{Value, json};
use support::*;

/// Deterministic features for `rows` rows of 64.
fn features(rows: usize) -> Vec<f32> {
    (0..rows * 64)
        .map(|i| ((i * 37 % 101) as f32) / 13.0 - 3.0)
        .collect()
}

/// What the `normalize` plugin does by default: z-score over each row.
fn zscore(values: &[f32], row: usize) -> Vec<f32> {
    let mut out = values.to_vec();
    for chunk in out.chunks_mut(row) {
        let n = chunk.len() as f32;
        let mean = chunk.iter().sum::<f32>() / n;
        let std = (chunk.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / n).sqrt();
        let std = if std > f32::EPSILON { std } else { 1.0 };
        chunk.iter_mut().for_each(|v| *v = (*v - mean) / std);
    }
    out
}

fn softmax(values: &[f32], row: usize) -> Vec<f32> {
    let mut out = values.to_vec();
    for chunk in out.chunks_mut(row) {
        let max = chunk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        chunk.iter_mut().for_each(|v| *v = (*v - max).exp());
        let sum: f32 = chunk.iter().sum();
        chunk.iter_mut().for_each(|v| *v /= sum);
    }
    out
}

fn floats(output: &Value) -> Vec<f32> {
    output["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

fn assert_close(actual: &[f32], expected: &[f32]) {
    assert_eq!(actual.len(), expected.len());
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!((a - e).abs() <= 1e-5, "element {i}: {a} vs {e}");
    }
}

fn x_request(values: &[f32], parameters: Value) -> Value {
    json!({
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [values.len() / 64, 64], "data": values}],
        "parameters": parameters,
    })
}

/// Runs `model` (a bare model or a graph) on FP32 rows of 64; returns its response.
async fn infer_x(server: &Server, model: &str, values: &[f32], parameters: Value) -> Value {
    let url = server.url(&format!("/v2/models/{model}/infer"));
    let (status, body) = post_json(&url, &x_request(values, parameters)).await;
    assert_eq!(status, 200, "{model}: {body}\n{}", server.log());
    body
}

fn output<'a>(response: &'a Value, name: &str) -> &'a Value {
    response["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == name)
        .unwrap_or_else(|| panic!("no output {name} in {response}"))
}

const DIGITS: [&str; 10] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
];

#[tokio::test]
async fn classify_is_normalize_then_mlp_then_softmax() {
    let server = Server::start(&example_repository("classify"));
    let (status, metadata) = get_json(&server.url("/v2/models/classify")).await;
    assert_eq!(status, 200);
    assert_eq!(metadata["platform"], "weft_graph");
    assert_eq!(metadata["versions"], json!(["1"]));
    assert_eq!(
        metadata["inputs"],
        json!([{"name": "x", "datatype": "FP32", "shape": [-1, 64]}])
    );
    assert_eq!(
        metadata["outputs"],
        json!([
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
            {"name": "label", "datatype": "BYTES", "shape": [-1, 1]}
        ])
    );
    let (status, ready) = get_json(&server.url("/v2/models/classify/versions/1/ready")).await;
    assert_eq!((status, &ready["ready"]), (200, &json!(true)));

    let x = features(3);
    let graph = infer_x(&server, "classify", &x, json!({})).await;
    assert_eq!(graph["model_name"], "classify");
    assert_eq!(graph["model_version"], "1");
    let bare = infer_x(&server, "mlp", &zscore(&x, 64), json!({})).await;
    let expected = softmax(&floats(output(&bare, "y")), 10);
    let probabilities = floats(output(&graph, "probabilities"));
    assert_close(&probabilities, &expected);
    let labels: Vec<&str> = output(&graph, "label")["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let argmax: Vec<&str> = expected
        .chunks(10)
        .map(|row| {
            let best = (0..10).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
            DIGITS[best]
        })
        .collect();
    assert_eq!(labels, argmax);
    assert_eq!(output(&graph, "label")["shape"], json!([3, 1]));

    // The binary extension both ways gives the same numbers.
    let header = json!({
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [3, 64],
                    "parameters": {"binary_data_size": 3 * 64 * 4}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": true}}]
    });
    let response = post_binary(
        &server.url("/v2/models/classify/infer"),
        &header,
        &[&f32_bytes(&x)],
    )
    .await;
    assert_eq!(response.status(), 200);
    let (header, data) = split_binary(response).await;
    assert_eq!(header["outputs"].as_array().unwrap().len(), 1);
    assert_eq!(f32s(&data), probabilities);
}

#[tokio::test]
async fn trace_reports_each_node_and_on_request_its_tensors() {
    let server = Server::start(&example_repository("classify"));
    let x = features(1);
    let plain = infer_x(&server, "classify", &x, json!({})).await;
    assert!(plain["parameters"].get("trace").is_none(), "{plain}");

    let traced = infer_x(&server, "classify", &x, json!({"trace": true})).await;
    let trace = traced["parameters"]["trace"].as_array().unwrap();
    let nodes: Vec<&str> = trace.iter().map(|n| n["node"].as_str().unwrap()).collect();
    assert_eq!(nodes, ["normalize", "mlp", "softmax"]);
    assert!(trace.iter().all(|n| n["duration_us"].as_u64().is_some()));
    assert!(trace.iter().all(|n| n.get("outputs").is_none()));

    let traced = infer_x(&server, "classify", &x, json!({"trace": "tensors"})).await;
    let trace = &traced["parameters"]["trace"];
    let normalized = &trace[0]["outputs"][0];
    assert_eq!(normalized["name"], "x");
    assert_close(&floats(normalized), &zscore(&x, 64));
    let scores = &trace[1]["outputs"][0];
    assert_eq!(scores["name"], "y");
    assert_eq!(scores["shape"], json!([1, 10]));

    let (status, body) = post_json(
        &server.url("/v2/models/classify/infer"),
        &x_request(&x, json!({"trace": "loud"})),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("'trace'"),
        "{body}"
    );

    // Graph inputs are validated like a model's.
    let (status, body) = post_json(
        &server.url("/v2/models/classify/infer"),
        &json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("input 'x'"),
        "{body}"
    );
}

#[tokio::test]
async fn ensemble_averages_two_models_run_in_parallel() {
    let server = Server::start(&example_repository("ensemble"));
    let x = features(2);
    let z = zscore(&x, 64);
    let a = floats(output(&infer_x(&server, "mlp", &z, json!({})).await, "y"));
    let b = floats(output(
        &infer_x(&server, "mlp-alt", &z, json!({})).await,
        "y",
    ));
    let mean: Vec<f32> = a.iter().zip(&b).map(|(a, b)| (a + b) / 2.0).collect();
    let graph = infer_x(&server, "ensemble", &x, json!({"trace": true})).await;
    assert_close(
        &floats(output(&graph, "probabilities")),
        &softmax(&mean, 10),
    );
    let nodes: Vec<&str> = graph["parameters"]["trace"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node"].as_str().unwrap())
        .collect();
    assert_eq!(nodes.len(), 5, "{nodes:?}");
    assert_eq!(
        (nodes[0], nodes[3], nodes[4]),
        ("normalize", "mean", "softmax")
    );
}

/// The route the splitter chose, from the trace.
fn route(response: &Value) -> String {
    response["parameters"]["trace"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == "split")
        .and_then(|n| n["route"].as_str())
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn ab_route_splits_ninety_ten_and_sticks_per_user() {
    let server = Server::start(&example_repository("ab-route"));
    let x = features(1);
    let v1 = floats(output(
        &infer_x(&server, "mlp/versions/1", &x, json!({})).await,
        "y",
    ));
    let v2 = floats(output(
        &infer_x(&server, "mlp/versions/2", &x, json!({})).await,
        "y",
    ));
    assert_ne!(v1, v2);

    // Without a sticky key: about 10% to v2. 400 draws: mean 40, sd 6; allow 3.5 sd.
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..400 {
        let response = infer_x(&server, "ab-route", &x, json!({"trace": true})).await;
        let chosen = route(&response);
        let expected = if chosen == "v1" { &v1 } else { &v2 };
        assert_eq!(&floats(output(&response, "y")), expected, "route {chosen}");
        *counts.entry(chosen).or_default() += 1;
    }
    let to_v2 = counts.get("v2").copied().unwrap_or(0);
    assert!((19..=61).contains(&to_v2), "{counts:?}");

    // With `user` set, every request of a user takes one route; users spread like requests.
    let mut users_on_v2 = 0;
    for user in 0..100 {
        let parameters = json!({"trace": true, "user": format!("user-{user}")});
        let first = route(&infer_x(&server, "ab-route", &x, parameters.clone()).await);
        for _ in 0..2 {
            let again = route(&infer_x(&server, "ab-route", &x, parameters.clone()).await);
            assert_eq!(again, first, "user-{user} moved");
        }
        users_on_v2 += usize::from(first == "v2");
    }
    assert!(
        (2..=25).contains(&users_on_v2),
        "{users_on_v2} of 100 users on v2"
    );
}

#[tokio::test]
async fn text_tokenizes_scores_and_names_the_sentiment() {
    let server = Server::start(&example_repository("text"));
    let (status, metadata) = get_json(&server.url("/v2/models/text")).await;
    assert_eq!(status, 200);
    assert_eq!(
        metadata["inputs"],
        json!([{"name": "text", "datatype": "BYTES", "shape": [-1]}])
    );
    let texts = [
        "I love this, a great and excellent film",
        "awful acting and a terrible plot",
        "it was okay",
    ];
    let (status, body) = post_json(
        &server.url("/v2/models/text/infer"),
        &json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": texts}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}\n{}", server.log());
    assert_eq!(
        output(&body, "label")["data"],
        json!(["positive", "negative", "neutral"])
    );
    let probabilities = floats(output(&body, "probabilities"));
    assert_eq!(probabilities.len(), 9);
    for row in probabilities.chunks(3) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{row:?}");
    }
}

/// A repository with the classify graph, a graph whose plugin traps, and one whose model is
/// missing: the broken ones fail alone.
#[tokio::test]
async fn a_trapping_plugin_fails_its_graph_and_names_the_node_while_others_serve() {
    let trap_graph = br#"
name = "trapping"
[[input]]
name = "x"
datatype = "FP32"
shape = [-1, 64]
[[output]]
name = "y"
datatype = "FP32"
shape = [-1, 10]
from = "mlp.y"
[[node]]
name = "explode"
kind = "transformer"
plugin = "trap"
inputs = ["request"]
[[node]]
name = "mlp"
kind = "model"
model = "mlp"
inputs = ["explode"]
"#;
    let broken_graph = br#"
name = "broken"
[[input]]
name = "x"
datatype = "FP32"
shape = [-1, 64]
[[output]]
name = "y"
datatype = "FP32"
shape = [-1, 10]
from = "m.y"
[[node]]
name = "m"
kind = "model"
model = "no-such-model"
inputs = ["request"]
"#;
    let repo = Repo::new()
        .with_model(&example("classify"), "mlp")
        .with_graph("classify", "classify.toml")
        .with_plugin("normalize", "normalize")
        .with_plugin("softmax", "softmax")
        .with_plugin("runtime_trap", "trap")
        .with_file("graphs/trapping.toml", trap_graph)
        .with_file("graphs/broken.toml", broken_graph);
    let server = Server::start(repo.path());
    let x = features(1);

    let (status, body) = post_json(
        &server.url("/v2/models/trapping/infer"),
        &x_request(&x, json!({})),
    )
    .await;
    assert!((400..600).contains(&status), "{status} {body}");
    let message = body["error"].as_str().unwrap();
    assert!(message.contains("graph 'trapping'"), "{message}");
    assert!(message.contains("node 'explode'"), "{message}");

    let (status, body) = get_json(&server.url("/v2/models/broken/ready")).await;
    assert_eq!(status, 503, "{body}");
    let reason = "node 'm': unknown model 'no-such-model'";
    assert!(body["error"].as_str().unwrap().contains(reason), "{body}");
    let (_, index) = post_json(&server.url("/v2/repository/index"), &json!({})).await;
    let broken = index
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "broken")
        .unwrap();
    assert_eq!(broken["state"], "UNAVAILABLE");
    assert!(
        broken["reason"].as_str().unwrap().contains(reason),
        "{broken}"
    );

    // The healthy graph and the bare model keep serving, repeatedly.
    for _ in 0..3 {
        let graph = infer_x(&server, "classify", &x, json!({})).await;
        assert_eq!(floats(output(&graph, "probabilities")).len(), 10);
        let (status, _) = post_json(
            &server.url("/v2/models/trapping/infer"),
            &x_request(&x, json!({})),
        )
        .await;
        assert!(status >= 400);
    }
    infer_x(&server, "mlp", &x, json!({})).await;
}

/// A router *plugin* (param-router) picks a branch from a request parameter over HTTP: the
/// other branch does not run, and two versions of one repository graph serve side by side.
#[tokio::test]
async fn a_router_plugin_picks_the_branch_and_graph_versions_serve_side_by_side() {
    let routed = |version: u32, default: &str| {
        format!(
            r#"
name = "routed"
version = {version}
[[input]]
name = "x"
datatype = "FP32"
shape = [-1, 64]
[[output]]
name = "y"
datatype = "FP32"
shape = [-1, 10]
from = ["direct.y", "after_norm.y"]
[[node]]
name = "pick"
kind = "router"
plugin = "param-router"
inputs = ["request"]
routes = ["direct", "norm"]
params = {{ key = "path", default = "{default}" }}
[[node]]
name = "direct"
kind = "model"
model = "mlp"
inputs = ["pick"]
[[node]]
name = "norm"
kind = "transformer"
plugin = "normalize"
inputs = ["pick"]
[[node]]
name = "after_norm"
kind = "model"
model = "mlp"
inputs = ["norm"]
"#
        )
    };
    let repo = Repo::new()
        .with_model(&example("classify"), "mlp")
        .with_plugin("param_router", "param-router")
        .with_plugin("normalize", "normalize")
        .with_file("graphs/routed-1.toml", routed(1, "direct").as_bytes())
        .with_file("graphs/routed-2.toml", routed(2, "norm").as_bytes());
    let server = Server::start(repo.path());
    let values = features(2);
    let bare = floats(output(
        &infer_x(&server, "mlp", &values, json!({})).await,
        "y",
    ));
    let normalized = floats(output(
        &infer_x(&server, "mlp", &zscore(&values, 64), json!({})).await,
        "y",
    ));
    let ran = |response: &Value| -> (String, Vec<String>) {
        let trace = response["parameters"]["trace"].as_array().unwrap();
        let route = trace
            .iter()
            .find(|n| n["node"] == "pick")
            .and_then(|n| n["route"].as_str())
            .unwrap()
            .to_string();
        let nodes = trace
            .iter()
            .map(|n| n["node"].as_str().unwrap().to_string())
            .collect();
        (route, nodes)
    };

    for (path, nodes, expected) in [
        ("norm", vec!["pick", "norm", "after_norm"], &normalized),
        ("direct", vec!["pick", "direct"], &bare),
    ] {
        let chosen = infer_x(
            &server,
            "routed",
            &values,
            json!({"path": path, "trace": true}),
        )
        .await;
        let (route, ran_nodes) = ran(&chosen);
        assert_eq!(
            (route.as_str(), ran_nodes),
            (path, nodes.iter().map(|n| n.to_string()).collect())
        );
        assert_close(&floats(output(&chosen, "y")), expected);
    }

    // Versions: the latest (2, default "norm") unless the URL names one.
    let latest = infer_x(&server, "routed", &values, json!({"trace": true})).await;
    assert_eq!(latest["model_version"], "2");
    assert_eq!(ran(&latest).0, "norm");
    let url = server.url("/v2/models/routed/versions/1/infer");
    let (status, first) = post_json(&url, &x_request(&values, json!({"trace": true}))).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["model_version"], "1");
    assert_eq!(ran(&first).0, "direct");
    let (status, metadata) = get_json(&server.url("/v2/models/routed/versions/1")).await;
    assert_eq!(status, 200, "{metadata}");
    assert_eq!(metadata["platform"], "weft_graph");

    // A route the router does not have: the error names the node.
    let url = server.url("/v2/models/routed/infer");
    let (status, body) = post_json(&url, &x_request(&values, json!({"path": "sideways"}))).await;
    assert!(status >= 400, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("node 'pick'") && error.contains("sideways"),
        "{error}"
    );
}
