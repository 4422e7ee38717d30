//! A plugin calling a real ONNX Runtime model through Weft's wasi:nn host gets exactly what a
//! direct call gets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use support::*;
use weft_backends::{OnnxModel, OnnxOptions};
use weft_core::{DataType, Model, NamedTensor, Tensor};
use weft_runtime::{CallContext, PluginRuntime, RuntimeConfig};

#[tokio::test]
async fn plugin_calls_the_onnx_mlp_through_wasi_nn_bit_exactly() {
    weft_backends::init_onnxruntime(&ort_library(), 0).unwrap();
    let path = quickstart().join("models/mlp/1/model.onnx");
    let options = OnnxOptions {
        max_batch_size: 64,
        ..OnnxOptions::default()
    };
    let mlp: Arc<dyn Model> = Arc::new(OnnxModel::load(&path, &options).unwrap());

    let guests = std::env::var_os("WEFT_GUESTS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/guests/wasm32-wasip2/release"));
    let bytes = std::fs::read(guests.join("runtime_call_model.wasm"))
        .expect("guest components missing: run `cargo xtask setup`");
    let runtime = PluginRuntime::new(RuntimeConfig::default()).unwrap();
    let plugin = runtime.load("call_model", &bytes).unwrap();

    let values: Vec<u8> = (0..2 * 64)
        .flat_map(|i| (i as f32 / 37.0 - 1.5).to_le_bytes())
        .collect();
    let x = NamedTensor::new(
        "x",
        Tensor::new(DataType::Fp32, vec![2, 64], Bytes::from(values)).unwrap(),
    );
    let direct = mlp
        .infer(&weft_core::RequestContext::background(), vec![x.clone()])
        .await
        .unwrap();

    let mut grants: HashMap<String, Arc<dyn Model>> = HashMap::new();
    grants.insert("mlp".into(), Arc::clone(&mlp));
    let context = CallContext {
        grants: Arc::new(grants),
        params: vec![("model".into(), "mlp".into())],
        ..CallContext::default()
    };
    let through_plugin = plugin.transform(&context, vec![x]).await.unwrap();
    assert_eq!(through_plugin, direct);
    assert_eq!(through_plugin[0].tensor.shape(), &[2, 10]);
}
