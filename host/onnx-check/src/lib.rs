//! Weft's own check of an uploaded ONNX model, run on the raw bytes BEFORE ONNX Runtime sees them.
//!
//! Why: ONNX Runtime 1.22 follows a tensor's external-data `location` anywhere on the server's
//! filesystem (absolute paths, `../`), so a tenant who uploads a model with an external-data
//! initializer could make the server read its own files. This crate decodes the `ModelProto`
//! (with the hand-written messages in [`proto`]) and walks every place a tensor can hide: the main
//! graph, every subgraph of every node attribute (If/Loop/Scan at any depth), model-local
//! functions and their attribute defaults, training-info graphs, attribute tensors and sparse
//! tensors. It refuses external data, operator domains the server does not serve, and models over
//! the [`ModelLimits`]. The walk uses an explicit worklist, never recursion over the model, and
//! prost's decode recursion limit (100 nested messages) bounds decoding itself.
//!
//! Every [`CheckError`] message is written for the tenant who uploaded the model: it names the
//! offending tensor or node, where it sits, and which rule or limit refused it.

pub mod proto;

use std::collections::HashSet;
use std::fmt;

use bytes::Bytes;
use prost::Message;

use proto::{
    AttributeProto, DATA_LOCATION_DEFAULT, DATA_LOCATION_EXTERNAL, GraphProto, ModelProto,
    NodeProto, OperatorSetIdProto, SparseTensorProto, TensorProto,
};

/// What a model may contain. The defaults suit a shared server; operators tighten them per tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelLimits {
    /// Most bytes of constant tensors (initializers, sparse initializers, tensor attributes such as
    /// Constant/ConstantOfShape values, function attribute defaults) summed over the whole model.
    /// A tensor counts as the larger of its stored data and its declared shape times element size.
    pub max_initializer_bytes: u64,
    /// Most nodes summed over every graph, subgraph and model-local function.
    pub max_nodes: u64,
    /// Deepest nesting of subgraphs (a subgraph of the main graph is depth 1).
    pub max_subgraph_depth: u32,
    /// Operator and opset domains the server serves. `""` and `"ai.onnx"` name the same default
    /// domain; allowing either allows both; `"*"` allows any. Domains of model-local functions
    /// are always allowed.
    pub allowed_domains: Vec<String>,
    /// Accept tensors whose data lives outside the model. Only for trusted models from a sandboxed
    /// directory: ONNX Runtime 1.22 follows external-data paths anywhere on the filesystem.
    pub allow_external_data: bool,
}

impl Default for ModelLimits {
    /// 1 GiB of constants, 100 000 nodes, subgraph depth 16, the ONNX, ONNX-ML and Microsoft
    /// contrib domains, external data refused.
    fn default() -> Self {
        ModelLimits {
            max_initializer_bytes: 1 << 30,
            max_nodes: 100_000,
            max_subgraph_depth: 16,
            allowed_domains: ["", "ai.onnx", "ai.onnx.ml", "com.microsoft"]
                .into_iter()
                .map(String::from)
                .collect(),
            allow_external_data: false,
        }
    }
}

impl ModelLimits {
    /// The operator's repository models: trusted in everything (any size, any domain: an
    /// operator may register custom ops) but external data, which is refused unless their
    /// `model.toml` opts out.
    pub fn operator() -> Self {
        ModelLimits {
            max_initializer_bytes: u64::MAX,
            max_nodes: u64::MAX,
            max_subgraph_depth: u32::MAX,
            allowed_domains: vec!["*".to_owned()],
            allow_external_data: false,
        }
    }
}

/// What [`check_model`] measured on a model it accepted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelSummary {
    /// Bytes of constant tensors anywhere in the model (see [`ModelLimits::max_initializer_bytes`]).
    pub initializer_bytes: u64,
    /// Nodes in all graphs, subgraphs and model-local functions.
    pub nodes: u64,
    /// Graphs visited: the main graph, training-info graphs and every subgraph.
    pub graphs: u64,
    /// Deepest subgraph nesting seen (0 when no node has a subgraph).
    pub max_depth: u32,
}

/// Why a model was refused. The message is safe to show the tenant who uploaded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckError {
    message: String,
}

impl CheckError {
    fn new(message: impl Into<String>) -> Self {
        CheckError {
            message: message.into(),
        }
    }

    /// The explanation, written for the uploader.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CheckError {}

impl From<CheckError> for weft_core::Error {
    fn from(e: CheckError) -> Self {
        weft_core::Error::invalid(e.message)
    }
}

/// Decode `bytes` as an ONNX `ModelProto` and check it against `limits`.
///
/// Decoding from [`Bytes`] slices the weights instead of copying them.
pub fn check_model(bytes: &Bytes, limits: &ModelLimits) -> Result<ModelSummary, CheckError> {
    let model = ModelProto::decode(bytes.clone()).map_err(decode_error)?;
    let graph = model.graph.as_ref().ok_or_else(|| {
        CheckError::new("the ONNX model has no graph: ModelProto.graph (field 7) is missing")
    })?;
    let mut walker = Walker {
        limits,
        function_domains: model.functions.iter().map(|f| f.domain.as_str()).collect(),
        functions: model
            .functions
            .iter()
            .map(|f| (f.domain.as_str(), f.name.as_str()))
            .collect(),
        summary: ModelSummary::default(),
        work: Vec::new(),
    };

    walker.opsets(&model.opset_import, "the model")?;
    for function in &model.functions {
        let path = format!(
            "function {} (domain {})",
            name(&function.name),
            quote(&function.domain)
        );
        walker.opsets(&function.opset_import, &path)?;
        for attr in &function.attribute_proto {
            let at = format!("{path} attribute default {}", quote(&attr.name));
            walker.attribute(attr, &at, 0)?;
        }
        walker.nodes(&function.node, &path, 0)?;
    }
    walker.push_graph(graph, String::new(), 0);
    for (i, info) in model.training_info.iter().enumerate() {
        if let Some(g) = &info.initialization {
            walker.push_graph(g, format!("training_info[{i}] initialization > "), 0);
        }
        if let Some(g) = &info.algorithm {
            walker.push_graph(g, format!("training_info[{i}] algorithm > "), 0);
        }
    }
    while let Some(item) = walker.work.pop() {
        walker.graph(item)?;
    }
    Ok(walker.summary)
}

fn decode_error(e: prost::DecodeError) -> CheckError {
    let text = e.to_string();
    if text.contains("recursion limit reached") {
        CheckError::new(
            "the ONNX model nests messages (e.g. subgraphs) deeper than the decoder allows \
             (100 levels); flatten its control flow",
        )
    } else {
        CheckError::new(format!(
            "the bytes are not a valid ONNX model (protobuf ModelProto): {}",
            clip(&text, 300)
        ))
    }
}

/// A graph waiting to be walked, with where it sits.
struct GraphItem<'a> {
    graph: &'a GraphProto,
    /// e.g. `graph 'main' > node 'if0' (If) attribute 'then_branch' > graph 'then'`.
    path: String,
    depth: u32,
}

struct Walker<'a> {
    limits: &'a ModelLimits,
    function_domains: HashSet<&'a str>,
    functions: HashSet<(&'a str, &'a str)>,
    summary: ModelSummary,
    work: Vec<GraphItem<'a>>,
}

impl<'a> Walker<'a> {
    fn push_graph(&mut self, graph: &'a GraphProto, prefix: String, depth: u32) {
        let path = format!("{prefix}graph {}", name(&graph.name));
        self.work.push(GraphItem { graph, path, depth });
    }

    fn graph(&mut self, item: GraphItem<'a>) -> Result<(), CheckError> {
        let GraphItem { graph, path, depth } = item;
        self.summary.graphs += 1;
        self.summary.max_depth = self.summary.max_depth.max(depth);
        let at = format!("{path} initializer");
        for tensor in &graph.initializer {
            self.tensor(tensor, &at)?;
        }
        let at = format!("{path} sparse_initializer");
        for sparse in &graph.sparse_initializer {
            self.sparse(sparse, &at)?;
        }
        self.nodes(&graph.node, &path, depth)
    }

    fn nodes(&mut self, nodes: &'a [NodeProto], path: &str, depth: u32) -> Result<(), CheckError> {
        for node in nodes {
            let node_path = format!(
                "{path} > node {} ({})",
                name(&node.name),
                clip(&node.op_type, 100)
            );
            self.summary.nodes += 1;
            if self.summary.nodes > self.limits.max_nodes {
                return Err(CheckError::new(format!(
                    "the model has more nodes than the limit max_nodes = {} (reached at {node_path})",
                    self.limits.max_nodes
                )));
            }
            self.node_domain(node, &node_path)?;
            for attr in &node.attribute {
                let at = format!("{node_path} attribute {}", quote(&attr.name));
                self.attribute(attr, &at, depth)?;
            }
        }
        Ok(())
    }

    fn node_domain(&self, node: &NodeProto, node_path: &str) -> Result<(), CheckError> {
        let domain = node.domain.as_str();
        if self.domain_allowed(domain) {
            return Ok(());
        }
        if self.function_domains.contains(domain) {
            if self.functions.contains(&(domain, node.op_type.as_str())) {
                return Ok(());
            }
            return Err(CheckError::new(format!(
                "{node_path} uses operator {} in domain {}, a model-local function domain with no \
                 function of that name",
                quote(&node.op_type),
                quote(domain)
            )));
        }
        Err(CheckError::new(format!(
            "{node_path} uses operator domain {}, which this server does not serve (allowed: {}) \
             and which is not the domain of a model-local function",
            quote(domain),
            self.allowed_list()
        )))
    }

    fn opsets(&self, opsets: &[OperatorSetIdProto], owner: &str) -> Result<(), CheckError> {
        for opset in opsets {
            let domain = opset.domain.as_str();
            if !self.domain_allowed(domain) && !self.function_domains.contains(domain) {
                return Err(CheckError::new(format!(
                    "{owner} imports opset domain {} (version {}), which this server does not \
                     serve (allowed: {}) and which is not the domain of a model-local function",
                    quote(domain),
                    opset.version,
                    self.allowed_list()
                )));
            }
        }
        Ok(())
    }

    fn domain_allowed(&self, domain: &str) -> bool {
        let allowed = |d: &str| {
            self.limits
                .allowed_domains
                .iter()
                .any(|a| a == d || a == "*")
        };
        match domain {
            "" | "ai.onnx" => allowed("") || allowed("ai.onnx"),
            other => allowed(other),
        }
    }

    fn allowed_list(&self) -> String {
        let names: Vec<String> = self
            .limits
            .allowed_domains
            .iter()
            .map(|d| quote(d))
            .collect();
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    }

    fn attribute(
        &mut self,
        attr: &'a AttributeProto,
        at: &str,
        depth: u32,
    ) -> Result<(), CheckError> {
        if let Some(t) = &attr.t {
            self.tensor(t, at)?;
        }
        for (i, t) in attr.tensors.iter().enumerate() {
            self.tensor(t, &format!("{at}[{i}]"))?;
        }
        if let Some(s) = &attr.sparse_tensor {
            self.sparse(s, at)?;
        }
        for (i, s) in attr.sparse_tensors.iter().enumerate() {
            self.sparse(s, &format!("{at}[{i}]"))?;
        }
        if let Some(g) = &attr.g {
            self.subgraph(g, at, depth)?;
        }
        for (i, g) in attr.graphs.iter().enumerate() {
            self.subgraph(g, &format!("{at}[{i}]"), depth)?;
        }
        Ok(())
    }

    fn subgraph(&mut self, graph: &'a GraphProto, at: &str, depth: u32) -> Result<(), CheckError> {
        let depth = depth.saturating_add(1);
        if depth > self.limits.max_subgraph_depth {
            return Err(CheckError::new(format!(
                "subgraphs nest deeper than the limit max_subgraph_depth = {} (at {at} > graph {})",
                self.limits.max_subgraph_depth,
                name(&graph.name)
            )));
        }
        self.push_graph(graph, format!("{at} > "), depth);
        Ok(())
    }

    fn sparse(&mut self, sparse: &SparseTensorProto, at: &str) -> Result<(), CheckError> {
        if let Some(values) = &sparse.values {
            self.tensor(values, &format!("{at} values"))?;
        }
        if let Some(indices) = &sparse.indices {
            self.tensor(indices, &format!("{at} indices"))?;
        }
        Ok(())
    }

    fn tensor(&mut self, tensor: &TensorProto, at: &str) -> Result<(), CheckError> {
        let which = format!("tensor {} in {at}", name(&tensor.name));
        let external =
            tensor.data_location == DATA_LOCATION_EXTERNAL || !tensor.external_data.is_empty();
        if external && !self.limits.allow_external_data {
            // The location itself is not repeated: it names a path of the server's machine.
            let location = if tensor.external_data.iter().any(|e| e.key == "location") {
                "it names a file outside the model"
            } else {
                "no location given"
            };
            return Err(CheckError::new(format!(
                "{which} uses external data ({location}); external data is refused: \
                 embed the weights in the model"
            )));
        }
        if tensor.data_location != DATA_LOCATION_DEFAULT
            && tensor.data_location != DATA_LOCATION_EXTERNAL
        {
            return Err(CheckError::new(format!(
                "{which} has an unknown data_location {}; only DEFAULT (0) is accepted",
                tensor.data_location
            )));
        }
        let total = self
            .summary
            .initializer_bytes
            .saturating_add(tensor_bytes(tensor));
        self.summary.initializer_bytes = total;
        if total > self.limits.max_initializer_bytes {
            return Err(CheckError::new(format!(
                "{which} brings the model's constant tensors to {total} bytes, over the limit \
                 max_initializer_bytes = {}",
                self.limits.max_initializer_bytes
            )));
        }
        Ok(())
    }
}

/// Bytes a tensor costs: the larger of its stored data (raw_data plus the typed arrays at their
/// element width plus string lengths) and its declared shape times its element width.
fn tensor_bytes(t: &TensorProto) -> u64 {
    let len = |n: usize, width: u64| (n as u64).saturating_mul(width);
    let strings = t
        .string_data
        .iter()
        .fold(0u64, |acc, s| acc.saturating_add(s.len() as u64));
    let stored = [
        len(t.raw_data.len(), 1),
        len(t.float_data.len(), 4),
        len(t.int32_data.len(), 4),
        len(t.int64_data.len(), 8),
        len(t.double_data.len(), 8),
        len(t.uint64_data.len(), 8),
        strings,
    ]
    .into_iter()
    .fold(0u64, u64::saturating_add);
    let elements = t.dims.iter().fold(1u64, |acc, &d| {
        acc.saturating_mul(u64::try_from(d).unwrap_or(0))
    });
    let declared = elements
        .saturating_mul(element_bits(t.data_type))
        .div_ceil(8);
    stored.max(declared)
}

/// Bits per element of an ONNX `TensorProto.DataType`; 0 for strings and unknown types.
fn element_bits(data_type: i32) -> u64 {
    match data_type {
        2 | 3 | 9 | 17..=20 => 8, // UINT8, INT8, BOOL, FLOAT8*
        4 | 5 | 10 | 16 => 16,    // UINT16, INT16, FLOAT16, BFLOAT16
        1 | 6 | 12 => 32,         // FLOAT, INT32, UINT32
        7 | 11 | 13 | 14 => 64,   // INT64, DOUBLE, UINT64, COMPLEX64
        15 => 128,                // COMPLEX128
        21..=23 => 4,             // UINT4, INT4, FLOAT4E2M1
        _ => 0,                   // UNDEFINED, STRING, future types
    }
}

/// `'name'`, or `<unnamed>` for an empty name.
fn name(s: &str) -> String {
    if s.is_empty() {
        "<unnamed>".to_owned()
    } else {
        quote(s)
    }
}

/// `'s'`, clipped and with control characters escaped, for messages.
fn quote(s: &str) -> String {
    format!("'{}'", clip(s, 200))
}

/// At most `max` characters of `s`, control characters escaped, `...` when clipped.
fn clip(s: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == max {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests;
