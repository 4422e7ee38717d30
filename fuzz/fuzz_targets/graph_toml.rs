//! Fuzzes graph TOML the way a tenant's push reaches it: [`GraphSpec::parse`] (default limits),
//! then [`validate`] against a small fake catalog that knows the example models and plugins, so
//! inputs that parse also get through name, datatype, rank, routing and cycle checks.
//!
//! Besides "never panics", a validated plan must be consistent: one entry per node in every
//! per-node table, dependencies in range and not on the node itself, names indexed.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use weft_core::{DataType, ModelMetadata, TensorSpec};
use weft_engine::graph::{Catalog, GraphSpec, NodeLimits, PluginRole, validate};

/// Models of examples/ and of the engine's graph tests; plugins likewise.
struct FakeCatalog;

fn spec(name: &str, datatype: DataType, shape: &[i64]) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        datatype,
        shape: shape.to_vec(),
    }
}

fn model(inputs: Vec<TensorSpec>, outputs: Vec<TensorSpec>) -> ModelMetadata {
    ModelMetadata {
        platform: "fake".into(),
        inputs,
        outputs,
        max_batch_size: 64,
    }
}

impl Catalog for FakeCatalog {
    fn model(&self, name: &str, version: Option<&str>) -> Option<ModelMetadata> {
        match (name, version) {
            ("mlp", None | Some("1") | Some("2")) | ("mlp-alt", None) => Some(model(
                vec![spec("x", DataType::Fp32, &[-1, 64])],
                vec![spec("y", DataType::Fp32, &[-1, 10])],
            )),
            ("ids", None) => Some(model(
                vec![spec("x", DataType::Int64, &[-1, 4])],
                vec![spec("y", DataType::Fp32, &[-1, 2])],
            )),
            ("sentiment", None) => Some(model(
                vec![spec("ids", DataType::Int64, &[-1, 16])],
                vec![spec("logits", DataType::Fp32, &[-1, 3])],
            )),
            ("two", None) => Some(model(
                vec![
                    spec("a", DataType::Fp32, &[-1, 4]),
                    spec("b", DataType::Bytes, &[-1]),
                ],
                vec![
                    spec("y", DataType::Fp32, &[-1, 2]),
                    spec("z", DataType::Int32, &[]),
                ],
            )),
            _ => None,
        }
    }

    fn plugin(&self, name: &str) -> Option<PluginRole> {
        match name {
            "normalize" | "softmax" | "tokenize" | "scale" | "slow" | "fail" => {
                Some(PluginRole::Transformer)
            }
            "mean-combine" | "sum" => Some(PluginRole::Combiner),
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

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("graphs/fuzz.toml");
    let Ok(spec) = GraphSpec::parse(path, text) else {
        return;
    };
    let nodes = spec.nodes.len();
    let Ok(plan) = validate(path, text, spec, &FakeCatalog) else {
        return;
    };
    assert_eq!(plan.spec.nodes.len(), nodes);
    for table in [plan.sources.len(), plan.renames.len(), plan.deps.len()] {
        assert_eq!(table, nodes);
    }
    for (node, deps) in plan.deps.iter().enumerate() {
        for &dep in deps {
            assert!(dep < nodes && dep != node, "node {node} depends on {dep}");
        }
    }
    for (index, node) in plan.spec.nodes.iter().enumerate() {
        assert_eq!(plan.index_of(&node.name), Some(index));
    }
});
