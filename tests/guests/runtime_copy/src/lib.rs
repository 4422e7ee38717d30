//! Copies every input's bytes into the guest and builds a new tensor from them: every datatype
//! makes the round trip through guest memory. Also echoes params as a BYTES tensor `params`.
use weft_sdk::{NamedTensor, Tensor};
struct Copy;
impl weft_sdk::Transformer for Copy {
    fn transform(
        inputs: Vec<NamedTensor>,
        params: weft_sdk::Params,
    ) -> Result<Vec<NamedTensor>, weft_sdk::Error> {
        let mut outputs = Vec::new();
        for input in inputs {
            let tensor = Tensor::create(
                input.tensor.datatype(),
                &input.tensor.shape(),
                &input.tensor.data(),
            )?;
            outputs.push(NamedTensor {
                name: input.name,
                tensor,
            });
        }
        let pairs: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        outputs.push(NamedTensor {
            name: "params".into(),
            tensor: Tensor::from_bytes(&[pairs.len() as u32], &pairs)?,
        });
        weft_sdk::log(weft_sdk::Level::Info, "copied");
        Ok(outputs)
    }
}
weft_sdk::export_transformer!(Copy);
