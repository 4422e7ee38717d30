//! Hostile: creates host tensors from one 1 MiB guest buffer in a loop and keeps every handle,
//! so only the call's host-memory budget can stop it (it must fail with `host_memory`).
struct TensorFlood;
impl weft_sdk::Transformer for TensorFlood {
    fn transform(
        _inputs: Vec<weft_sdk::NamedTensor>,
        _params: weft_sdk::Params,
    ) -> Result<Vec<weft_sdk::NamedTensor>, weft_sdk::Error> {
        let buffer = vec![7u8; 1 << 20];
        let mut kept = Vec::new();
        loop {
            kept.push(weft_sdk::Tensor::create(
                weft_sdk::Datatype::Uint8,
                &[1 << 20],
                &buffer,
            )?);
        }
    }
}
weft_sdk::export_transformer!(TensorFlood);
