//! Panics with a message, which must reach the caller's error.
struct Panic;
impl weft_sdk::Transformer for Panic {
    fn transform(
        _: Vec<weft_sdk::NamedTensor>,
        _: weft_sdk::Params,
    ) -> Result<Vec<weft_sdk::NamedTensor>, weft_sdk::Error> {
        panic!("the guest gave up on purpose")
    }
}
weft_sdk::export_transformer!(Panic);
