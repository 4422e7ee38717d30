//! Graph validation: turns a parsed [`GraphSpec`] into an executable [`GraphPlan`], or an error
//! that names the file, the line of the node, the node and the reason.
//!
//! The graph comes from a tenant, so it is first held to the catalog's [`GraphLimits`], and
//! every pass after that is iterative (no recursion over the graph, however deep a chain) and
//! near-linear: lookups go through maps and sets or the sorted dependency lists, each model's
//! metadata is fetched once, and a node's line is searched for only to report an error.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use weft_core::{DataType, Error, ModelMetadata, Result, TensorSpec};

use super::limits::GraphLimits;
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

    /// The role [`PluginRole::as_str`] names.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "transformer" => Some(PluginRole::Transformer),
            "combiner" => Some(PluginRole::Combiner),
            "router" => Some(PluginRole::Router),
            _ => None,
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
    /// How big a graph may be; checked before anything else. A catalog that raises these must
    /// parse with the same limits ([`GraphSpec::parse_with_limits`]).
    fn graph_limits(&self) -> GraphLimits {
        GraphLimits::default()
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
    /// Per node: the nodes it reads from, ascending, each once.
    pub deps: Vec<Vec<usize>>,
    /// Per node: the nodes that read from it, ascending, each once (the inverse of `deps`).
    pub dependents: Vec<Vec<usize>>,
    /// Per node: its `routes` as node indices, in order (empty unless it is a router).
    pub routes: Vec<Vec<usize>>,
    /// Per graph output: candidate sources in order.
    pub outputs: Vec<Vec<Source>>,
    /// Node name to index.
    index: HashMap<String, usize>,
}

impl GraphPlan {
    pub fn index_of(&self, node: &str) -> Option<usize> {
        self.index.get(node).copied()
    }
}

struct Checker<'a> {
    path: &'a Path,
    text: &'a str,
    spec: &'a GraphSpec,
    index: HashMap<&'a str, usize>,
    /// The graph's input names.
    inputs: HashSet<&'a str>,
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
                && !self.inputs.contains(name.as_str())
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

/// Validates `spec` (parsed from `text` at `path`) against `catalog`, within
/// [`Catalog::graph_limits`].
pub fn validate(
    path: &Path,
    text: &str,
    spec: GraphSpec,
    catalog: &dyn Catalog,
) -> Result<GraphPlan> {
    catalog.graph_limits().check(path, &spec)?;
    let checked = check(path, text, &spec, catalog)?;
    let index = spec
        .nodes
        .iter()
        .enumerate()
        .map(|(i, node)| (node.name.clone(), i))
        .collect();
    let mut dependents = vec![Vec::new(); checked.deps.len()];
    for (reader, deps) in checked.deps.iter().enumerate() {
        for &dep in deps {
            dependents[dep].push(reader);
        }
    }
    Ok(GraphPlan {
        spec,
        sources: checked.sources,
        renames: checked.renames,
        deps: checked.deps,
        dependents,
        routes: checked.routes,
        outputs: checked.outputs,
        index,
    })
}

/// What validation works out, before it is moved into the plan with the spec.
struct Checked {
    sources: Vec<Vec<Source>>,
    renames: Vec<Vec<(String, Source)>>,
    deps: Vec<Vec<usize>>,
    routes: Vec<Vec<usize>>,
    outputs: Vec<Vec<Source>>,
}

/// Catalog lookups, each asked once however many nodes name the same model (a thousand nodes
/// on one wide model must not clone its metadata a thousand times).
#[derive(Default)]
struct Models<'s> {
    found: Vec<ModelMetadata>,
    /// (name, version) -> index into `found`, or `None` when the catalog has no such model.
    asked: HashMap<(&'s str, Option<&'s str>), Option<usize>>,
}

impl<'s> Models<'s> {
    fn get(
        &mut self,
        catalog: &dyn Catalog,
        name: &'s str,
        version: Option<&'s str>,
    ) -> Option<usize> {
        if let Some(&known) = self.asked.get(&(name, version)) {
            return known;
        }
        let known = catalog.model(name, version).map(|metadata| {
            self.found.push(metadata);
            self.found.len() - 1
        });
        self.asked.insert((name, version), known);
        known
    }
}

/// A model's metadata with its inputs and outputs by name.
struct KnownModel<'m> {
    inputs: HashMap<&'m str, &'m TensorSpec>,
    /// Name -> datatype and rank.
    outputs: BTreeMap<&'m str, (DataType, usize)>,
}

fn check(path: &Path, text: &str, spec: &GraphSpec, catalog: &dyn Catalog) -> Result<Checked> {
    let mut index = HashMap::with_capacity(spec.nodes.len());
    for (i, node) in spec.nodes.iter().enumerate() {
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
        spec,
        index,
        inputs: spec.inputs.iter().map(|t| t.name.as_str()).collect(),
    };
    for (names, what) in [
        (
            spec.inputs
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>(),
            "input",
        ),
        (
            spec.outputs
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

    let mut sources = Vec::with_capacity(spec.nodes.len());
    let mut renames = Vec::with_capacity(spec.nodes.len());
    let mut deps = Vec::with_capacity(spec.nodes.len());
    let mut routes = Vec::with_capacity(spec.nodes.len());
    let mut models = Models::default();
    // Per node: its model's index in `models.found`, for model nodes.
    let mut node_models = Vec::with_capacity(spec.nodes.len());
    for node in &spec.nodes {
        node_models.push(check_kind(&checker, node, catalog, &mut models)?);
        check_grants_and_limits(&checker, node, catalog, &mut models)?;
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
        let inputs: HashSet<&str> = node.inputs.iter().map(String::as_str).collect();
        if let Some(soft) = node
            .soft
            .iter()
            .find(|soft| !inputs.contains(soft.as_str()))
        {
            return Err(checker.node_error(
                node,
                format!("soft dependency '{soft}' is not one of its inputs"),
            ));
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
        routes.push(
            node.routes
                .iter()
                .filter_map(|route| checker.index.get(route.as_str()).copied())
                .collect::<Vec<_>>(),
        );
    }
    let outputs = spec
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

    if spec.deadline_ms == Some(0) {
        return Err(checker.graph_error("`deadline_ms` must be above 0"));
    }
    check_routes_follow_their_router(&checker, &deps, &routes)?;
    check_cycles(&checker, &deps)?;
    check_reachable(&checker, &deps, &outputs)?;
    let distinct: Vec<KnownModel<'_>> = models
        .found
        .iter()
        .map(|metadata| KnownModel {
            inputs: metadata
                .inputs
                .iter()
                .map(|i| (i.name.as_str(), i))
                .collect(),
            outputs: metadata
                .outputs
                .iter()
                .map(|o| (o.name.as_str(), (o.datatype, o.shape.len())))
                .collect(),
        })
        .collect();
    let known: Vec<Option<&KnownModel<'_>>> = node_models
        .iter()
        .map(|found| found.and_then(|i| distinct.get(i)))
        .collect();
    check_model_types(&checker, &sources, &renames, &known)?;
    check_model_outputs(&checker, &sources, &renames, &outputs, &known)?;
    Ok(Checked {
        sources,
        renames,
        deps,
        routes,
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

/// Checks what the node's kind needs; returns a model node's model (its index in `models`).
fn check_kind<'s>(
    checker: &Checker<'_>,
    node: &'s NodeSpec,
    catalog: &dyn Catalog,
    models: &mut Models<'s>,
) -> Result<Option<usize>> {
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
            let Some(found) = models.get(catalog, model, node.version.as_deref()) else {
                let version = node
                    .version
                    .as_deref()
                    .map(|v| format!(" version {v}"))
                    .unwrap_or_default();
                return Err(checker.node_error(node, format!("unknown model '{model}'{version}")));
            };
            Ok(Some(found))
        }
        NodeKind::Transformer | NodeKind::OutputTransformer => {
            expect_role(PluginRole::Transformer).map(|()| None)
        }
        NodeKind::Combiner => expect_role(PluginRole::Combiner).map(|()| None),
        NodeKind::Router => check_router(checker, node, expect_role).map(|()| None),
    }
}

fn check_router(
    checker: &Checker<'_>,
    node: &NodeSpec,
    expect_role: impl Fn(PluginRole) -> Result<()>,
) -> Result<()> {
    let routes: HashSet<&str> = node.routes.iter().map(String::as_str).collect();
    if node.routes.is_empty() {
        return Err(checker.node_error(node, "a router needs `routes`"));
    }
    match (&node.plugin, node.builtin) {
        (Some(_), Some(_)) => {
            Err(checker.node_error(node, "a router has either `plugin` or `builtin`, not both"))
        }
        (None, None) => Err(checker.node_error(node, "a router needs `plugin` or `builtin`")),
        (Some(_), None) => expect_role(PluginRole::Router),
        (None, Some(BuiltinRouter::Splitter)) => {
            let sum = node
                .weights
                .values()
                .fold(0u64, |sum, &weight| sum + u64::from(weight));
            let unknown = node.weights.keys().find(|k| !routes.contains(k.as_str()));
            if let Some(unknown) = unknown {
                return Err(checker.node_error(
                    node,
                    format!("weight for '{unknown}', which is not one of its routes"),
                ));
            }
            if sum != 100 {
                return Err(
                    checker.node_error(node, format!("splitter weights sum to {sum}, not 100"))
                );
            }
            Ok(())
        }
        (None, Some(BuiltinRouter::Switch)) => {
            if node.on.is_none() {
                return Err(
                    checker.node_error(node, "a switch needs `on` (the request parameter to read)")
                );
            }
            let targets = node.cases.values().chain(node.default.as_ref());
            for target in targets {
                if !routes.contains(target.as_str()) {
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

/// `models` only on plugin nodes and only naming known models; limits within the ceilings.
fn check_grants_and_limits<'s>(
    checker: &Checker<'_>,
    node: &'s NodeSpec,
    catalog: &dyn Catalog,
    models: &mut Models<'s>,
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
        .find(|m| models.get(catalog, m, None).is_none())
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

/// Most node names a cycle's message lists; a longer cycle shows its start and end.
const CYCLE_NAMES_SHOWN: usize = 32;

/// Depth-first search with colours and an explicit stack (a chain as long as the graph must
/// not grow the call stack); reports the first cycle found, in the direction data flows.
fn check_cycles(checker: &Checker<'_>, deps: &[Vec<usize>]) -> Result<()> {
    const WHITE: u8 = 0;
    const GREY: u8 = 1;
    const BLACK: u8 = 2;
    let mut colour = vec![WHITE; deps.len()];
    // The path from the root: each node with how many of its deps have been looked at.
    let mut stack: Vec<(usize, usize)> = Vec::new();
    for root in 0..deps.len() {
        if colour[root] != WHITE {
            continue;
        }
        colour[root] = GREY;
        stack.push((root, 0));
        while let Some((node, next)) = stack.last_mut() {
            let Some(&dep) = deps[*node].get(*next) else {
                colour[*node] = BLACK;
                stack.pop();
                continue;
            };
            *next += 1;
            match colour[dep] {
                WHITE => {
                    colour[dep] = GREY;
                    stack.push((dep, 0));
                }
                GREY => {
                    let start = stack.iter().position(|&(n, _)| n == dep).unwrap_or(0);
                    let mut cycle: Vec<usize> = stack[start..].iter().map(|&(n, _)| n).collect();
                    cycle.push(dep);
                    return Err(cycle_error(checker, &cycle));
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// `node 'a': is in a cycle: a -> b -> a`, from a cycle found along deps (so listed backwards),
/// naming at most [`CYCLE_NAMES_SHOWN`] nodes.
fn cycle_error(checker: &Checker<'_>, cycle: &[usize]) -> Error {
    let name = |i: &usize| checker.spec.nodes[*i].name.as_str();
    let path = if cycle.len() <= CYCLE_NAMES_SHOWN {
        cycle
            .iter()
            .rev()
            .map(name)
            .collect::<Vec<_>>()
            .join(" -> ")
    } else {
        let half = CYCLE_NAMES_SHOWN / 2;
        let head: Vec<&str> = cycle.iter().rev().take(half).map(name).collect();
        let tail: Vec<&str> = cycle[..half].iter().rev().map(name).collect();
        format!(
            "{} -> ... ({} more) ... -> {}",
            head.join(" -> "),
            cycle.len() - 2 * half,
            tail.join(" -> ")
        )
    };
    let first = &checker.spec.nodes[cycle.last().copied().unwrap_or(0)];
    checker.node_error(first, format!("is in a cycle: {path}"))
}

/// Each route of a router reads from that router: otherwise it could start before the router
/// chooses, and a route it did not choose could still run and answer.
fn check_routes_follow_their_router(
    checker: &Checker<'_>,
    deps: &[Vec<usize>],
    routes: &[Vec<usize>],
) -> Result<()> {
    for (router_index, router) in checker.spec.nodes.iter().enumerate() {
        for &route_index in &routes[router_index] {
            // `deps` are sorted and deduplicated.
            if deps[route_index].binary_search(&router_index).is_err() {
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

/// Every `node.tensor` taken from a model node names one of that model's outputs, and every
/// graph output taken from a model has the model output's datatype and rank — where the
/// catalog knows the model's metadata. Without this a typo loads fine and fails every request.
fn check_model_outputs(
    checker: &Checker<'_>,
    sources: &[Vec<Source>],
    renames: &[Vec<(String, Source)>],
    outputs: &[Vec<Source>],
    known: &[Option<&KnownModel<'_>>],
) -> Result<()> {
    let spec = checker.spec;
    // The datatype and rank of output `tensor` of model node `dep`, or why it has none; `None`
    // when the node is not a model the catalog knows.
    let output_of =
        |dep: usize, tensor: &str| -> Option<std::result::Result<(DataType, usize), String>> {
            let node = &spec.nodes[dep];
            let outputs = &known[dep]?.outputs;
            Some(outputs.get(tensor).copied().ok_or_else(|| {
                format!(
                    "'{}.{tensor}' names no output of model '{}' (its outputs: {})",
                    node.name,
                    node.model.as_deref().unwrap_or_default(),
                    outputs.keys().copied().collect::<Vec<_>>().join(", ")
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

/// Where datatypes are known (request inputs, model outputs), checks that a model node's inputs
/// match its metadata by name, datatype and rank.
fn check_model_types(
    checker: &Checker<'_>,
    sources: &[Vec<Source>],
    renames: &[Vec<(String, Source)>],
    known: &[Option<&KnownModel<'_>>],
) -> Result<()> {
    let spec = checker.spec;
    let request: BTreeMap<&str, (DataType, usize)> = spec
        .inputs
        .iter()
        .map(|i| (i.name.as_str(), (i.datatype, i.shape.len())))
        .collect();
    for (index, node) in spec.nodes.iter().enumerate() {
        let Some(model) = known[index] else {
            continue;
        };
        // Known tensors this node will see, by the name it sees them under.
        let mut seen: BTreeMap<&str, Option<(DataType, usize)>> = BTreeMap::new();
        let taken = sources[index]
            .iter()
            .map(|s| (s, None))
            .chain(renames[index].iter().map(|(to, s)| (s, Some(to.as_str()))));
        for (source, rename) in taken {
            match source {
                Source::Request(None) => request.iter().for_each(|(n, t)| {
                    seen.insert(n, Some(*t));
                }),
                Source::Request(Some(name)) => {
                    let seen_as = rename.unwrap_or(name);
                    seen.insert(seen_as, request.get(name.as_str()).copied());
                }
                Source::Node(dep, tensor) => match (tensor, known[*dep]) {
                    (Some(name), dep_model) => {
                        let ty = dep_model
                            .as_ref()
                            .and_then(|k| k.outputs.get(name.as_str()).copied());
                        seen.insert(rename.unwrap_or(name), ty);
                    }
                    (None, Some(dep_model)) => dep_model.outputs.iter().for_each(|(n, t)| {
                        seen.insert(n, Some(*t));
                    }),
                    // Everything a plugin or router produces is unknown until run time.
                    (None, None) => {}
                },
            }
        }
        for (name, ty) in &seen {
            let Some((datatype, rank)) = ty else { continue };
            let Some(want) = model.inputs.get(name) else {
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
