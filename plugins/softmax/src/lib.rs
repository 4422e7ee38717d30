//! `softmax`: a transformer turning FP32 scores into probabilities over the last dimension.
//!
//! Params: `top_k` (optional) also returns `labels` (BYTES [rows, k]) and `scores` (FP32
//! [rows, k]) for the k most likely classes, named by `labels` (comma-separated; defaults to the
//! class index). Non-FP32 inputs pass through.

use weft_sdk::{Error, NamedTensor, Params, Tensor, Transformer, param, param_usize};

struct Softmax;

/// Softmax of one row, numerically stable.
pub fn softmax(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    if sum > 0.0 {
        row.iter_mut().for_each(|v| *v /= sum);
    }
}

impl Transformer for Softmax {
    fn transform(inputs: Vec<NamedTensor>, params: Params) -> Result<Vec<NamedTensor>, Error> {
        let top_k = param_usize(&params, "top_k")?;
        let names: Vec<String> = param(&params, "labels")
            .map(|l| l.split(',').map(|s| s.trim().to_string()).collect())
            .unwrap_or_default();
        let mut outputs = Vec::new();
        for input in inputs {
            if input.tensor.datatype() != weft_sdk::Datatype::Fp32 {
                outputs.push(input);
                continue;
            }
            let shape = input.tensor.shape();
            let mut values = input.tensor.to_f32()?;
            let classes = shape
                .last()
                .map(|&d| d as usize)
                .filter(|&d| d > 0)
                .unwrap_or(1);
            values.chunks_mut(classes).for_each(softmax);
            if let Some(k) = top_k {
                let k = k.min(classes);
                let rows = values.len() / classes;
                let (mut labels, mut scores) = (Vec::new(), Vec::new());
                for row in values.chunks(classes) {
                    let mut order: Vec<usize> = (0..classes).collect();
                    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
                    for &class in &order[..k] {
                        labels.push(
                            names
                                .get(class)
                                .cloned()
                                .unwrap_or_else(|| class.to_string()),
                        );
                        scores.push(row[class]);
                    }
                }
                let top_shape = [rows as u32, k as u32];
                outputs.push(NamedTensor {
                    name: "labels".into(),
                    tensor: Tensor::from_bytes(&top_shape, &labels)?,
                });
                outputs.push(NamedTensor {
                    name: "scores".into(),
                    tensor: Tensor::from_f32(&top_shape, &scores)?,
                });
            }
            outputs.push(NamedTensor {
                name: input.name,
                tensor: Tensor::from_f32(&shape, &values)?,
            });
        }
        Ok(outputs)
    }
}

weft_sdk::export_transformer!(Softmax);
