//! Calls the model named by param `model` through wasi:nn with all its inputs; by name, or on
//! the execution target param `target` names (`cpu` or `gpu`).
struct CallModel;
impl weft_sdk::Transformer for CallModel {
    fn transform(
        inputs: Vec<weft_sdk::NamedTensor>,
        params: weft_sdk::Params,
    ) -> Result<Vec<weft_sdk::NamedTensor>, weft_sdk::Error> {
        let model = weft_sdk::param(&params, "model").unwrap_or("mlp");
        let named: Vec<(&str, &weft_sdk::Tensor)> = inputs
            .iter()
            .map(|i| (i.name.as_str(), &i.tensor))
            .collect();
        match weft_sdk::param(&params, "target") {
            Some("gpu") => weft_sdk::infer_on(model, weft_sdk::Target::Gpu, &named),
            Some("cpu") => weft_sdk::infer_on(model, weft_sdk::Target::Cpu, &named),
            _ => weft_sdk::infer(model, &named),
        }
    }
}
weft_sdk::export_transformer!(CallModel);
