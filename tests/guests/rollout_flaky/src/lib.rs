//! A candidate that misbehaves on some inputs, for the rollout tests: when the first FP32
//! value of the first input is below 0.2 it fails with an error (clients drawing values
//! uniformly from [0, 1) see 20 % failures), when it is 1.0 or more it traps; otherwise it
//! returns its inputs unchanged.
struct Flaky;
impl weft_sdk::Transformer for Flaky {
    fn transform(
        inputs: Vec<weft_sdk::NamedTensor>,
        _: weft_sdk::Params,
    ) -> Result<Vec<weft_sdk::NamedTensor>, weft_sdk::Error> {
        let first = match inputs.first() {
            Some(input) if input.tensor.datatype() == weft_sdk::Datatype::Fp32 => {
                input.tensor.to_f32()?.first().copied()
            }
            _ => None,
        };
        match first {
            Some(value) if value < 0.2 => Err(weft_sdk::Error::Other(format!(
                "rollout_flaky: failing on purpose for {value}"
            ))),
            Some(value) if value >= 1.0 => core::arch::wasm32::unreachable(),
            _ => Ok(inputs),
        }
    }
}
weft_sdk::export_transformer!(Flaky);
