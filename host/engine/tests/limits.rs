//! Hostile graphs: a 100,000-node chain validates and runs on a 256 KiB stack (no recursion,
//! no quadratic scheduling), a long cycle is found and reported, and every graph limit refuses
//! with a message that names the limit and its value, through the same parse and validate
//! calls every server path uses.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use weft_core::{
    BoxFuture, DataType, ErrorKind, ModelMetadata, NamedTensor, RequestContext, Result, Tensor,
    TensorSpec,
};
use weft_engine::graph::{
    Catalog, GraphLimits, GraphSpec, NodeContext, NodeRunner, PluginCall, PluginReply, PluginRole,
    execute, validate,
};

/// Model `mlp` (x -> y); transformer `scale`, router `pick`; the given graph limits.
struct FakeCatalog(GraphLimits);

impl Catalog for FakeCatalog {
    fn model(&self, name: &str, _: Option<&str>) -> Option<ModelMetadata> {
        let spec = |name: &str| TensorSpec {
            name: name.into(),
            datatype: DataType::Fp32,
            shape: vec![-1, 4],
        };
        (name == "mlp").then(|| ModelMetadata {
            platform: "fake".into(),
            inputs: vec![spec("x")],
            outputs: vec![spec("y")],
            max_batch_size: 0,
        })
    }

    fn plugin(&self, name: &str) -> Option<PluginRole> {
        match name {
            "scale" => Some(PluginRole::Transformer),
            "pick" => Some(PluginRole::Router),
            _ => None,
        }
    }

    fn graph_limits(&self) -> GraphLimits {
        self.0.clone()
    }
}

const PATH: &str = "graphs/g.toml";

const HEADER: &str = r#"name = "g"
[[input]]
name = "x"
datatype = "FP32"
shape = [-1, 4]
[[output]]
name = "out"
datatype = "FP32"
shape = [-1, 4]
"#;

/// A chain `n0 <- n1 <- ... <- n{count-1}` of transformers, the output taken from the last;
/// with `cycle`, `n0` reads from the last instead of the request.
fn chain(count: usize, cycle: bool) -> String {
    let mut text = format!("{HEADER}from = \"n{}.x\"\n", count - 1);
    for i in 0..count {
        let input = match (i, cycle) {
            (0, false) => "request".to_string(),
            (0, true) => format!("n{}", count - 1),
            (i, _) => format!("n{}", i - 1),
        };
        write!(
            text,
            "[[node]]\nname = \"n{i}\"\nkind = \"transformer\"\nplugin = \"scale\"\ninputs = [\"{input}\"]\n"
        )
        .unwrap();
    }
    text
}

/// Runs `work` on a thread with a 256 KiB stack: it overflows if anything recurses per node.
fn on_small_stack<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(256 << 10)
        .spawn(work)
        .unwrap()
        .join()
        .expect("the work overflowed its small stack or panicked")
}

/// Passes tensors through: every node of a chain is one plugin call.
struct Echo;

impl NodeRunner for Echo {
    fn model<'a>(
        &'a self,
        _: &'a RequestContext,
        _: &'a str,
        _: Option<&'a str>,
        inputs: Vec<NamedTensor>,
    ) -> BoxFuture<'a, Result<Vec<NamedTensor>>> {
        Box::pin(async move { Ok(inputs) })
    }

    fn plugin<'a>(
        &'a self,
        _: &'a RequestContext,
        _: &'a NodeContext,
        call: PluginCall<'a>,
    ) -> BoxFuture<'a, Result<PluginReply>> {
        Box::pin(async move {
            match call {
                PluginCall::Transform { inputs, .. } | PluginCall::Route { inputs, .. } => {
                    Ok(PluginReply::Tensors(inputs))
                }
                PluginCall::Combine { .. } => Ok(PluginReply::Tensors(Vec::new())),
            }
        })
    }
}

#[test]
fn a_100000_node_chain_validates_and_runs_without_recursion() {
    const NODES: usize = 100_000;
    let text = chain(NODES, false);
    // Far past the defaults, which refuse it outright.
    let error = GraphSpec::parse(Path::new(PATH), &text).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::InvalidArgument);
    assert!(
        error.to_string().contains("graph.max_toml_bytes"),
        "{error}"
    );
    let spec =
        GraphSpec::parse_with_limits(Path::new(PATH), &text, &GraphLimits::unlimited()).unwrap();
    let executed = on_small_stack(move || {
        let catalog = FakeCatalog(GraphLimits::unlimited());
        let plan = validate(Path::new(PATH), &text, spec, &catalog).unwrap();
        assert_eq!(plan.deps.len(), NODES);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let data: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let x = Tensor::new(DataType::Fp32, vec![1, 4], Bytes::from(data)).unwrap();
        let inputs = vec![NamedTensor::new("x", x)];
        let params = BTreeMap::new();
        let request = RequestContext::background();
        let run = execute(
            &plan,
            &Echo,
            &request,
            inputs,
            &params,
            Duration::from_secs(120),
        );
        runtime.block_on(Box::pin(run)).unwrap()
    });
    assert_eq!(executed.trace.len(), NODES);
    assert_eq!(executed.outputs[0].name, "out");
}

#[test]
fn a_100000_node_cycle_is_found_and_reported_without_recursion() {
    let text = chain(100_000, true);
    let spec =
        GraphSpec::parse_with_limits(Path::new(PATH), &text, &GraphLimits::unlimited()).unwrap();
    let error = on_small_stack(move || {
        let catalog = FakeCatalog(GraphLimits::unlimited());
        validate(Path::new(PATH), &text, spec, &catalog).unwrap_err()
    });
    let error = error.to_string();
    // n0's `name` is on line 12 of the text.
    assert!(
        error.starts_with("graphs/g.toml:12: node 'n0': is in a cycle: n0 -> n1 -> n2 -> "),
        "{error}"
    );
    assert!(
        error.contains("-> n15 -> ... (99969 more) ... -> n99985 -> "),
        "{error}"
    );
    assert!(error.ends_with("-> n99998 -> n99999 -> n0"), "{error}");
}

#[test]
fn a_long_cycle_within_the_limits_is_reported_in_full_or_abridged() {
    let path = Path::new(PATH);
    let catalog = FakeCatalog(GraphLimits::default());
    let text = chain(5, true);
    let spec = GraphSpec::parse(path, &text).unwrap();
    let error = validate(path, &text, spec, &catalog).unwrap_err();
    assert_eq!(
        error.to_string(),
        "graphs/g.toml:12: node 'n0': is in a cycle: n0 -> n1 -> n2 -> n3 -> n4 -> n0"
    );
    let text = chain(1_000, true);
    let spec = GraphSpec::parse(path, &text).unwrap();
    let error = validate(path, &text, spec, &catalog)
        .unwrap_err()
        .to_string();
    assert!(error.contains("is in a cycle: n0 -> n1 -> "), "{error}");
    assert!(error.contains("(969 more)"), "{error}");
    assert!(error.ends_with("n998 -> n999 -> n0"), "{error}");
}

/// The error of parsing and validating `text` with the default limits.
fn refusal(text: &str) -> String {
    let path = Path::new(PATH);
    let result = GraphSpec::parse(path, text)
        .and_then(|spec| validate(path, text, spec, &FakeCatalog(GraphLimits::default())));
    let error = result.expect_err("over a limit");
    assert_eq!(error.kind(), ErrorKind::InvalidArgument, "{error}");
    error.to_string()
}

/// One node reading the request, with `extra` TOML lines in its table.
fn one_node(extra: &str) -> String {
    format!(
        "{HEADER}from = \"n0.x\"\n[[node]]\nname = \"n0\"\nkind = \"transformer\"\nplugin = \"scale\"\ninputs = [\"request\"]\n{extra}\n"
    )
}

fn list(count: usize, item: impl Fn(usize) -> String) -> String {
    (0..count).map(item).collect::<Vec<_>>().join(", ")
}

#[test]
fn the_toml_is_bounded_before_it_is_parsed() {
    let padded = format!("{}# {}\n", chain(2, false), "x".repeat(1 << 20));
    let error = refusal(&padded);
    assert_eq!(
        error,
        format!(
            "graphs/g.toml: the file is {} bytes; the limit is 1048576 (graph.max_toml_bytes)",
            padded.len()
        )
    );
    let deep = one_node(&format!(
        "params = {{ a = {}1{} }}",
        "[".repeat(16),
        "]".repeat(16)
    ));
    assert_eq!(
        refusal(&deep),
        "graphs/g.toml: line 16: arrays and tables nest 17 deep; the limit is 16 \
         (graph.max_toml_depth)"
    );
    // A million brackets (no recursion in the scan; refused at the 17th).
    let deeper = one_node(&format!("params = {{ a = {} }}", "[".repeat(1_000_000)));
    assert!(refusal(&deeper).contains("(graph.max_toml_depth)"));
    // Brackets in strings and comments do not nest.
    let quoted = one_node(&format!(
        "params = {{ a = \"{0}\", b = '{0}', c = \"\"\"{0}\"\"\" }} # {0}",
        "[{".repeat(40)
    ));
    let spec = GraphSpec::parse(Path::new(PATH), &quoted).unwrap();
    assert_eq!(spec.nodes[0].params.len(), 3);
}

#[test]
fn each_graph_limit_refuses_with_its_name_and_value() {
    let cases: Vec<(String, String)> = vec![
        (
            chain(1_001, false),
            "graph has 1001 nodes; the limit is 1000 (graph.max_nodes)".into(),
        ),
        (
            {
                let mut text = chain(200, false);
                let many = list(60, |_| "\"request\"".into());
                text = text.replace("inputs = [\"request\"]", &format!("inputs = [{many}]"));
                for i in 0..199 {
                    text = text.replace(
                        &format!("inputs = [\"n{i}\"]\n"),
                        &format!("inputs = [\"n{i}\", {many}]\n"),
                    );
                }
                text
            },
            "graph has 12200 edges; the limit is 10000 (graph.max_edges)".into(),
        ),
        (
            one_node(&format!(
                "tensor_map = {{ {} }}",
                list(65, |i| format!("t{i} = \"request.x\""))
            )),
            "node 'n0' has 65 tensor_map entries; the limit is 64 (graph.max_tensor_map_entries)"
                .into(),
        ),
        (
            one_node(&format!("models = [{}]", list(65, |_| "\"mlp\"".into()))),
            "node 'n0' has 65 models; the limit is 64 (graph.max_models_per_node)".into(),
        ),
        (
            one_node(&format!("routes = [{}]", list(65, |i| format!("\"r{i}\"")))),
            "node 'n0' has 65 routes; the limit is 64 (graph.max_routes_per_node)".into(),
        ),
        (
            one_node(&format!(
                "weights = {{ {} }}",
                list(65, |i| format!("r{i} = 1"))
            )),
            "node 'n0' has 65 weights; the limit is 64 (graph.max_routes_per_node)".into(),
        ),
        (
            one_node(&format!(
                "cases = {{ {} }}",
                list(65, |i| format!("c{i} = \"r\""))
            )),
            "node 'n0' has 65 cases; the limit is 64 (graph.max_routes_per_node)".into(),
        ),
        (
            one_node(&format!(
                "params = {{ {} }}",
                list(257, |i| format!("p{i} = 1"))
            )),
            "node 'n0' has 257 params; the limit is 256 (graph.max_params_per_node)".into(),
        ),
        (
            one_node(&format!("params = {{ p = \"{}\" }}", "v".repeat(65_536))),
            "node 'n0' has 65537 bytes of params; the limit is 65536 \
             (graph.max_params_bytes_per_node)"
                .into(),
        ),
        (
            // 9 bytes of TOML become 301 bytes of text (floats are written out in full): 18
            // nodes of 200 such params stay under 64 KiB each but not under 1 MiB together.
            {
                let params = format!(
                    "params = {{ {} }}",
                    list(200, |i| format!("p{i:03} = 1e300"))
                );
                chain(18, false).replace(
                    "plugin = \"scale\"\n",
                    &format!("plugin = \"scale\"\n{params}\n"),
                )
            },
            "graph has 1098000 bytes of params; the limit is 1048576 (graph.max_params_bytes)"
                .into(),
        ),
        (
            {
                let inputs: String = (0..257)
                    .map(|i| {
                        format!("[[input]]\nname = \"i{i}\"\ndatatype = \"FP32\"\nshape = [1]\n")
                    })
                    .collect();
                format!("{}{inputs}", chain(1, false))
            },
            "graph has 258 inputs; the limit is 256 (graph.max_graph_inputs)".into(),
        ),
        (
            {
                let outputs: String = (0..256)
                    .map(|i| {
                        format!(
                            "[[output]]\nname = \"o{i}\"\ndatatype = \"FP32\"\nshape = [1]\nfrom = \"n0.x\"\n"
                        )
                    })
                    .collect();
                format!("{}{outputs}", chain(1, false))
            },
            "graph has 257 outputs; the limit is 256 (graph.max_graph_outputs)".into(),
        ),
        (
            chain(1, false).replace(
                "from = \"n0.x\"",
                &format!("from = [{}]", list(65, |_| "\"n0.x\"".into())),
            ),
            "output 'out' has 65 sources in `from`; the limit is 64 (graph.max_output_sources)"
                .into(),
        ),
        (
            chain(1, false).replace(
                "shape = [-1, 4]\n[[output]]",
                &format!("shape = [{}]\n[[output]]", list(33, |_| "1".into())),
            ),
            "input 'x' has 33 dimensions; the limit is 32 (graph.max_rank)".into(),
        ),
        (
            chain(1, false).replace("n0", &"n".repeat(257)),
            format!(
                "output 'out': '{}...' is 259 bytes; the limit is 256 (graph.max_name_bytes)",
                "n".repeat(64)
            ),
        ),
        (
            one_node(&format!("models = [\"{}\"]", "m".repeat(300))),
            format!(
                "node 'n0': '{}...' is 300 bytes; the limit is 256 (graph.max_name_bytes)",
                "m".repeat(64)
            ),
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(refusal(&text), format!("{PATH}: {expected}"));
    }
    // A node's inputs, checked before the graph's edges.
    let wide = one_node("").replace(
        "inputs = [\"request\"]",
        &format!("inputs = [{}]", list(65, |_| "\"request\"".into())),
    );
    assert_eq!(
        refusal(&wide),
        format!("{PATH}: node 'n0' has 65 inputs; the limit is 64 (graph.max_inputs_per_node)")
    );
}

#[test]
fn validate_applies_the_limits_to_a_spec_parsed_without_them() {
    let text = chain(1_001, false);
    let path = Path::new(PATH);
    let spec = GraphSpec::parse_with_limits(path, &text, &GraphLimits::unlimited()).unwrap();
    let error = validate(path, &text, spec, &FakeCatalog(GraphLimits::default())).unwrap_err();
    assert_eq!(
        error.to_string(),
        "graphs/g.toml: graph has 1001 nodes; the limit is 1000 (graph.max_nodes)"
    );
    // And a catalog may lower them.
    let small = GraphLimits {
        max_nodes: 2,
        ..GraphLimits::default()
    };
    let text = chain(3, false);
    let spec = GraphSpec::parse(path, &text).unwrap();
    let error = validate(path, &text, spec, &FakeCatalog(small)).unwrap_err();
    assert_eq!(
        error.to_string(),
        "graphs/g.toml: graph has 3 nodes; the limit is 2 (graph.max_nodes)"
    );
}
