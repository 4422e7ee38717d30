//! Tries to load raw model bytes through wasi:nn, which Weft refuses with `security`.
use weft_sdk::bindings::wasi::nn::graph::{self, ExecutionTarget, GraphEncoding};
struct RawLoad;
impl weft_sdk::Transformer for RawLoad {
    fn transform(
        _: Vec<weft_sdk::NamedTensor>,
        _: weft_sdk::Params,
    ) -> Result<Vec<weft_sdk::NamedTensor>, weft_sdk::Error> {
        match graph::load(&[vec![0u8; 16]], GraphEncoding::Onnx, ExecutionTarget::Cpu) {
            Ok(_) => Ok(Vec::new()),
            Err(error) => Err(weft_sdk::Error::Model(format!(
                "{:?}: {}",
                error.code(),
                error.data()
            ))),
        }
    }
}
weft_sdk::export_transformer!(RawLoad);
