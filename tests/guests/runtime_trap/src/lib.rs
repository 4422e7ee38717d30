//! Executes `unreachable`.
struct Trap;
impl weft_sdk::Transformer for Trap {
    fn transform(
        _: Vec<weft_sdk::NamedTensor>,
        _: weft_sdk::Params,
    ) -> Result<Vec<weft_sdk::NamedTensor>, weft_sdk::Error> {
        core::arch::wasm32::unreachable()
    }
}
weft_sdk::export_transformer!(Trap);
