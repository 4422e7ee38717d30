//! Returns its inputs unchanged (no data is copied into the guest).
struct Echo;
impl weft_sdk::Transformer for Echo {
    fn transform(
        inputs: Vec<weft_sdk::NamedTensor>,
        _: weft_sdk::Params,
    ) -> Result<Vec<weft_sdk::NamedTensor>, weft_sdk::Error> {
        Ok(inputs)
    }
}
weft_sdk::export_transformer!(Echo);
