//! `mean-combine`: a combiner averaging same-named FP32 outputs of its branches.
//!
//! Params: `weight.<branch>` gives a branch's weight (default 1); the result is the weighted
//! mean. Every branch must produce the same outputs with the same shapes.

use weft_sdk::{Branch, Combiner, Error, NamedTensor, Params, Tensor, param_f32};

struct MeanCombine;

impl Combiner for MeanCombine {
    fn combine(branches: Vec<Branch>, params: Params) -> Result<Vec<NamedTensor>, Error> {
        let first = branches
            .first()
            .ok_or_else(|| Error::InvalidInput("mean-combine: no branches".into()))?;
        let names: Vec<String> = first.outputs.iter().map(|o| o.name.clone()).collect();
        let mut weights = Vec::with_capacity(branches.len());
        for branch in &branches {
            weights.push(param_f32(&params, &format!("weight.{}", branch.name))?.unwrap_or(1.0));
        }
        let total: f32 = weights.iter().sum();
        if total <= 0.0 {
            return Err(Error::InvalidInput(
                "mean-combine: weights must sum to more than 0".into(),
            ));
        }
        let mut outputs = Vec::with_capacity(names.len());
        for name in names {
            let mut shape = None;
            let mut sum: Vec<f32> = Vec::new();
            for (branch, weight) in branches.iter().zip(&weights) {
                let output = branch
                    .outputs
                    .iter()
                    .find(|o| o.name == name)
                    .ok_or_else(|| {
                        Error::InvalidInput(format!(
                            "mean-combine: branch '{}' has no output '{name}'",
                            branch.name
                        ))
                    })?;
                let this_shape = output.tensor.shape();
                if shape.get_or_insert_with(|| this_shape.clone()) != &this_shape {
                    return Err(Error::InvalidInput(format!(
                        "mean-combine: output '{name}' has different shapes across branches"
                    )));
                }
                let values = output.tensor.to_f32()?;
                if sum.is_empty() {
                    sum = vec![0.0; values.len()];
                }
                sum.iter_mut()
                    .zip(values)
                    .for_each(|(s, v)| *s += v * weight);
            }
            sum.iter_mut().for_each(|s| *s /= total);
            outputs.push(NamedTensor {
                name,
                tensor: Tensor::from_f32(&shape.unwrap_or_default(), &sum)?,
            });
        }
        Ok(outputs)
    }
}

weft_sdk::export_combiner!(MeanCombine);
