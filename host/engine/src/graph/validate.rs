//! Graph validation: turns a parsed [`GraphSpec`] into an executable [`GraphPlan`], or an error
//! that names the file, the line of the node, the node and the reason.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use weft_core::{DataType, Error, ModelMetadata, Result};

use super::schema::{BuiltinRouter, GraphSpec, NodeKind, NodeSpec};

/// What a plugin's component exports, as the engine needs to know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PluginRole {
    Transformer,
    Combiner,
    Router,
}

impl PluginRole {
    pub fn as_str(self) -> &'static str {
        match self {
            PluginRole::Transformer => "transformer",
            PluginRole::Combiner => "combiner",
            PluginRole::Router => "router",
        }
    }
}

/// What validation may look up: the models and plugins visible to the graph's owner.
pub trait Catalog {
    fn model(&self, name: &str, version: Option<&str>) -> Option<ModelMetadata>;
    fn plugin(&self, name: &str) -> Option<PluginRole>;
    /// The most a node may ask for; `None` means no ceiling is known (a dry run).
    fn node_limits(&self) -> Option<NodeLimits> {
        None
    }
}

/// Ceilings for per-node `deadline_ms` and `memory_mb`: the server's, later the tenant's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeLimits {
    pub deadline_ms: u64,
    pub memory_mb: u64,
}

/// Where a node's input comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// All request inputs, or one by name.
    Request(Option<String>),
    /// All outputs of a node, or one by name.
    Node(usize, Option<String>),
}

/// A validated graph, ready to execute.
#[derive(Clone, Debug)]
pub struct GraphPlan {
    pub spec: GraphSpec,
    /// Per node (same order as `spec.nodes`): its sources, and the nodes it waits for.
    pub sources: Vec<Vec<Source>>,
    pub renames: Vec<Vec<(String, Source)>>,
    pub deps: Vec<Vec<usize>>,
    /// Per graph output: candidate sources in order.
    pub outputs: Vec<Vec<Source>>,
}

impl GraphPlan {
    pub fn index_of(&self, node: &str) -> Option<usize> {
        self.spec.nodes.iter().position(|n| n.name == node)
    }
}

struct Checker<'a> {
    path: &'a Path,
    text: &'a str,
    spec: &'a GraphSpec,
    index: HashMap<&'a str, usize>,
}

/// The 1-based line of the `occurrence`-th (from 0) `name = "<name>"` inside a `[[node]]` table
/// (sub-tables such as `[node.params]` included), or 0 when the text has none.
fn node_line(text: &str, name: &str, occurrence: usize) -> usize {
    table_line(text, "node", name, occurrence)
}

/// [`node_line`] for any array of tables (`[[node]]`, `[[output]]`, `[[input]]`).
fn table_line(text: &str, table: &str, name: &str, occurrence: usize) -> usize {
    let needle = format!("\"{name}\"");
    let header = format!("[[{table}]]");
    let sub_table = format!("[{table}.");
    let mut inside = false;
    text.lines()
        .enumerate()
        .filter(|(_, line)| {
            let line = line.trim_start();
            if line.starts_with('[') {
                inside = line.starts_with(&header) || line.starts_with(&sub_table);
                return false;
            }
            inside && line.starts_with("name") && line.contains(&needle)
        })
        .nth(occurrence)
        .map_or(0, |(i, _)| i + 1)
}

impl Checker<'_> {
    /// `file:line: node 'x': reason`, with the line of the node's `name = "x"` inside a
    /// `[[node]]` table (an input or output of the same name does not count).
    fn node_error(&self, node: &NodeSpec, reason: impl std::fmt::Display) -> Error {
        let line = node_line(self.text, &node.name, 0);
        Error::invalid(format!(
            "{}:{line}: node '{}': {reason}",
            self.path.display(),
            node.name
        ))
    }

    /// `file:line: output 'x': reason`, with the line of the `[[output]]`'s `name = "x"`.
    fn output_error(&self, output: &str, reason: impl std::fmt::Display) -> Error {
        let line = table_line(self.text, "output", output, 0);
        Error::invalid(format!(
            "{}:{line}: output '{output}': {reason}",
            self.path.display()
        ))
    }

    fn graph_error(&self, reason: impl std::fmt::Display) -> Error {
        Error::invalid(format!("{}: {reason}", self.path.display()))
    }

    /// Parses `request`, `request.x`, `node` or `node.x`.
    fn source(&self, node: Option<&NodeSpec>, text: &str) -> Result<Source> {
        let (head, tail) = match text.split_once('.') {
            Some((head, tail)) => (head, Some(tail.to_string())),
            None => (text, None),
        };
        if head == "request" {
            if let Some(name) = &tail
                && !self.spec.inputs.iter().any(|i| &i.name == name)
            {
                let reason = format!("'{text}' names no graph input");
                return Err(node.map_or_else(
                    || self.graph_error(&reason),
                    |n| self.node_error(n, &reason),
                ));
            }
            return Ok(Source::Request(tail));
        }
        match self.index.get(head) {
            Some(&index) => Ok(Source::Node(index, tail)),
            None => {
                let reason = format!("unknown node '{head}' in '{text}'");
                Err(node.map_or_else(
                    || self.graph_error(&reason),
                    |n| self.node_error(n, &reason),
                ))
            }
        }
    }
}

/// Validates `spec` (parsed from `text` at `path`) against `catalog`.
pub fn validate(
    path: &Path,
    text: &str,
    spec: GraphSpec,
    catalog: &dyn Catalog,
) -> Result<GraphPlan> {
    let mut index = HashMap::new();
    let checker_spec = spec.clone();
    for (i, node) in checker_spec.nodes.iter().enumerate() {
        if node.name == "request" || node.name.contains('.') {
            return Err(Error::invalid(format!(
                "{}:{}: node '{}': names may not be 'request' or contain '.'",
                path.display(),
                node_line(text, &node.name, 0),
                node.name
            )));
        }
        if index.insert(node.name.as_str(), i).is_some() {
            return Err(Error::invalid(format!(
                "{}:{}: duplicate node name '{}'",
                path.display(),
                node_line(text, &node.name, 1),
                node.name
            )));
        }
    }
    let checker = Checker {
        path,
        text,
        spec: &checker_spec,
        index,
    };
    for (names, what) in [
        (
            checker_spec
                .inputs
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>(),
            "input",
        ),
        (
            checker_spec
                .outputs
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>(),
            "output",
        ),
    ] {
        let mut seen = HashSet::new();
        if let Some(duplicate) = names.iter().find(|n| !seen.insert(**n)) {
            return Err(checker.graph_error(format!("duplicate graph {what} '{duplicate}'")));
        }
    }

    let mut sources = Vec::new();
    let mut renames = Vec::new();
    let mut deps = Vec::new();
    for node in &checker_spec.nodes {
        check_kind(&checker, node, catalog)?;
        check_grants_and_limits(&checker, node, catalog)?;
        if node.inputs.is_empty() {
            return Err(checker.node_error(node, "has no inputs"));
        }
        let node_sources = node
            .inputs
            .iter()
            .map(|input| checker.source(Some(node), input))
            .collect::<Result<Vec<_>>>()?;
        let node_renames = node
            .tensor_map
            .iter()
            .map(|(to, from)| Ok((to.clone(), checker.source(Some(node), from)?)))
            .collect::<Result<Vec<_>>>()?;
        for listed in node.routes.iter().chain(&node.soft) {
            if !checker.index.contains_key(listed.as_str()) {
                return Err(checker.node_error(node, format!("unknown node '{listed}'")));
            }
        }
        for soft in &node.soft {
            if !node.inputs.contains(soft) {
                return Err(checker.node_error(
                    node,
                    format!("soft dependency '{soft}' is not one of its inputs"),
                ));
            }
        }
        let mut node_deps: Vec<usize> = node_sources
            .iter()
            .chain(node_renames.iter().map(|(_, s)| s))
            .filter_map(|s| match s {
                Source::Node(i, _) => Some(*i),
                Source::Request(_) => None,
            })
            .collect();
        node_deps.sort_unstable();
        node_deps.dedup();
        sources.push(node_sources);
        renames.push(node_renames);
        deps.push(node_deps);
    }
    let outputs = checker_spec
        .outputs
        .iter()
        .map(|output| {
            output
                .from
                .items()
                .into_iter()
                .map(|from| checker.source(None, from))
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<Vec<_>>>()?;

    if checker_spec.deadline_ms == Some(0) {
        return Err(checker.graph_error("`deadline_ms` must be above 0"));
    }
    check_routes_follow_their_router(&checker, &deps)?;
    check_cycles(&checker, &deps)?;
    check_reachable(&checker, &deps, &outputs)?;
    check_model_types(&checker, &sources, &renames, catalog)?;
    check_model_outputs(&checker, &sources, &renames, &outputs, catalog)?;
    Ok(GraphPlan {
        spec,
        sources,
        renames,
        deps,
        outputs,
    })
}

/// "a transformer", "an output_transformer".
fn article(kind: NodeKind) -> String {
    let name = kind.as_str();
    let article = if name.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {name}")
}

fn check_kind(checker: &Checker<'_>, node: &NodeSpec, catalog: &dyn Catalog) -> Result<()> {
    let expect_role = |role: PluginRole| -> Result<()> {
        let Some(plugin) = &node.plugin else {
            return Err(
                checker.node_error(node, format!("{} node needs `plugin`", article(node.kind)))
            );
        };
        match catalog.plugin(plugin) {
            None => Err(checker.node_error(node, format!("unknown plugin '{plugin}'"))),
            Some(found) if found != role => Err(checker.node_error(
                node,
                format!(
                    "plugin '{plugin}' is a {} but {} node needs a {}",
                    found.as_str(),
                    article(node.kind),
                    role.as_str()
                ),
            )),
            Some(_) => Ok(()),
        }
    };
    match node.kind {
        NodeKind::Model => {
            let Some(model) = &node.model else {
                return Err(checker.node_error(node, "a model node needs `model`"));
            };
            if catalog.model(model, node.version.as_deref()).is_none() {
                let version = node
                    .version
                    .as_deref()
                    .map(|v| format!(" version {v}"))
                    .unwrap_or_default();
                return Err(checker.node_error(node, format!("unknown model '{model}'{version}")));
            }
            Ok(())
        }
        NodeKind::Transformer | NodeKind::OutputTransformer => expect_role(PluginRole::Transformer),
        NodeKind::Combiner => expect_role(PluginRole::Combiner),
        NodeKind::Router => {
            if node.routes.is_empty() {
                return Err(checker.node_error(node, "a router needs `routes`"));
            }
            match (&node.plugin, node.builtin) {
                (Some(_), Some(_)) => {
                    Err(checker
                        .node_error(node, "a router has either `plugin` or `builtin`, not both"))
                }
                (None, None) => {
                    Err(checker.node_error(node, "a router needs `plugin` or `builtin`"))
                }
                (Some(_), None) => expect_role(PluginRole::Router),
                (None, Some(BuiltinRouter::Splitter)) => {
                    let sum: u32 = node.weights.values().sum();
                    let unknown = node.weights.keys().find(|k| !node.routes.contains(k));
                    if let Some(unknown) = unknown {
                        return Err(checker.node_error(
                            node,
                            format!("weight for '{unknown}', which is not one of its routes"),
                        ));
                    }
                    if sum != 100 {
                        return Err(checker
                            .node_error(node, format!("splitter weights sum to {sum}, not 100")));
                    }
                    Ok(())
                }
                (None, Some(BuiltinRouter::Switch)) => {
                    if node.on.is_none() {
                        return Err(checker.node_error(
                            node,
                            "a switch needs `on` (the request parameter to read)",
                        ));
                    }
                    let targets = node.cases.values().chain(node.default.as_ref());
                    for target in targets {
                        if !node.routes.contains(target) {
                            return Err(checker.node_error(
                                node,
                                format!("case target '{target}' is not one of its routes"),
                            ));
                        }
                    }
                    Ok(())
                }
            }
        }
    }
}

/// `models` only on plugin nodes and only naming known models; limits within the ceilings.
fn check_grants_and_limits(
    checker: &Checker<'_>,
    node: &NodeSpec,
    catalog: &dyn Catalog,
) -> Result<()> {
    if !node.models.is_empty() && node.plugin.is_none() {
        return Err(checker.node_error(
            node,
            "`models` grants wasi:nn access to a plugin; this node runs no plugin",
        ));
    }
    if let Some(unknown) = node
        .models
        .iter()
        .find(|m| catalog.model(m, None).is_none())
    {
        return Err(checker.node_error(node, format!("`models` grants unknown model '{unknown}'")));
    }
    if node.plugin.is_none() && node.memory_mb.is_some() {
        return Err(checker.node_error(
            node,
            "`memory_mb` limits a plugin's memory; this node runs no plugin",
        ));
    }
    if node.deadline_ms == Some(0) || node.memory_mb == Some(0) {
        return Err(checker.node_error(node, "`deadline_ms` and `memory_mb` must be above 0"));
    }
    if let Some(limits) = catalog.node_limits() {
        if let Some(asked) = node.deadline_ms.filter(|&d| d > limits.deadline_ms) {
            return Err(checker.node_error(
                node,
                format!(
                    "deadline_ms {asked} exceeds the limit of {} ms",
                    limits.deadline_ms
                ),
            ));
        }
        if let Some(asked) = node.memory_mb.filter(|&m| m > limits.memory_mb) {
            return Err(checker.node_error(
                node,
                format!(
                    "memory_mb {asked} exceeds the limit of {} MiB",
                    limits.memory_mb
                ),
            ));
        }
    }
    Ok(())
}

fn check_cycles(checker: &Checker<'_>, deps: &[Vec<usize>]) -> Result<()> {
    // Depth-first search with colours; report the cycle's path.
    fn visit(
        node: usize,
        deps: &[Vec<usize>],
        colour: &mut [u8],
        stack: &mut Vec<usize>,
    ) -> Option<Vec<usize>> {
        colour[node] = 1;
        stack.push(node);
        for &dep in &deps[node] {
            if colour[dep] == 1 {
                let start = stack.iter().position(|&n| n == dep).unwrap_or(0);
                let mut cycle = stack[start..].to_vec();
                cycle.push(dep);
                return Some(cycle);
            }
            if colour[dep] == 0
                && let Some(cycle) = visit(dep, deps, colour, stack)
            {
                return Some(cycle);
            }
        }
        stack.pop();
        colour[node] = 2;
        None
    }
    let mut colour = vec![0u8; deps.len()];
    for node in 0..deps.len() {
        if colour[node] == 0
            && let Some(cycle) = visit(node, deps, &mut colour, &mut Vec::new())
        {
            let names: Vec<&str> = cycle
                .iter()
                .rev()
                .map(|&i| checker.spec.nodes[i].name.as_str())
                .collect();
            let first = &checker.spec.nodes[cycle[cycle.len() - 1]];
            return Err(checker.node_error(first, format!("is in a cycle: {}", names.join(" -> "))));
        }
    }
    Ok(())
}

/// Each route of a router reads from that router: otherwise it could start before the router
/// chooses, and a route it did not choose could still run and answer.
fn check_routes_follow_their_router(checker: &Checker<'_>, deps: &[Vec<usize>]) -> Result<()> {
    for (router_index, router) in checker.spec.nodes.iter().enumerate() {
        for route in &router.routes {
            let Some(&route_index) = checker.index.get(route.as_str()) else {
                continue;
            };
            if !deps[route_index].contains(&router_index) {
                let node = &checker.spec.nodes[route_index];
                return Err(checker.node_error(
                    node,
                    format!(
                        "is a route of router '{}' but does not take its input from it \
                         (add \"{}\" to its `inputs`)",
                        router.name, router.name
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn check_reachable(
    checker: &Checker<'_>,
    deps: &[Vec<usize>],
    outputs: &[Vec<Source>],
) -> Result<()> {
    let mut used = vec![false; deps.len()];
    let mut stack: Vec<usize> = outputs
        .iter()
        .flatten()
        .filter_map(|s| match s {
            Source::Node(i, _) => Some(*i),
            Source::Request(_) => None,
        })
        .collect();
    // Routers are used by the routes they choose among.
    while let Some(node) = stack.pop() {
        if std::mem::replace(&mut used[node], true) {
            continue;
        }
        stack.extend(&deps[node]);
    }
    if let Some(unused) = used.iter().position(|u| !u) {
        let node = &checker.spec.nodes[unused];
        return Err(checker.node_error(node, "is unreachable: no graph output depends on it"));
    }
    Ok(())
}

/// Where datatypes are known (request inputs, model outputs), checks that a model node's inputs
/// match its metadata by name, datatype and rank.
/// Every `node.tensor` taken from a model node names one of that model's outputs, and every
/// graph output taken from a model has the model output's datatype and rank — where the
/// catalog knows the model's metadata. Without this a typo loads fine and fails every request.
fn check_model_outputs(
    checker: &Checker<'_>,
    sources: &[Vec<Source>],
    renames: &[Vec<(String, Source)>],
    outputs: &[Vec<Source>],
    catalog: &dyn Catalog,
) -> Result<()> {
    let spec = checker.spec;
    // The datatype and rank of output `tensor` of model node `dep`, or why it has none; `None`
    // when the node is not a model the catalog knows.
    let output_of =
        |dep: usize, tensor: &str| -> Option<std::result::Result<(DataType, usize), String>> {
            let node = &spec.nodes[dep];
            let outputs = known_model_outputs(node, catalog)?;
            Some(outputs.get(tensor).copied().ok_or_else(|| {
                format!(
                    "'{}.{tensor}' names no output of model '{}' (its outputs: {})",
                    node.name,
                    node.model.as_deref().unwrap_or_default(),
                    outputs.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            }))
        };
    for (index, node) in spec.nodes.iter().enumerate() {
        let taken = sources[index]
            .iter()
            .chain(renames[index].iter().map(|(_, source)| source));
        for source in taken {
            if let Source::Node(dep, Some(tensor)) = source
                && let Some(Err(reason)) = output_of(*dep, tensor)
            {
                return Err(checker.node_error(node, reason));
            }
        }
    }
    for (output, from) in spec.outputs.iter().zip(outputs) {
        for source in from {
            let Source::Node(dep, Some(tensor)) = source else {
                continue;
            };
            match output_of(*dep, tensor) {
                Some(Err(reason)) => {
                    return Err(checker.output_error(&output.name, reason));
                }
                Some(Ok((datatype, rank)))
                    if datatype != output.datatype || rank != output.shape.len() =>
                {
                    return Err(checker.output_error(
                        &output.name,
                        format!(
                        "is declared {} of rank {} but '{}.{tensor}' is {datatype} of rank {rank}",
                        output.datatype,
                        output.shape.len(),
                        spec.nodes[*dep].name
                    )));
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// The outputs (name -> datatype and rank) of `node` when it is a model node whose metadata the
/// catalog knows; `None` for plugins, routers and unknown models.
fn known_model_outputs(
    node: &NodeSpec,
    catalog: &dyn Catalog,
) -> Option<BTreeMap<String, (DataType, usize)>> {
    if node.kind != NodeKind::Model {
        return None;
    }
    let metadata = catalog.model(node.model.as_deref()?, node.version.as_deref())?;
    Some(
        metadata
            .outputs
            .iter()
            .map(|o| (o.name.clone(), (o.datatype, o.shape.len())))
            .collect(),
    )
}

fn check_model_types(
    checker: &Checker<'_>,
    sources: &[Vec<Source>],
    renames: &[Vec<(String, Source)>],
    catalog: &dyn Catalog,
) -> Result<()> {
    let spec = checker.spec;
    let request: BTreeMap<&str, (DataType, usize)> = spec
        .inputs
        .iter()
        .map(|i| (i.name.as_str(), (i.datatype, i.shape.len())))
        .collect();
    for (index, node) in spec.nodes.iter().enumerate() {
        if node.kind != NodeKind::Model {
            continue;
        }
        let Some(metadata) = node
            .model
            .as_deref()
            .and_then(|m| catalog.model(m, node.version.as_deref()))
        else {
            continue;
        };
        // Known tensors this node will see, by the name it sees them under.
        let mut seen: BTreeMap<String, Option<(DataType, usize)>> = BTreeMap::new();
        let mut add = |source: &Source, rename: Option<&str>| match source {
            Source::Request(None) => request.iter().for_each(|(n, t)| {
                seen.insert(n.to_string(), Some(*t));
            }),
            Source::Request(Some(name)) => {
                seen.insert(
                    rename.unwrap_or(name).to_string(),
                    request.get(name.as_str()).copied(),
                );
            }
            Source::Node(dep, tensor) => {
                let dep_node = &spec.nodes[*dep];
                let known = known_model_outputs(dep_node, catalog);
                match (tensor, known) {
                    (Some(name), known) => {
                        let ty = known.and_then(|k| k.get(name).copied());
                        seen.insert(rename.unwrap_or(name).to_string(), ty);
                    }
                    (None, Some(all)) => all.into_iter().for_each(|(n, t)| {
                        seen.insert(n, Some(t));
                    }),
                    // Everything a plugin or router produces is unknown until run time.
                    (None, None) => {}
                }
            }
        };
        sources[index].iter().for_each(|s| add(s, None));
        renames[index].iter().for_each(|(to, s)| add(s, Some(to)));
        for (name, ty) in &seen {
            let Some((datatype, rank)) = ty else { continue };
            let Some(want) = metadata.input(name) else {
                continue;
            };
            if want.datatype != *datatype || want.shape.len() != *rank {
                return Err(checker.node_error(
                    node,
                    format!(
                        "input '{name}' is {datatype} of rank {rank} but model '{}' expects {} of rank {}",
                        node.model.as_deref().unwrap_or_default(),
                        want.datatype,
                        want.shape.len()
                    ),
                ));
            }
        }
    }
    Ok(())
}
