//! Tenants' plugins compiled on demand under the plugin cache budget: nothing compiles when a
//! replica builds its scopes, the first call compiles once however many wait, the least
//! recently used compiled plugin makes room, and no call fails because of it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use weft_core::{DataType, NamedTensor, RequestContext, Tensor};
use weft_engine::ModelRegistry;
use weft_engine::lazy::Residency;
use weft_store::Store;
use weft_tenancy::backends::NoObserver;
use weft_tenancy::{Tenancy, TenancyConfig};

fn x() -> NamedTensor {
    let x = Tensor::new(DataType::Fp32, vec![1, 2], Bytes::from(vec![0u8; 8])).unwrap();
    NamedTensor::new("x", x)
}

async fn call(tenancy: &Tenancy, graph: &str) {
    let scope = tenancy.scope("acme").unwrap();
    let (_, served) = scope.registry.resolve(graph, None).unwrap();
    let request = RequestContext::for_tenant("acme");
    let outputs = served.infer(&request, vec![x()]).await.unwrap();
    assert_eq!(outputs.len(), 1, "{graph}");
}

/// Pushes plugins p1..=count and a graph g<i> over each.
fn push_plugins(world: &World, count: usize) {
    let secret = world.register_key("acme");
    world.push_model("acme", "m", 1).unwrap();
    for i in 1..=count {
        let bytes = format!("wasm plugin {i}");
        world
            .push_plugin("acme", &secret, &format!("p{i}"), "1", bytes.as_bytes())
            .unwrap();
        world
            .apply(
                "acme",
                &format!("g{i}"),
                &plugin_graph(&format!("g{i}"), &format!("p{i}"), "m"),
            )
            .unwrap();
    }
}

#[tokio::test]
async fn the_least_recently_used_compiled_plugin_makes_room_and_no_call_fails() {
    // Room for two compiled plugins of three.
    let residency = Residency::for_plugins(2 * FAKE_COMPILED_BYTES + 50, None);
    let world = world_with(
        &["acme"],
        ModelRegistry::default(),
        &[],
        Some(Arc::clone(&residency)),
    );
    push_plugins(&world, 3);
    // Each push compiled its plugin once (to check it) and kept it while there was room.
    assert_eq!(world.sandbox.compiles.load(Ordering::SeqCst), 3);
    assert_eq!(residency.resident_bytes(), 2 * FAKE_COMPILED_BYTES);
    // p1 made room for p3; calling it compiles it again, and keeps it for the next call.
    call(&world.tenancy, "g1").await;
    assert_eq!(world.sandbox.compiles.load(Ordering::SeqCst), 4);
    call(&world.tenancy, "g1").await;
    assert_eq!(world.sandbox.compiles.load(Ordering::SeqCst), 4);
    // Round after round over three plugins with room for two: every call answers, and the
    // budget holds.
    for _ in 0..3 {
        for graph in ["g1", "g2", "g3"] {
            call(&world.tenancy, graph).await;
            assert!(residency.resident_bytes() <= residency.budget());
        }
    }
    assert_eq!(world.sandbox.seen.lock().unwrap().len(), 2 + 9);
}

#[tokio::test]
async fn a_restarted_replica_compiles_nothing_until_a_call_and_then_once() {
    let residency = Residency::for_plugins(u64::MAX, None);
    let world = world_with(&["acme"], ModelRegistry::default(), &[], Some(residency));
    push_plugins(&world, 2);
    let World {
        _dir: dir,
        store,
        tenancy,
        ..
    } = world;
    drop((tenancy, store));
    let sandbox = Arc::new(FakeSandbox::default());
    let models = Arc::new(FakeModels::default());
    let residency = Residency::for_plugins(u64::MAX, None);
    let tenancy = Tenancy::new(TenancyConfig {
        store: Arc::new(Store::open(dir.path()).unwrap()),
        platform: ModelRegistry::default(),
        plugins: Arc::clone(&sandbox) as _,
        models: models as _,
        observer: Arc::new(NoObserver),
        admin_key: None,
        bootstrap_key: None,
        residency: None,
        plugin_residency: Some(Arc::clone(&residency)),
    })
    .unwrap();
    // Scopes and graphs are built from the recorded roles: nothing compiled, nothing held.
    assert_eq!(sandbox.compiles.load(Ordering::SeqCst), 0);
    assert_eq!(residency.resident_bytes(), 0);
    let scope = tenancy.scope("acme").unwrap();
    assert!(scope.registry.resolve("g1", None).is_ok());
    // Sixteen first calls at once share one compile.
    let calls = (0..16).map(|_| call(&tenancy, "g1"));
    futures_util::future::join_all(calls).await;
    assert_eq!(sandbox.compiles.load(Ordering::SeqCst), 1);
    assert_eq!(residency.resident_bytes(), FAKE_COMPILED_BYTES);
    assert_eq!(sandbox.seen.lock().unwrap().len(), 16);
}
