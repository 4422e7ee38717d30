//! Graph limits: how big a graph a tenant may declare, checked before any expensive work.
//!
//! Every graph TOML reaches the engine from someone who may be hostile: a dry run, a saved
//! tenant graph or a repository graph loaded at startup. The byte size and the bracket nesting
//! of the text are checked before the TOML parser sees it ([`crate::config::parse_toml_within`]);
//! node, edge, fan-out, params and name sizes right after parsing ([`GraphSpec::parse`]) and
//! again first thing in [`validate`](super::validate::validate), so a spec built any other way
//! is bounded too. Each check is linear in the input and each rejection is an
//! `InvalidArgument` (HTTP 400) whose message names the limit and its value:
//! `graph has 100000 nodes; the limit is 1000 (graph.max_nodes)`.
//!
//! The defaults apply everywhere today. To make them configurable, the server passes its own
//! [`GraphLimits`] to [`GraphSpec::parse_with_limits`] and returns them from
//! [`Catalog::graph_limits`](super::validate::Catalog::graph_limits).

use std::path::Path;

use weft_core::{Error, Result};

use super::schema::GraphSpec;

/// The most a graph may declare. Every field is checked; see the module documentation for where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GraphLimits {
    /// Bytes of graph TOML, checked before parsing (`graph.max_toml_bytes`, default 1 MiB).
    pub max_toml_bytes: usize,
    /// Deepest nesting of arrays and inline tables (`[` and `{`, table headers included) in the
    /// TOML, checked by a linear scan before parsing (`graph.max_toml_depth`, default 16). A
    /// graph needs 2.
    pub max_toml_depth: usize,
    /// `[[node]]` tables (`graph.max_nodes`, default 1,000).
    pub max_nodes: usize,
    /// References to a source across the graph: every node's `inputs` and `tensor_map`
    /// entries plus every output's `from` entries (`graph.max_edges`, default 10,000).
    pub max_edges: usize,
    /// Entries of one node's `inputs` (`graph.max_inputs_per_node`, default 64); `soft` may
    /// not be longer either.
    pub max_inputs_per_node: usize,
    /// Entries of one node's `tensor_map` (`graph.max_tensor_map_entries`, default 64).
    pub max_tensor_map_entries: usize,
    /// Entries of one node's `routes`, `weights` and `cases`, each
    /// (`graph.max_routes_per_node`, default 64).
    pub max_routes_per_node: usize,
    /// Entries of one node's `models` grants (`graph.max_models_per_node`, default 64).
    pub max_models_per_node: usize,
    /// Entries of one node's `params` (`graph.max_params_per_node`, default 256).
    pub max_params_per_node: usize,
    /// Bytes of one node's `params`, keys and values as the plugin receives them
    /// (`graph.max_params_bytes_per_node`, default 64 KiB).
    pub max_params_bytes_per_node: usize,
    /// Bytes of all nodes' `params` together (`graph.max_params_bytes`, default 1 MiB).
    pub max_params_bytes: usize,
    /// `[[input]]` tables (`graph.max_graph_inputs`, default 256).
    pub max_graph_inputs: usize,
    /// `[[output]]` tables (`graph.max_graph_outputs`, default 256).
    pub max_graph_outputs: usize,
    /// Candidates in one output's `from` (`graph.max_output_sources`, default 64).
    pub max_output_sources: usize,
    /// Dimensions of a declared input's or output's `shape` (`graph.max_rank`, default 32).
    pub max_rank: usize,
    /// Bytes of any one name or reference: the graph's, a node's, a tensor's, a plugin's, a
    /// model's, a version, a params key, a case, `"<node>.<tensor>"`
    /// (`graph.max_name_bytes`, default 256).
    pub max_name_bytes: usize,
}

impl Default for GraphLimits {
    fn default() -> Self {
        GraphLimits {
            max_toml_bytes: 1 << 20,
            max_toml_depth: 16,
            max_nodes: 1_000,
            max_edges: 10_000,
            max_inputs_per_node: 64,
            max_tensor_map_entries: 64,
            max_routes_per_node: 64,
            max_models_per_node: 64,
            max_params_per_node: 256,
            max_params_bytes_per_node: 64 << 10,
            max_params_bytes: 1 << 20,
            max_graph_inputs: 256,
            max_graph_outputs: 256,
            max_output_sources: 64,
            max_rank: 32,
            max_name_bytes: 256,
        }
    }
}

/// `"<what> has <count> <unit>; the limit is <limit> (graph.<key>)"`, prefixed with the path.
fn over(path: &Path, what: &str, count: usize, unit: &str, limit: usize, key: &str) -> Error {
    Error::invalid(format!(
        "{}: {what} has {count} {unit}; the limit is {limit} (graph.{key})",
        path.display()
    ))
}

/// At most 64 bytes of `name` (on a character boundary), for naming an oversized thing without
/// echoing all of it.
fn shortened(name: &str) -> String {
    if name.len() <= 64 {
        return name.to_string();
    }
    let mut end = 64;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &name[..end])
}

impl GraphLimits {
    /// No limit at all: for tests that prove an algorithm stays linear and non-recursive on
    /// inputs far past the defaults. Never serve with these.
    pub fn unlimited() -> Self {
        GraphLimits {
            max_toml_bytes: usize::MAX,
            max_toml_depth: usize::MAX,
            max_nodes: usize::MAX,
            max_edges: usize::MAX,
            max_inputs_per_node: usize::MAX,
            max_tensor_map_entries: usize::MAX,
            max_routes_per_node: usize::MAX,
            max_models_per_node: usize::MAX,
            max_params_per_node: usize::MAX,
            max_params_bytes_per_node: usize::MAX,
            max_params_bytes: usize::MAX,
            max_graph_inputs: usize::MAX,
            max_graph_outputs: usize::MAX,
            max_output_sources: usize::MAX,
            max_rank: usize::MAX,
            max_name_bytes: usize::MAX,
        }
    }

    /// The TOML bounds for [`crate::config::parse_toml_within`].
    pub fn toml(&self) -> crate::config::TomlLimits {
        crate::config::TomlLimits {
            max_bytes: self.max_toml_bytes,
            bytes_key: "graph.max_toml_bytes",
            max_depth: self.max_toml_depth,
            depth_key: "graph.max_toml_depth",
        }
    }

    /// Checks the counts and sizes of a parsed graph; linear in its size, counts first so an
    /// oversized graph is refused before its contents are walked.
    pub fn check(&self, path: &Path, spec: &GraphSpec) -> Result<()> {
        let graph = "graph";
        if spec.nodes.len() > self.max_nodes {
            let count = spec.nodes.len();
            return Err(over(
                path,
                graph,
                count,
                "nodes",
                self.max_nodes,
                "max_nodes",
            ));
        }
        if spec.inputs.len() > self.max_graph_inputs {
            let (count, limit) = (spec.inputs.len(), self.max_graph_inputs);
            return Err(over(
                path,
                graph,
                count,
                "inputs",
                limit,
                "max_graph_inputs",
            ));
        }
        if spec.outputs.len() > self.max_graph_outputs {
            let (count, limit) = (spec.outputs.len(), self.max_graph_outputs);
            return Err(over(
                path,
                graph,
                count,
                "outputs",
                limit,
                "max_graph_outputs",
            ));
        }
        let edges = spec
            .nodes
            .iter()
            .map(|node| node.inputs.len().saturating_add(node.tensor_map.len()))
            .chain(spec.outputs.iter().map(|output| output.from.len()))
            .fold(0usize, usize::saturating_add);
        if edges > self.max_edges {
            return Err(over(
                path,
                graph,
                edges,
                "edges",
                self.max_edges,
                "max_edges",
            ));
        }
        let name = |whose: &str, text: &str| -> Result<()> {
            if text.len() > self.max_name_bytes {
                return Err(Error::invalid(format!(
                    "{}: {whose}'{}' is {} bytes; the limit is {} (graph.max_name_bytes)",
                    path.display(),
                    shortened(text),
                    text.len(),
                    self.max_name_bytes
                )));
            }
            Ok(())
        };
        name("the graph name ", &spec.name)?;
        let declared = spec
            .inputs
            .iter()
            .map(|input| ("input", &input.name, input.shape.len()))
            .chain(
                spec.outputs
                    .iter()
                    .map(|output| ("output", &output.name, output.shape.len())),
            );
        for (what, tensor, rank) in declared {
            name(&format!("{what} "), tensor)?;
            if rank > self.max_rank {
                let what = format!("{what} '{tensor}'");
                return Err(over(
                    path,
                    &what,
                    rank,
                    "dimensions",
                    self.max_rank,
                    "max_rank",
                ));
            }
        }
        for output in &spec.outputs {
            let count = output.from.len();
            if count > self.max_output_sources {
                let what = format!("output '{}'", output.name);
                let (limit, key) = (self.max_output_sources, "max_output_sources");
                return Err(over(path, &what, count, "sources in `from`", limit, key));
            }
            let whose = format!("output '{}': ", output.name);
            for from in output.from.items() {
                name(&whose, from)?;
            }
        }
        let mut params_total = 0usize;
        for node in &spec.nodes {
            name("node ", &node.name)?;
            let what = format!("node '{}'", node.name);
            let counts = [
                (
                    node.inputs.len(),
                    "inputs",
                    self.max_inputs_per_node,
                    "max_inputs_per_node",
                ),
                (
                    node.soft.len(),
                    "soft inputs",
                    self.max_inputs_per_node,
                    "max_inputs_per_node",
                ),
                (
                    node.tensor_map.len(),
                    "tensor_map entries",
                    self.max_tensor_map_entries,
                    "max_tensor_map_entries",
                ),
                (
                    node.routes.len(),
                    "routes",
                    self.max_routes_per_node,
                    "max_routes_per_node",
                ),
                (
                    node.weights.len(),
                    "weights",
                    self.max_routes_per_node,
                    "max_routes_per_node",
                ),
                (
                    node.cases.len(),
                    "cases",
                    self.max_routes_per_node,
                    "max_routes_per_node",
                ),
                (
                    node.models.len(),
                    "models",
                    self.max_models_per_node,
                    "max_models_per_node",
                ),
                (
                    node.params.len(),
                    "params",
                    self.max_params_per_node,
                    "max_params_per_node",
                ),
            ];
            for (count, unit, limit, key) in counts {
                if count > limit {
                    return Err(over(path, &what, count, unit, limit, key));
                }
            }
            let params_bytes = node
                .params
                .iter()
                .map(|(key, value)| key.len().saturating_add(value.len()))
                .fold(0usize, usize::saturating_add);
            if params_bytes > self.max_params_bytes_per_node {
                let limit = self.max_params_bytes_per_node;
                let key = "max_params_bytes_per_node";
                return Err(over(
                    path,
                    &what,
                    params_bytes,
                    "bytes of params",
                    limit,
                    key,
                ));
            }
            params_total = params_total.saturating_add(params_bytes);
            if params_total > self.max_params_bytes {
                let limit = self.max_params_bytes;
                return Err(over(
                    path,
                    graph,
                    params_total,
                    "bytes of params",
                    limit,
                    "max_params_bytes",
                ));
            }
            let names = [
                &node.model,
                &node.version,
                &node.plugin,
                &node.sticky,
                &node.on,
                &node.default,
            ];
            let whose = format!("node '{}': ", node.name);
            for text in names.into_iter().flatten() {
                name(&whose, text)?;
            }
            let listed = node
                .inputs
                .iter()
                .chain(&node.soft)
                .chain(&node.routes)
                .chain(&node.models)
                .chain(node.tensor_map.keys())
                .chain(node.tensor_map.values())
                .chain(node.weights.keys())
                .chain(node.cases.keys())
                .chain(node.cases.values())
                .chain(node.params.keys());
            for text in listed {
                name(&whose, text)?;
            }
        }
        Ok(())
    }
}
