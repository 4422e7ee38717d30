//! Helpers shared by the runtime's integration tests.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use bytes::Bytes;
use weft_core::{DataType, Tensor};
use weft_runtime::{CallContext, Plugin, PluginRuntime, RuntimeConfig};

/// The built guest components; missing ones fail with how to build them.
pub fn guests_dir() -> PathBuf {
    let dir = std::env::var_os("WEFT_GUESTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../target/guests/wasm32-wasip2/release")
        });
    assert!(
        dir.join("runtime_echo.wasm").is_file(),
        "guest components missing in {}: run `cargo xtask setup` (it builds plugins/ and tests/guests/)",
        dir.display()
    );
    dir
}

pub fn runtime() -> PluginRuntime {
    PluginRuntime::new(RuntimeConfig::default()).unwrap()
}

pub fn load(runtime: &PluginRuntime, guest: &str) -> Plugin {
    let bytes = std::fs::read(guests_dir().join(format!("{guest}.wasm"))).unwrap();
    runtime.load(guest, &bytes).unwrap()
}

/// A context carrying only node params.
pub fn context(pairs: &[(&str, &str)]) -> CallContext {
    CallContext {
        params: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..CallContext::default()
    }
}

pub fn f32_tensor(shape: Vec<usize>, values: &[f32]) -> Tensor {
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    Tensor::new(DataType::Fp32, shape, Bytes::from(data)).unwrap()
}

pub fn f32s(tensor: &Tensor) -> Vec<f32> {
    tensor
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
