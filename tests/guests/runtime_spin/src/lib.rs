//! Loops forever (the deadline must stop it), or only `iterations` times when that param is set,
//! so the same plugin can show that a call after a deadline works.
struct Spin;
impl weft_sdk::Transformer for Spin {
    fn transform(
        inputs: Vec<weft_sdk::NamedTensor>,
        params: weft_sdk::Params,
    ) -> Result<Vec<weft_sdk::NamedTensor>, weft_sdk::Error> {
        let limit = weft_sdk::param_usize(&params, "iterations")?
            .map(|n| n as u64)
            .unwrap_or(u64::MAX);
        let mut counter: u64 = 0;
        while counter < limit {
            counter = std::hint::black_box(counter + 1);
        }
        Ok(inputs)
    }
}
weft_sdk::export_transformer!(Spin);
