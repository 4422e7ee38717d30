//! Inference graphs declared in TOML: the schema ([`schema`]), validation into an executable
//! plan ([`validate`]) and the in-process executor ([`execute`]), all within [`GraphLimits`].
//!
//! Seldon's node kinds (model, transformer, output_transformer, router, combiner) and KServe's
//! router types (splitter with weights and stickiness, switch on a request parameter) in one
//! process: a hop between nodes is a function call, not a network round trip.

pub mod execute;
pub mod limits;
pub mod model;
pub mod schema;
pub mod validate;

pub use execute::{
    Execution, NodeContext, NodeRunner, NodeTrace, PluginCall, PluginReply, execute,
};
pub use limits::GraphLimits;
pub use model::{DEFAULT_GRAPH_DEADLINE, GRAPH_PLATFORM, GraphModel, GraphObserver};
pub use schema::{BuiltinRouter, GraphSpec, NodeKind, NodeSpec};
pub use validate::{Catalog, GraphPlan, NodeLimits, PluginRole, Source, validate};
