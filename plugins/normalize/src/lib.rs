//! `normalize`: a transformer for FP32 inputs.
//!
//! Params: `mode` = `zscore` (default) or `scale`. `zscore` uses `mean` and `std` when given,
//! otherwise each row's own mean and standard deviation over the last dimension; `scale`
//! computes `x * scale + shift` (defaults 1 and 0). Non-FP32 inputs pass through untouched.

use weft_sdk::{Error, NamedTensor, Params, Tensor, Transformer, param, param_f32};

struct Normalize;

/// Applies the configured normalization to one row of values.
pub fn normalize_row(row: &mut [f32], params: &Params) -> Result<(), Error> {
    match param(params, "mode").unwrap_or("zscore") {
        "scale" => {
            let scale = param_f32(params, "scale")?.unwrap_or(1.0);
            let shift = param_f32(params, "shift")?.unwrap_or(0.0);
            row.iter_mut().for_each(|v| *v = *v * scale + shift);
        }
        "zscore" => {
            let n = row.len().max(1) as f32;
            let mean = match param_f32(params, "mean")? {
                Some(mean) => mean,
                None => row.iter().sum::<f32>() / n,
            };
            let std = match param_f32(params, "std")? {
                Some(std) => std,
                None => (row.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / n).sqrt(),
            };
            let std = if std > f32::EPSILON { std } else { 1.0 };
            row.iter_mut().for_each(|v| *v = (*v - mean) / std);
        }
        other => {
            return Err(Error::InvalidInput(format!(
                "normalize: unknown mode '{other}' (zscore or scale)"
            )));
        }
    }
    Ok(())
}

impl Transformer for Normalize {
    fn transform(inputs: Vec<NamedTensor>, params: Params) -> Result<Vec<NamedTensor>, Error> {
        inputs
            .into_iter()
            .map(|input| {
                if input.tensor.datatype() != weft_sdk::Datatype::Fp32 {
                    return Ok(input);
                }
                let shape = input.tensor.shape();
                let mut values = input.tensor.to_f32()?;
                let row = shape
                    .last()
                    .map(|&d| d as usize)
                    .filter(|&d| d > 0)
                    .unwrap_or(values.len().max(1));
                for chunk in values.chunks_mut(row) {
                    normalize_row(chunk, &params)?;
                }
                Ok(NamedTensor {
                    name: input.name,
                    tensor: Tensor::from_f32(&shape, &values)?,
                })
            })
            .collect()
    }
}

weft_sdk::export_transformer!(Normalize);
