//! The seams between the tenancy layer and what it drives: the plugin sandbox, the model
//! backends and the metrics. The server implements them over wasmtime (`weft-runtime`),
//! ONNX Runtime and its model workers (`weft-backends`) and prometheus; the tests of this crate
//! implement them with fakes, so tenancy rules are tested in milliseconds without either.

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use weft_core::{BoxFuture, Model, RequestContext, Result};
use weft_engine::graph::{GraphObserver, NodeLimits, PluginCall, PluginReply, PluginRole};
use weft_engine::{ModelConfig, ModelRegistry};

/// The models one plugin node may call by name (its `models` grant), resolved once when the
/// graph is built.
pub type Grants = HashMap<String, Arc<dyn Model>>;

/// The limits of one plugin call, the sandbox's defaults lowered by the tenant's quotas and the
/// node's own settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PluginLimits {
    pub deadline: Duration,
    pub memory_bytes: usize,
}

/// What one plugin call runs with besides its inputs.
pub struct SandboxCall {
    /// The request it runs for (tenant, deadline, account).
    pub request: RequestContext,
    pub grants: Arc<Grants>,
    /// The node's params, then the request's parameters as `request.<name>`.
    pub params: Vec<(String, String)>,
    pub limits: PluginLimits,
}

/// A compiled plugin, callable concurrently.
pub trait SandboxPlugin: Send + Sync {
    fn name(&self) -> &str;
    fn role(&self) -> PluginRole;
    /// Runs one call; a failure is that call's alone.
    fn call<'a>(
        &'a self,
        call: SandboxCall,
        plugin_call: PluginCall<'a>,
    ) -> BoxFuture<'a, Result<PluginReply>>;
    /// The concrete plugin, for the server's scrape-time metrics.
    fn as_any(&self) -> &dyn Any;
    /// Bytes keeping it compiled costs (its image); what the plugin cache budget counts.
    fn compiled_bytes(&self) -> u64 {
        0
    }
}

/// Compiles plugin components into the sandbox.
pub trait PluginCompiler: Send + Sync {
    /// Checks and compiles a component; `Err` says why it cannot run.
    fn compile(&self, name: &str, bytes: &[u8]) -> Result<Arc<dyn SandboxPlugin>>;
    /// The sandbox's own limits for a call, before any tenant or node lowers them.
    fn defaults(&self) -> PluginLimits;
    /// The most a graph node may ask for (deadline and memory).
    fn ceiling(&self) -> NodeLimits;
}

/// The host memory one tenant's models may take, from its `model_memory_mb`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelBudget {
    pub worker_memory: u64,
}

/// Checks and loads tenant models (in the tenant's sandboxed model worker, in the server).
pub trait ModelBackend: Send + Sync {
    /// How many sessions of the model `config` asks for: the multiple of its size it costs.
    fn instances(&self, config: &ModelConfig) -> u64;
    /// What the model is, before what it costs: refuses a hostile model as such.
    fn check(&self, onnx: &Bytes, budget: ModelBudget) -> Result<()>;
    /// Proves the model loads within `left` bytes, in a throwaway worker.
    fn trial_load(&self, tenant: &str, onnx: Bytes, config: &ModelConfig, left: u64) -> Result<()>;
    /// Loads a model [`ModelBackend::check`] accepted into the tenant's worker.
    fn load_checked(
        &self,
        tenant: &str,
        label: &str,
        onnx: Bytes,
        config: &ModelConfig,
        budget: ModelBudget,
    ) -> Result<Arc<dyn Model>>;
    /// Checks, then loads (a restart's reload of a stored version).
    fn load(
        &self,
        tenant: &str,
        label: &str,
        onnx: Bytes,
        config: &ModelConfig,
        budget: ModelBudget,
    ) -> Result<Arc<dyn Model>> {
        self.check(&onnx, budget)?;
        self.load_checked(tenant, label, onnx, config, budget)
    }
}

/// What the tenancy layer reports to metrics; every method does nothing by default.
pub trait TenancyObserver: Send + Sync {
    /// One plugin call of `label` (`name`, or `tenant/name@version`) took `elapsed`.
    fn plugin_call(&self, label: &str, elapsed: Duration) {
        let _ = (label, elapsed);
    }
    /// The names `tenant` now serves.
    fn declare_models(&self, tenant: &str, registry: &ModelRegistry) {
        let _ = (tenant, registry);
    }
    /// Where a graph of `tenant` (`None`: the repository's) reports its node timings.
    fn graph_observer(&self, tenant: Option<&str>) -> Option<Arc<dyn GraphObserver>> {
        let _ = tenant;
        None
    }
}

/// Observes nothing.
pub struct NoObserver;

impl TenancyObserver for NoObserver {}
