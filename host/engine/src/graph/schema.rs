//! The graph TOML schema. Unknown keys are errors; every error names the file, line and key.
//!
//! ```toml
//! name = "classify"
//! version = 1
//! deadline_ms = 1000              # the whole request, every node included
//!
//! [[input]]
//! name = "x"
//! datatype = "FP32"
//! shape = [-1, 64]
//!
//! [[output]]
//! name = "probabilities"
//! datatype = "FP32"
//! shape = [-1, 10]
//! from = "softmax.y"              # "<node>.<tensor>", or a list: the first that ran
//!
//! [[node]]
//! name = "normalize"
//! kind = "transformer"            # model | transformer | output_transformer | router | combiner
//! plugin = "normalize"
//! inputs = ["request"]            # "request", "request.<input>", "<node>", "<node>.<tensor>"
//! params = { mode = "zscore" }
//! models = []                     # models the plugin may load by name through wasi:nn
//! deadline_ms = 50                # per-node limits, within the server's (or tenant's)
//! memory_mb = 16
//!
//! [[node]]
//! name = "mlp"
//! kind = "model"
//! model = "mlp"
//! inputs = ["normalize"]
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use weft_core::{DataType, Result};

use super::limits::GraphLimits;

/// A parsed graph file.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphSpec {
    pub name: String,
    #[serde(default = "one")]
    pub version: u64,
    /// Deadline of one request through the whole graph; every node's work counts against it.
    pub deadline_ms: Option<u64>,
    #[serde(rename = "input", default)]
    pub inputs: Vec<GraphTensor>,
    #[serde(rename = "output", default)]
    pub outputs: Vec<GraphOutput>,
    #[serde(rename = "node", default)]
    pub nodes: Vec<NodeSpec>,
}

fn one() -> u64 {
    1
}

/// A declared graph input.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphTensor {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
}

/// A declared graph output and where it comes from.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphOutput {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
    /// `"<node>.<tensor>"`, or several: the first whose node ran (after a router).
    pub from: OneOrMany,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    /// How many candidates it names.
    pub fn len(&self) -> usize {
        match self {
            OneOrMany::One(_) => 1,
            OneOrMany::Many(many) => many.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn items(&self) -> Vec<&str> {
        match self {
            OneOrMany::One(one) => vec![one.as_str()],
            OneOrMany::Many(many) => many.iter().map(String::as_str).collect(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeKind {
    Model,
    Transformer,
    OutputTransformer,
    Router,
    Combiner,
}

impl NodeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeKind::Model => "model",
            NodeKind::Transformer => "transformer",
            NodeKind::OutputTransformer => "output_transformer",
            NodeKind::Router => "router",
            NodeKind::Combiner => "combiner",
        }
    }
}

/// Routers built into the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuiltinRouter {
    /// Weighted random choice (weights sum to 100), optionally sticky by a request parameter.
    Splitter,
    /// Choice by the value of a request parameter.
    Switch,
}

/// One node.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
    pub kind: NodeKind,
    /// For `model` nodes: the repository model and optional version.
    pub model: Option<String>,
    pub version: Option<String>,
    /// For plugin nodes: the plugin name.
    pub plugin: Option<String>,
    /// For `router` nodes without a plugin.
    pub builtin: Option<BuiltinRouter>,
    /// Where this node's input tensors come from.
    #[serde(default)]
    pub inputs: Vec<String>,
    /// Renames: the name this node sees = `"<node>.<tensor>"` or `"request.<input>"`.
    #[serde(default)]
    pub tensor_map: BTreeMap<String, String>,
    /// Parameters handed to the plugin: strings, numbers or booleans, which it receives as text.
    #[serde(default, deserialize_with = "scalar_params")]
    pub params: BTreeMap<String, String>,
    /// Plugin nodes: the models the plugin may open with `wasi:nn` `load-by-name`. Nothing
    /// else is reachable from inside the sandbox.
    #[serde(default)]
    pub models: Vec<String>,
    /// Router: the children it chooses among.
    #[serde(default)]
    pub routes: Vec<String>,
    /// Splitter: weight per route, summing to 100.
    #[serde(default)]
    pub weights: BTreeMap<String, u32>,
    /// Splitter: request parameter whose value pins the choice.
    pub sticky: Option<String>,
    /// Switch: request parameter to read, its cases, and the route otherwise.
    pub on: Option<String>,
    #[serde(default)]
    pub cases: BTreeMap<String, String>,
    pub default: Option<String>,
    /// Combiner: inputs whose failure is tolerated (the branch is left out).
    #[serde(default)]
    pub soft: Vec<String>,
    /// Per-node limits, within the tenant's.
    pub deadline_ms: Option<u64>,
    pub memory_mb: Option<u64>,
}

/// A param value as TOML writes it; plugins get its text.
#[derive(Deserialize)]
#[serde(untagged)]
enum Scalar {
    Text(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
}

fn scalar_params<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<BTreeMap<String, String>, D::Error> {
    let raw = BTreeMap::<String, Scalar>::deserialize(deserializer).map_err(|_| {
        serde::de::Error::custom("params values must be strings, numbers or booleans")
    })?;
    Ok(raw
        .into_iter()
        .map(|(key, value)| {
            let text = match value {
                Scalar::Text(text) => text,
                Scalar::Integer(number) => number.to_string(),
                Scalar::Float(number) => number.to_string(),
                Scalar::Bool(flag) => flag.to_string(),
            };
            (key, text)
        })
        .collect())
}

impl GraphSpec {
    /// Parses `text`, naming `path` (and toml's line, column and key) in any error, within the
    /// default [`GraphLimits`].
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        Self::parse_with_limits(path, text, &GraphLimits::default())
    }

    /// [`GraphSpec::parse`] within `limits`: the text's size and nesting are checked before
    /// the TOML parser runs, the graph's counts and sizes right after.
    pub fn parse_with_limits(path: &Path, text: &str, limits: &GraphLimits) -> Result<Self> {
        let spec: GraphSpec = crate::config::parse_toml_within(path, text, &limits.toml())?;
        limits.check(path, &spec)?;
        Ok(spec)
    }
}
