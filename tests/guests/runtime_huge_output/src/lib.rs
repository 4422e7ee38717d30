//! Returns its first input `copies` times (param, default 1000): a huge output for no memory.
struct HugeOutput;
impl weft_sdk::Transformer for HugeOutput {
    fn transform(
        inputs: Vec<weft_sdk::NamedTensor>,
        params: weft_sdk::Params,
    ) -> Result<Vec<weft_sdk::NamedTensor>, weft_sdk::Error> {
        let copies = weft_sdk::param_usize(&params, "copies")?.unwrap_or(1000);
        let first = inputs
            .into_iter()
            .next()
            .ok_or_else(|| weft_sdk::Error::InvalidInput("needs an input".into()))?;
        let data = first.tensor.data();
        let mut outputs = Vec::new();
        for i in 0..copies {
            let tensor =
                weft_sdk::Tensor::create(first.tensor.datatype(), &first.tensor.shape(), &data)?;
            outputs.push(weft_sdk::NamedTensor {
                name: format!("copy{i}"),
                tensor,
            });
        }
        Ok(outputs)
    }
}
weft_sdk::export_transformer!(HugeOutput);
