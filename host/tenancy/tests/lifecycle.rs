//! The tenancy layer with fakes of the sandbox and the model backend (no wasmtime, no ONNX
//! Runtime, no process): the artifact lifecycle (immutability, signatures, delete integrity),
//! scope building (hot swap, namespace isolation, shared platform models, grants) and the
//! quotas at the door. The store is the real embedded one in a temporary directory: it is as
//! fast as a fake (the whole file runs in well under a second) and cannot drift from the real
//! behaviour.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use weft_core::{DataType, ErrorKind, Model, ModelMetadata, NamedTensor, RequestContext};
use weft_engine::ModelRegistry;
use weft_store::Quotas;
use weft_tenancy::lifecycle::{ArtifactKind, ModelUpload, PluginUpload, new_tenant};

#[test]
fn versions_are_immutable_and_a_push_swaps_the_scope() {
    let world = world(&["acme"]);
    let before = world.tenancy.scope("acme").unwrap();
    world.push_model("acme", "m", 1).unwrap();
    let error = world.push_model("acme", "m", 1).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Conflict, "{error}");
    assert!(error.to_string().contains("immutable"), "{error}");
    // The old scope (held by requests in flight) is untouched; the new one serves the model.
    assert!(before.registry.resolve("m", None).is_err());
    let after = world.tenancy.scope("acme").unwrap();
    assert!(after.registry.resolve("m", Some("1")).is_ok());
    // The push loaded it once and the rebuild reused it.
    assert_eq!(world.models.loads.load(Ordering::SeqCst), 1);
    // A refused model is never stored.
    let (staged, reservation) = world.stage("acme", b"garbage");
    let error = world
        .tenancy
        .push_model(
            "acme",
            ModelUpload {
                name: "bad".into(),
                version: 1,
                config_text: "platform = \"onnx\"\n".into(),
                staged,
                size: 7,
                reservation,
            },
        )
        .unwrap_err();
    assert!(error.to_string().contains("not an ONNX model"), "{error}");
    assert!(
        !world.store.state().tenants["acme"]
            .models
            .contains_key("bad")
    );
}

#[test]
fn a_model_a_graph_needs_cannot_be_deleted_until_the_graph_goes() {
    let world = world(&["acme"]);
    world.push_model("acme", "m", 1).unwrap();
    world.push_model("acme", "m", 2).unwrap();
    world.apply("acme", "g", &graph("g", 1, "m")).unwrap();
    // One of two versions may go: the graph takes the latest left.
    world
        .tenancy
        .delete_artifact("acme", ArtifactKind::Model, "m", Some("1"))
        .unwrap();
    let error = world
        .tenancy
        .delete_artifact("acme", ArtifactKind::Model, "m", None)
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Conflict);
    assert!(error.to_string().contains("'g' version 1"), "{error}");
    let unknown = world
        .tenancy
        .delete_artifact("acme", ArtifactKind::Model, "m", Some("7"))
        .unwrap_err();
    assert_eq!(unknown.kind(), ErrorKind::NotFound);
    let bad = world
        .tenancy
        .delete_artifact("acme", ArtifactKind::Graph, "g", Some("one"))
        .unwrap_err();
    assert_eq!(bad.kind(), ErrorKind::InvalidArgument);
    world
        .tenancy
        .delete_artifact("acme", ArtifactKind::Graph, "g", None)
        .unwrap();
    world
        .tenancy
        .delete_artifact("acme", ArtifactKind::Model, "m", None)
        .unwrap();
    let scope = world.tenancy.scope("acme").unwrap();
    assert!(scope.registry.resolve("m", None).is_err());
    assert!(scope.registry.resolve("g", None).is_err());
}

#[test]
fn tenants_never_see_each_others_names() {
    let world = world(&["acme", "rival"]);
    world.push_model("acme", "m", 1).unwrap();
    // The rival cannot build on it, delete it, or learn that it exists.
    let error = world.apply("rival", "g", &graph("g", 1, "m")).unwrap_err();
    assert!(error.to_string().contains("unknown model 'm'"), "{error}");
    let error = world
        .tenancy
        .delete_artifact("rival", ArtifactKind::Model, "m", None)
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::NotFound);
    assert!(
        world
            .tenancy
            .scope("rival")
            .unwrap()
            .registry
            .resolve("m", None)
            .is_err()
    );
    // The same name is the rival's own to use.
    world.push_model("rival", "m", 1).unwrap();
}

#[tokio::test]
async fn plugins_need_a_valid_signature_and_their_grants_resolve_once_per_node() {
    let world = world(&["acme", "rival"]);
    let secret = world.register_key("acme");
    world.push_model("acme", "m", 1).unwrap();
    // Signed for another tenant, or over other bytes: refused before any compile.
    let forged = secret.sign_plugin(b"wasm a", "rival", "p", "1");
    let (staged, reservation) = world.stage("acme", b"wasm a");
    let error = world
        .tenancy
        .push_plugin(
            "acme",
            PluginUpload {
                name: "p".into(),
                version: "1".into(),
                signature: forged.signature,
                key_id: forged.key_id,
                staged,
                size: 6,
                reservation,
            },
        )
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::InvalidArgument, "{error}");
    assert_eq!(world.sandbox.compiles.load(Ordering::SeqCst), 0);
    // The rival has no such key.
    let error = world
        .push_plugin("rival", &secret, "p", "1", b"wasm a")
        .unwrap_err();
    assert!(error.to_string().contains("unknown signing key"), "{error}");
    world
        .push_plugin("acme", &secret, "p", "1", b"wasm a")
        .unwrap();
    let error = world
        .push_plugin("acme", &secret, "p", "1", b"wasm b")
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Conflict);
    world
        .apply("acme", "g", &plugin_graph("g", "p", "m"))
        .unwrap();
    // The plugin cannot go while the graph uses it.
    let error = world
        .tenancy
        .delete_artifact("acme", ArtifactKind::Plugin, "p", None)
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Conflict);
    // A call runs for the request's tenant, with the node's grant and the tenant's deadline.
    let scope = world.tenancy.scope("acme").unwrap();
    let (_, served) = scope.registry.resolve("g", None).unwrap();
    let x = weft_core::Tensor::new(DataType::Fp32, vec![1, 2], Bytes::from(vec![0u8; 8])).unwrap();
    let request = RequestContext::for_tenant("acme");
    for _ in 0..2 {
        served
            .infer(&request, vec![NamedTensor::new("x", x.clone())])
            .await
            .unwrap();
    }
    let seen = world.sandbox.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    for (grants, limits, tenant) in seen {
        assert_eq!(grants, vec!["m".to_string()]);
        assert_eq!(limits.deadline, Duration::from_millis(250));
        assert_eq!(tenant.as_deref(), Some("acme"));
    }
    let provenance = request.cost().provenance.lock().unwrap().clone();
    assert_eq!(provenance.len(), 1, "{provenance:?}");
    assert_eq!(provenance[0]["plugin"], "p");
}

#[test]
fn a_revoked_signing_key_makes_its_plugins_and_their_graphs_unavailable() {
    let world = world(&["acme"]);
    let secret = world.register_key("acme");
    world.push_model("acme", "m", 1).unwrap();
    world
        .push_plugin("acme", &secret, "p", "1", b"wasm a")
        .unwrap();
    world
        .apply("acme", "g", &plugin_graph("g", "p", "m"))
        .unwrap();
    let key_id = secret.public().key_id();
    world
        .tenancy
        .change(Some("acme"), |state| {
            for key in &mut state.tenants.get_mut("acme").unwrap().signing_keys {
                if key.id == key_id {
                    key.revoked = true;
                }
            }
            Ok(())
        })
        .unwrap();
    let scope = world.tenancy.scope("acme").unwrap();
    let error = scope.registry.resolve("g", None).err().unwrap();
    assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
    assert!(error.to_string().contains("revoked"), "{error}");
}

#[test]
fn the_door_refuses_past_the_rate_quota_with_a_retry_hint() {
    let world = world(&[]);
    world
        .tenancy
        .change(Some("slow"), |state| {
            let quotas = Quotas {
                requests_per_second: 1.0,
                burst: 2,
                ..Quotas::default()
            };
            state
                .tenants
                .insert("slow".into(), new_tenant("slow", quotas, Vec::new()));
            Ok(())
        })
        .unwrap();
    let scope = world.tenancy.scope("slow").unwrap();
    scope.charge().unwrap();
    scope.charge().unwrap();
    let refusal = scope.charge().unwrap_err();
    assert_eq!(refusal.error.kind(), ErrorKind::ResourceExhausted);
    assert!(refusal.retry_after_seconds.is_some());
}

fn echo() -> Arc<dyn Model> {
    Arc::new(Echo(ModelMetadata {
        platform: "onnxruntime_onnx".into(),
        inputs: vec![spec("x")],
        outputs: vec![spec("y")],
        max_batch_size: 0,
    }))
}

#[test]
fn a_scope_holds_the_platform_models_it_shares_and_its_own_models_over_them() {
    let mut platform = ModelRegistry::default();
    for name in ["shared", "private", "m"] {
        platform
            .add_model_version(name, 1, weft_engine::ModelState::Ready(echo()))
            .unwrap();
    }
    let world = world_sharing(&["acme"], platform, &["shared", "m"]);
    let scope = world.tenancy.scope("acme").unwrap();
    assert!(scope.registry.resolve("shared", None).is_ok());
    assert!(
        scope.registry.resolve("private", None).is_err(),
        "an operator model the tenant does not share is in its scope"
    );
    // A graph can use what is shared, and not what is not, with the same answer as a name
    // that exists nowhere.
    world.apply("acme", "g", &graph("g", 1, "shared")).unwrap();
    let error = world
        .apply("acme", "h", &graph("h", 1, "private"))
        .unwrap_err();
    assert!(
        error.to_string().contains("unknown model 'private'"),
        "{error}"
    );
    // Rebuilding the scope for a graph loaded no model of the tenant's.
    assert_eq!(world.models.loads.load(Ordering::SeqCst), 0);
    assert!(
        world
            .tenancy
            .scope("acme")
            .unwrap()
            .registry
            .resolve("g", None)
            .is_ok()
    );
    // The tenant's own model of a shared name hides the operator's in its scope only.
    world.push_model("acme", "m", 7).unwrap();
    let scope = world.tenancy.scope("acme").unwrap();
    assert_eq!(scope.registry.resolve("m", None).unwrap().0, 7);
    assert!(scope.registry.resolve("m", Some("1")).is_err());
    assert!(world.tenancy.platform().resolve("m", Some("1")).is_ok());
}

/// Pushes `onnx` as model `name` version 1 with `config`.
fn push_with_config(
    world: &World,
    tenant: &str,
    name: &str,
    config: &str,
    onnx: &[u8],
) -> weft_core::Result<()> {
    let (staged, reservation) = world.stage(tenant, onnx);
    world
        .tenancy
        .push_model(
            tenant,
            ModelUpload {
                name: name.into(),
                version: 1,
                config_text: config.into(),
                staged,
                size: onnx.len() as u64,
                reservation,
            },
        )
        .map(drop)
}

#[test]
fn gpu_models_need_a_gpu_memory_quota_and_fit_in_it() {
    let world = world(&["acme"]);
    let gpu = "platform = \"onnx\"\n[ort]\nexecution = \"cuda\"\n";
    let mut onnx = b"onnx gpu ".to_vec();
    onnx.resize(600 << 10, b'w');
    // The default quota is 0: no GPU models at all, and the refusal says which quota.
    let error = push_with_config(&world, "acme", "g", gpu, &onnx).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::PermissionDenied, "{error}");
    assert!(
        error.to_string().contains("gpu_memory_mb quota is 0"),
        "{error}"
    );
    world
        .tenancy
        .change(Some("acme"), |state| {
            state.tenants.get_mut("acme").unwrap().quotas.gpu_memory_mb = 1;
            Ok(())
        })
        .unwrap();
    // 600 KiB fits in 1 MiB once, not twice; CPU models do not count against it.
    push_with_config(&world, "acme", "g", gpu, &onnx).unwrap();
    push_with_config(&world, "acme", "c", "platform = \"onnx\"\n", &onnx).unwrap();
    let error = push_with_config(&world, "acme", "h", gpu, &onnx).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::PermissionDenied, "{error}");
    assert!(
        error
            .to_string()
            .contains("gpu_memory_mb quota of 1 MiB has 0 MiB left"),
        "{error}"
    );
}
