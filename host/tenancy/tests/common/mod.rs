//! Fakes of the sandbox and the model backend, and a world of tenants on a real embedded store,
//! shared by the tenancy layer's tests.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::any::Any;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use weft_core::{
    BoxFuture, DataType, Model, ModelMetadata, NamedTensor, RequestContext, Result, TensorSpec,
};
use weft_engine::graph::{NodeLimits, PluginCall, PluginReply, PluginRole};
use weft_engine::{ModelConfig, ModelRegistry};
use weft_store::signing::SecretKey;
use weft_store::{Quotas, SigningKey, Store};
use weft_tenancy::backends::{
    ModelBackend, ModelBudget, NoObserver, PluginCompiler, PluginLimits, SandboxCall, SandboxPlugin,
};
use weft_tenancy::lifecycle::{GraphUpload, ModelUpload, PluginUpload, new_tenant};
use weft_tenancy::storage::{StorageLedger, Want};
use weft_tenancy::{Tenancy, TenancyConfig};

/// A model that answers its input back.
pub struct Echo(pub ModelMetadata);

impl Model for Echo {
    fn metadata(&self) -> &ModelMetadata {
        &self.0
    }
    fn infer<'a>(
        &'a self,
        _: &'a RequestContext,
        inputs: Vec<NamedTensor>,
    ) -> BoxFuture<'a, Result<Vec<NamedTensor>>> {
        Box::pin(async move {
            Ok(inputs
                .into_iter()
                .map(|input| NamedTensor::new("y", input.tensor))
                .collect())
        })
    }
}

pub fn spec(name: &str) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        datatype: DataType::Fp32,
        shape: vec![-1, 2],
    }
}

/// How a fake model answers, chosen by a word in the bytes it was pushed with
/// ([`World::push_model_as`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Behaviour {
    /// Answers its input back.
    Echo,
    /// Fails every fifth call (20 %) with an internal error.
    FailEveryFifth,
    /// Fails every call as a plugin trap would.
    Trap,
    /// Answers twice its input.
    Double,
}

/// A loaded fake model.
pub struct Fake {
    metadata: ModelMetadata,
    behaviour: Behaviour,
    calls: AtomicUsize,
}

impl Model for Fake {
    fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }
    fn infer<'a>(
        &'a self,
        _: &'a RequestContext,
        inputs: Vec<NamedTensor>,
    ) -> BoxFuture<'a, Result<Vec<NamedTensor>>> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            match self.behaviour {
                Behaviour::FailEveryFifth if call % 5 == 4 => {
                    return Err(weft_core::Error::internal("failing on purpose"));
                }
                Behaviour::Trap => {
                    return Err(weft_core::Error::internal("wasm trap: unreachable").trapped());
                }
                _ => {}
            }
            let factor = if self.behaviour == Behaviour::Double {
                2.0
            } else {
                1.0
            };
            inputs
                .into_iter()
                .map(|input| {
                    let bytes: Vec<u8> = input
                        .tensor
                        .data()
                        .chunks_exact(4)
                        .flat_map(|b| {
                            (f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * factor).to_le_bytes()
                        })
                        .collect();
                    let shape = input.tensor.shape().to_vec();
                    weft_core::Tensor::new(DataType::Fp32, shape, bytes.into())
                        .map(|t| NamedTensor::new("y", t))
                })
                .collect()
        })
    }
}

/// Loads any bytes that start with "onnx"; counts loads.
#[derive(Default)]
pub struct FakeModels {
    pub loads: AtomicUsize,
}

impl ModelBackend for FakeModels {
    fn instances(&self, _: &ModelConfig) -> u64 {
        1
    }
    fn check(&self, onnx: &Bytes, _: ModelBudget) -> Result<()> {
        if onnx.starts_with(b"onnx") {
            Ok(())
        } else {
            Err(weft_core::Error::invalid("not an ONNX model"))
        }
    }
    fn trial_load(&self, _: &str, _: Bytes, _: &ModelConfig, _: u64) -> Result<()> {
        Ok(())
    }
    fn load_checked(
        &self,
        _: &str,
        _: &str,
        onnx: Bytes,
        _: &ModelConfig,
        _: ModelBudget,
    ) -> Result<Arc<dyn Model>> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        let text = String::from_utf8_lossy(&onnx);
        let behaviour = if text.ends_with(" fail") {
            Behaviour::FailEveryFifth
        } else if text.ends_with(" trap") {
            Behaviour::Trap
        } else if text.ends_with(" double") {
            Behaviour::Double
        } else {
            Behaviour::Echo
        };
        Ok(Arc::new(Fake {
            metadata: ModelMetadata {
                platform: "onnxruntime_onnx".into(),
                inputs: vec![spec("x")],
                outputs: vec![spec("y")],
                max_batch_size: 0,
            },
            behaviour,
            calls: AtomicUsize::new(0),
        }))
    }
}

/// Each call a fake plugin saw: its grants, limits and tenant.
pub type Seen = Arc<Mutex<Vec<(Vec<String>, PluginLimits, Option<String>)>>>;

/// A transformer plugin that records the grants and limits of each call.
pub struct FakePlugin {
    name: String,
    seen: Seen,
}

impl SandboxPlugin for FakePlugin {
    fn name(&self) -> &str {
        &self.name
    }
    fn role(&self) -> PluginRole {
        PluginRole::Transformer
    }
    fn call<'a>(
        &'a self,
        call: SandboxCall,
        plugin_call: PluginCall<'a>,
    ) -> BoxFuture<'a, Result<PluginReply>> {
        let mut grants: Vec<String> = call.grants.keys().cloned().collect();
        grants.sort();
        let tenant = call.request.tenant().map(|t| t.to_string());
        self.seen
            .lock()
            .unwrap()
            .push((grants, call.limits, tenant));
        Box::pin(async move {
            match plugin_call {
                PluginCall::Transform { inputs, .. } => Ok(PluginReply::Tensors(inputs)),
                _ => Ok(PluginReply::Tensors(Vec::new())),
            }
        })
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn compiled_bytes(&self) -> u64 {
        FAKE_COMPILED_BYTES
    }
}

/// What each fake plugin's compiled image costs.
pub const FAKE_COMPILED_BYTES: u64 = 100;

/// Compiles any bytes that start with "wasm".
#[derive(Default)]
pub struct FakeSandbox {
    pub compiles: AtomicUsize,
    pub seen: Seen,
}

impl PluginCompiler for FakeSandbox {
    fn compile(&self, name: &str, bytes: &[u8]) -> Result<Arc<dyn SandboxPlugin>> {
        if !bytes.starts_with(b"wasm") {
            return Err(weft_core::Error::invalid("not a component"));
        }
        self.compiles.fetch_add(1, Ordering::SeqCst);
        Ok(Arc::new(FakePlugin {
            name: name.into(),
            seen: Arc::clone(&self.seen),
        }))
    }
    fn defaults(&self) -> PluginLimits {
        PluginLimits {
            deadline: Duration::from_secs(10),
            memory_bytes: 512 << 20,
        }
    }
    fn ceiling(&self) -> NodeLimits {
        NodeLimits {
            deadline_ms: 10_000,
            memory_mb: 512,
        }
    }
}

pub struct World {
    pub _dir: tempfile::TempDir,
    pub store: Arc<Store>,
    pub tenancy: Tenancy,
    pub ledger: Arc<StorageLedger>,
    pub sandbox: Arc<FakeSandbox>,
    pub models: Arc<FakeModels>,
}

pub fn world(tenants: &[&str]) -> World {
    world_sharing(tenants, ModelRegistry::default(), &[])
}

/// A world whose operator repository is `platform`, of which each tenant shares `shared`.
pub fn world_sharing(tenants: &[&str], platform: ModelRegistry, shared: &[&str]) -> World {
    world_with(tenants, platform, shared, None)
}

/// A world whose tenants' plugins compile on demand under `plugin_residency`.
pub fn world_with(
    tenants: &[&str],
    platform: ModelRegistry,
    shared: &[&str],
    plugin_residency: Option<Arc<weft_engine::lazy::Residency>>,
) -> World {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let sandbox = Arc::new(FakeSandbox::default());
    let models = Arc::new(FakeModels::default());
    let tenancy = Tenancy::new(TenancyConfig {
        store: Arc::clone(&store),
        platform,
        plugins: Arc::clone(&sandbox) as _,
        models: Arc::clone(&models) as _,
        observer: Arc::new(NoObserver),
        admin_key: None,
        bootstrap_key: None,
        residency: None,
        plugin_residency,
    })
    .unwrap();
    for name in tenants {
        tenancy
            .change(Some(name), |state| {
                let quotas = Quotas {
                    plugin_deadline_ms: 250,
                    ..Quotas::default()
                };
                let shared = shared.iter().map(|model| model.to_string()).collect();
                state
                    .tenants
                    .insert(name.to_string(), new_tenant(name, quotas, shared));
                Ok(())
            })
            .unwrap();
    }
    World {
        _dir: dir,
        store,
        tenancy,
        ledger: Arc::new(StorageLedger::default()),
        sandbox,
        models,
    }
}

impl World {
    pub fn stage(
        &self,
        tenant: &str,
        bytes: &[u8],
    ) -> (weft_store::StagedBlob, weft_tenancy::storage::Reservation) {
        let reservation = self
            .ledger
            .reserve(&self.store, tenant, Want::Exactly(bytes.len() as u64))
            .unwrap();
        let mut writer = self.store.blob_writer().unwrap();
        writer.write(bytes).unwrap();
        (writer.finish().unwrap(), reservation)
    }

    pub fn push_model(&self, tenant: &str, name: &str, version: u64) -> Result<()> {
        self.push_model_as(tenant, name, version, "echo")
    }

    /// Pushes a model that behaves as `behaviour` says: `echo`, `fail`, `trap` or `double`.
    pub fn push_model_as(
        &self,
        tenant: &str,
        name: &str,
        version: u64,
        behaviour: &str,
    ) -> Result<()> {
        let onnx = format!("onnx {name} {version} {behaviour}");
        let (staged, reservation) = self.stage(tenant, onnx.as_bytes());
        self.tenancy
            .push_model(
                tenant,
                ModelUpload {
                    name: name.into(),
                    version,
                    config_text: "platform = \"onnx\"\n".into(),
                    staged,
                    size: onnx.len() as u64,
                    reservation,
                },
            )
            .map(drop)
    }

    pub fn apply(&self, tenant: &str, name: &str, toml: &str) -> Result<()> {
        let (staged, reservation) = self.stage(tenant, toml.as_bytes());
        self.tenancy
            .apply_graph(
                tenant,
                GraphUpload {
                    name: name.into(),
                    file: format!("graphs/{name}.toml").into(),
                    staged,
                    reservation,
                    dry_run: false,
                },
            )
            .map(drop)
    }

    pub fn register_key(&self, tenant: &str) -> SecretKey {
        let secret = SecretKey::generate().unwrap();
        let public = secret.public();
        self.tenancy
            .change(Some(tenant), |state| {
                state.register_signing_key(
                    tenant,
                    SigningKey {
                        id: public.key_id(),
                        public_key: public.to_base64(),
                        created_unix: 0,
                        revoked: false,
                    },
                )
            })
            .unwrap();
        secret
    }

    pub fn push_plugin(
        &self,
        tenant: &str,
        secret: &SecretKey,
        name: &str,
        version: &str,
        bytes: &[u8],
    ) -> Result<()> {
        let signature = secret.sign_plugin(bytes, tenant, name, version);
        let (staged, reservation) = self.stage(tenant, bytes);
        self.tenancy
            .push_plugin(
                tenant,
                PluginUpload {
                    name: name.into(),
                    version: version.into(),
                    signature: signature.signature,
                    key_id: signature.key_id,
                    staged,
                    size: bytes.len() as u64,
                    reservation,
                },
            )
            .map(drop)
    }
}

pub fn graph(name: &str, version: u64, model: &str) -> String {
    format!(
        r#"name = "{name}"
version = {version}
[[input]]
name = "x"
datatype = "FP32"
shape = [-1, 2]
[[output]]
name = "y"
datatype = "FP32"
shape = [-1, 2]
from = "m.y"
[[node]]
name = "m"
kind = "model"
model = "{model}"
inputs = ["request"]
"#
    )
}

pub fn plugin_graph(name: &str, plugin: &str, grant: &str) -> String {
    format!(
        r#"name = "{name}"
version = 1
[[input]]
name = "x"
datatype = "FP32"
shape = [-1, 2]
[[output]]
name = "x"
datatype = "FP32"
shape = [-1, 2]
from = "p.x"
[[node]]
name = "p"
kind = "transformer"
plugin = "{plugin}"
models = ["{grant}"]
inputs = ["request"]
"#
    )
}
