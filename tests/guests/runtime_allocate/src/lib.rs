//! Allocates without end: the memory limit must stop it.
struct Allocate;
impl weft_sdk::Transformer for Allocate {
    fn transform(
        _: Vec<weft_sdk::NamedTensor>,
        _: weft_sdk::Params,
    ) -> Result<Vec<weft_sdk::NamedTensor>, weft_sdk::Error> {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(vec![1u8; 1 << 20]);
            std::hint::black_box(&hoard);
        }
    }
}
weft_sdk::export_transformer!(Allocate);
