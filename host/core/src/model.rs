//! What a servable model looks like to the rest of Weft: its metadata and an async `infer`.
//!
//! Input validation against the metadata lives here, once, so every backend refuses a wrong
//! name, datatype, rank or fixed dimension with the same message before its runtime sees it.

use std::future::Future;
use std::pin::Pin;

use crate::{DataType, Error, NamedTensor, RequestContext, Result};

/// A boxed, sendable future; keeps [`Model`] usable as `dyn Model`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A declared input or output: name, datatype and shape with `-1` for a variable dimension.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
}

/// The metadata a model reports over `GET /v2/models/{name}`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelMetadata {
    /// Platform name, as Triton reports it (`onnxruntime_onnx`).
    pub platform: String,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// Largest dimension 0 accepted in one request; 0 means the model does not batch.
    pub max_batch_size: usize,
}

/// How a model version is served, beyond its metadata: what Triton's model configuration
/// (`GET /v2/models/{m}/config`) reports as `instance_group` and `dynamic_batching`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServingConfig {
    /// Calls it runs at once (its sessions); 0 for what is not one model (a graph).
    pub instances: usize,
    /// The dynamic batcher in front of it, if any.
    pub dynamic_batching: Option<DynamicBatchingConfig>,
    /// The CUDA device it runs on; `None` on the CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<u32>,
    /// Device memory its sessions took when they loaded (measured on the device; the CUDA
    /// provider's arena grows further with the first runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory_bytes: Option<u64>,
}

/// A dynamic batcher's settings, as Triton names them.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DynamicBatchingConfig {
    pub preferred_batch_size: Vec<usize>,
    pub max_queue_delay_microseconds: u64,
}

/// A loaded model version that can run inference. Implementations never block the caller's
/// thread: CPU-heavy work is moved off the async runtime's workers.
pub trait Model: Send + Sync {
    fn metadata(&self) -> &ModelMetadata;

    /// How it is served (instances, batching); wrappers pass their inner model's on.
    fn serving(&self) -> ServingConfig {
        ServingConfig::default()
    }

    /// Whether it can serve right now; `Err` carries the reason readiness reports (a model
    /// worker that is restarting, say). In-process models are always healthy once loaded.
    fn health(&self) -> std::result::Result<(), String> {
        Ok(())
    }

    /// Runs the model on inputs that [`ModelMetadata::validate_inputs`] accepted; returns every
    /// output the model declares, in declaration order.
    /// `request` is whom the call runs for and where its costs go (see [`RequestContext`]).
    fn infer<'a>(
        &'a self,
        request: &'a RequestContext,
        inputs: Vec<NamedTensor>,
    ) -> BoxFuture<'a, Result<Vec<NamedTensor>>>;

    /// The request header whose value assigns a client to an arm, for a model that routes
    /// (a rollout): the edge copies it into [`RequestContext::sticky_key`]. Others have none.
    fn sticky_header(&self) -> Option<&str> {
        None
    }

    /// Runs with the request's `parameters` and returns the outputs with response parameters.
    /// Plain models ignore the parameters and add none; graphs read `trace` and report it back.
    fn infer_with_parameters<'a>(
        &'a self,
        request: &'a RequestContext,
        inputs: Vec<NamedTensor>,
        parameters: &'a Parameters,
    ) -> BoxFuture<'a, Result<(Vec<NamedTensor>, Parameters)>> {
        let _ = parameters;
        Box::pin(async move { Ok((self.infer(request, inputs).await?, Parameters::new())) })
    }

    /// For a model loaded on demand (see `weft_engine::lazy`), its load and unload controls;
    /// `None` for one that stays loaded (repository models, graphs).
    fn on_demand(&self) -> Option<&dyn OnDemand> {
        None
    }
}

/// Where a model loaded on demand stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Residence {
    /// Registered: it loads on its first request.
    Registered,
    Loading,
    Loaded,
}

/// The controls of a model loaded on demand: Triton's repository extension (`load`,
/// `unload`) and what the repository index reports.
pub trait OnDemand: Send + Sync {
    fn residence(&self) -> Residence;
    /// Loads it now (a warm-up); done when it is loaded.
    fn load(&self) -> BoxFuture<'_, Result<()>>;
    /// Unloads it now; refused while it serves a request or when it is pinned. The next
    /// request loads it again.
    fn unload(&self) -> Result<()>;
}

/// Request or response parameters, as the V2 protocol carries them (a JSON object).
pub type Parameters = serde_json::Map<String, serde_json::Value>;

impl ModelMetadata {
    pub fn input(&self, name: &str) -> Option<&TensorSpec> {
        self.inputs.iter().find(|spec| spec.name == name)
    }

    pub fn output(&self, name: &str) -> Option<&TensorSpec> {
        self.outputs.iter().find(|spec| spec.name == name)
    }

    /// Checks that the inputs are exactly the declared ones, each with the declared datatype,
    /// rank and fixed dimensions, and that a batching model's dimension 0 is within
    /// `max_batch_size`. Errors name the input, what was expected and what came.
    pub fn validate_inputs(&self, inputs: &[NamedTensor]) -> Result<()> {
        for (index, input) in inputs.iter().enumerate() {
            if inputs[..index].iter().any(|seen| seen.name == input.name) {
                return Err(Error::invalid(format!(
                    "input '{}' appears more than once",
                    input.name
                )));
            }
            let Some(spec) = self.input(&input.name) else {
                return Err(Error::invalid(format!(
                    "unexpected input '{}'; the model's inputs are {}",
                    input.name,
                    names(&self.inputs)
                )));
            };
            spec.check(&input.name, &input.tensor)?;
            if self.max_batch_size > 0 {
                let batch = input.tensor.shape().first().copied().unwrap_or(0);
                if batch > self.max_batch_size {
                    return Err(Error::invalid(format!(
                        "input '{}': batch size {batch} exceeds the model's max_batch_size {}",
                        input.name, self.max_batch_size
                    )));
                }
            }
        }
        if let Some(missing) = self
            .inputs
            .iter()
            .find(|spec| !inputs.iter().any(|input| input.name == spec.name))
        {
            return Err(Error::invalid(format!(
                "missing input '{}' ({} {})",
                missing.name,
                missing.datatype,
                shape_text(&missing.shape)
            )));
        }
        Ok(())
    }
}

impl TensorSpec {
    /// Checks one input tensor against this declaration.
    pub fn check(&self, name: &str, tensor: &crate::Tensor) -> Result<()> {
        self.check_as("input", name, tensor)
    }

    /// Checks one tensor against this declaration; errors start with `<role> '<name>'`.
    pub fn check_as(&self, role: &str, name: &str, tensor: &crate::Tensor) -> Result<()> {
        if tensor.datatype() != self.datatype {
            return Err(Error::invalid(format!(
                "{role} '{name}': expected datatype {} but got {}",
                self.datatype,
                tensor.datatype()
            )));
        }
        let shape = tensor.shape();
        let fits = shape.len() == self.shape.len()
            && self
                .shape
                .iter()
                .zip(shape)
                .all(|(&want, &got)| want < 0 || want as usize == got);
        if !fits {
            return Err(Error::invalid(format!(
                "{role} '{name}': expected shape {} but got {shape:?}",
                shape_text(&self.shape)
            )));
        }
        Ok(())
    }
}

/// `[-1, 64]`-style text for a declared shape.
pub fn shape_text(shape: &[i64]) -> String {
    format!("{shape:?}")
}

fn names(specs: &[TensorSpec]) -> String {
    let quoted: Vec<String> = specs.iter().map(|s| format!("'{}'", s.name)).collect();
    quoted.join(", ")
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::Tensor;

    fn metadata() -> ModelMetadata {
        ModelMetadata {
            platform: "test".into(),
            inputs: vec![TensorSpec {
                name: "x".into(),
                datatype: DataType::Fp32,
                shape: vec![-1, 2],
            }],
            outputs: vec![],
            max_batch_size: 4,
        }
    }

    fn input(name: &str, datatype: DataType, shape: Vec<usize>) -> NamedTensor {
        let bytes = shape.iter().product::<usize>() * datatype.element_size().unwrap_or(1);
        let tensor = Tensor::new(datatype, shape, Bytes::from(vec![0u8; bytes])).unwrap();
        NamedTensor::new(name, tensor)
    }

    fn error_of(inputs: &[NamedTensor]) -> String {
        metadata()
            .validate_inputs(inputs)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn accepts_matching_inputs_with_any_variable_dim() {
        assert!(
            metadata()
                .validate_inputs(&[input("x", DataType::Fp32, vec![3, 2])])
                .is_ok()
        );
    }

    #[test]
    fn names_the_input_and_the_mismatch() {
        assert_eq!(
            error_of(&[input("x", DataType::Fp64, vec![1, 2])]),
            "input 'x': expected datatype FP32 but got FP64"
        );
        assert_eq!(
            error_of(&[input("x", DataType::Fp32, vec![1, 3])]),
            "input 'x': expected shape [-1, 2] but got [1, 3]"
        );
        assert_eq!(
            error_of(&[input("x", DataType::Fp32, vec![2])]),
            "input 'x': expected shape [-1, 2] but got [2]"
        );
        assert_eq!(
            error_of(&[input("y", DataType::Fp32, vec![1, 2])]),
            "unexpected input 'y'; the model's inputs are 'x'"
        );
        assert_eq!(error_of(&[]), "missing input 'x' (FP32 [-1, 2])");
        assert_eq!(
            error_of(&[input("x", DataType::Fp32, vec![5, 2])]),
            "input 'x': batch size 5 exceeds the model's max_batch_size 4"
        );
    }
}
