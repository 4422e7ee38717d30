//! Weft's own asynchronous `wasi:nn` host (0.2.0-rc-2024-10-28), lending the host's models to
//! plugins.
//!
//! Why not wasmtime-wasi-nn's ONNX backend: it serializes calls on one mutex per graph, handles
//! only f32, blocks the calling thread, and panics on malformed input. Here:
//! - `load-by-name` resolves only the models granted to this plugin for this call (the caller
//!   resolved the names in the tenant's namespace); anything else is `not-found`.
//! - `load` of raw model bytes is refused with `security`: plugins use the host's models only.
//!   `load` whose one builder is a granted model's name loads that model with an explicit
//!   `execution-target`: `gpu` is accepted where the model runs on a GPU and refused
//!   (`unsupported-operation`, with where it runs) where it does not, and likewise `cpu`, so a
//!   plugin that asks for a device never silently gets another. `load-by-name` takes the model
//!   wherever it runs.
//! - `compute` awaits the model's async `infer`, so it never blocks a tokio worker.
//! - Every malformed tensor or failed call is a wasi-nn error with a message, never a trap.
//! - Every tensor, graph, context and error is charged to the call's host budget and deleted
//!   when the call ends: a warm instance keeps no handle (and no model grant) across calls.

use std::sync::Arc;

use bytes::Bytes;
use wasmtime::component::Resource;
use weft_core::{DataType, Model, NamedTensor, Tensor};

use crate::bindings::wasi::nn::errors::{self, ErrorCode};
use crate::bindings::wasi::nn::graph::{self, ExecutionTarget, GraphEncoding};
use crate::bindings::wasi::nn::inference;
use crate::bindings::wasi::nn::tensor::{self, TensorType};
use crate::state::{Owned, PluginState};

/// A wasi-nn tensor: bytes in the host, typed with wasi-nn's small set of types.
#[derive(Debug)]
pub struct NnTensor {
    pub dimensions: Vec<u32>,
    pub ty: TensorType,
    pub data: Bytes,
}

/// A model a plugin loaded by name.
pub struct NnGraph {
    pub name: String,
    pub model: Arc<dyn Model>,
}

/// An execution context over a loaded model.
pub struct NnContext {
    pub name: String,
    pub model: Arc<dyn Model>,
}

/// A wasi-nn error: a code and a message saying what was wrong.
#[derive(Debug)]
pub struct NnError {
    pub code: ErrorCode,
    pub message: String,
}

fn datatype_of(ty: TensorType) -> DataType {
    match ty {
        TensorType::Fp16 => DataType::Fp16,
        TensorType::Fp32 => DataType::Fp32,
        TensorType::Fp64 => DataType::Fp64,
        TensorType::Bf16 => DataType::Bf16,
        TensorType::U8 => DataType::Uint8,
        TensorType::I32 => DataType::Int32,
        TensorType::I64 => DataType::Int64,
    }
}

fn tensor_type_of(datatype: DataType) -> Option<TensorType> {
    Some(match datatype {
        DataType::Fp16 => TensorType::Fp16,
        DataType::Fp32 => TensorType::Fp32,
        DataType::Fp64 => TensorType::Fp64,
        DataType::Bf16 => TensorType::Bf16,
        DataType::Uint8 => TensorType::U8,
        DataType::Int32 => TensorType::I32,
        DataType::Int64 => TensorType::I64,
        _ => return None,
    })
}

impl PluginState {
    fn nn_error<T>(
        &mut self,
        code: ErrorCode,
        message: impl Into<String>,
    ) -> wasmtime::Result<Result<T, Resource<NnError>>> {
        let message = message.into();
        let bytes = message.len();
        let error = NnError { code, message };
        Ok(Err(self.push_owned(
            error,
            Owned::NnError,
            bytes,
            "a wasi-nn error",
        )?))
    }

    /// Turns the guest's named wasi-nn tensors into core tensors, checking byte lengths.
    fn core_inputs(
        &mut self,
        inputs: Vec<(String, Resource<NnTensor>)>,
    ) -> wasmtime::Result<Result<Vec<NamedTensor>, String>> {
        let mut converted = Vec::with_capacity(inputs.len());
        for (name, handle) in inputs {
            let tensor = self.delete_owned(handle)?;
            let shape = tensor.dimensions.iter().map(|&d| d as usize).collect();
            match Tensor::new(datatype_of(tensor.ty), shape, tensor.data) {
                Ok(core) => converted.push(NamedTensor::new(name, core)),
                Err(error) => return Ok(Err(format!("input '{name}': {error}"))),
            }
        }
        Ok(Ok(converted))
    }
}

impl errors::Host for PluginState {}

impl errors::HostError for PluginState {
    fn code(&mut self, error: Resource<NnError>) -> wasmtime::Result<ErrorCode> {
        Ok(self.table.get(&error)?.code)
    }

    fn data(&mut self, error: Resource<NnError>) -> wasmtime::Result<String> {
        Ok(self.table.get(&error)?.message.clone())
    }

    fn drop(&mut self, error: Resource<NnError>) -> wasmtime::Result<()> {
        self.delete_owned(error)?;
        Ok(())
    }
}

impl tensor::Host for PluginState {}

impl tensor::HostTensor for PluginState {
    fn new(
        &mut self,
        dimensions: Vec<u32>,
        ty: TensorType,
        data: Vec<u8>,
    ) -> wasmtime::Result<Resource<NnTensor>> {
        // Byte length is checked at `compute`, where a mismatch can be reported as an error.
        let bytes = data.len().saturating_add(dimensions.len() * 4);
        let tensor = NnTensor {
            dimensions,
            ty,
            data: Bytes::from(data),
        };
        self.push_owned(tensor, Owned::NnTensor, bytes, "wasi-nn tensor")
    }

    fn dimensions(&mut self, tensor: Resource<NnTensor>) -> wasmtime::Result<Vec<u32>> {
        Ok(self.table.get(&tensor)?.dimensions.clone())
    }

    fn ty(&mut self, tensor: Resource<NnTensor>) -> wasmtime::Result<TensorType> {
        Ok(self.table.get(&tensor)?.ty)
    }

    fn data(&mut self, tensor: Resource<NnTensor>) -> wasmtime::Result<Vec<u8>> {
        Ok(self.table.get(&tensor)?.data.to_vec())
    }

    fn drop(&mut self, tensor: Resource<NnTensor>) -> wasmtime::Result<()> {
        self.delete_owned(tensor)?;
        Ok(())
    }
}

impl graph::Host for PluginState {
    fn load(
        &mut self,
        builder: Vec<Vec<u8>>,
        encoding: GraphEncoding,
        target: ExecutionTarget,
    ) -> wasmtime::Result<Result<Resource<NnGraph>, Resource<NnError>>> {
        // One builder that is a granted model's name: that model, on the device asked for.
        let granted = match builder.as_slice() {
            [name] => std::str::from_utf8(name).ok().and_then(|name| {
                let gpu = self.grants.get(name)?.serving().gpu;
                Some((name.to_owned(), gpu))
            }),
            _ => None,
        };
        let Some((name, gpu)) = granted else {
            return self.nn_error(
                ErrorCode::Security,
                "loading model bytes from a plugin is not allowed; use load-by-name with a \
                 model granted to this graph node (or load with its name as the only builder \
                 to ask for an execution target)",
            );
        };
        if !matches!(encoding, GraphEncoding::Onnx | GraphEncoding::Autodetect) {
            return self.nn_error(
                ErrorCode::InvalidEncoding,
                format!(
                    "model '{name}' is an ONNX model; load it with encoding onnx or autodetect"
                ),
            );
        }
        let refusal = match (target, gpu) {
            (ExecutionTarget::Gpu, Some(_)) | (ExecutionTarget::Cpu, None) => None,
            (ExecutionTarget::Gpu, None) => Some(format!(
                "model '{name}' runs on the CPU, not a GPU; load it with execution-target cpu \
                 (or by name)"
            )),
            (ExecutionTarget::Cpu, Some(device)) => Some(format!(
                "model '{name}' runs on GPU {device}, not the CPU; load it with \
                 execution-target gpu (or by name)"
            )),
            (ExecutionTarget::Tpu, _) => Some(format!(
                "model '{name}' cannot run on a TPU: Weft runs models on the CPU and on NVIDIA \
                 GPUs"
            )),
        };
        if let Some(message) = refusal {
            return self.nn_error(ErrorCode::UnsupportedOperation, message);
        }
        self.load_by_name(name)
    }

    fn load_by_name(
        &mut self,
        name: String,
    ) -> wasmtime::Result<Result<Resource<NnGraph>, Resource<NnError>>> {
        let Some(model) = self.grants.get(&name).cloned() else {
            let message = format!("model '{name}' is not granted to this plugin");
            return self.nn_error(ErrorCode::NotFound, message);
        };
        let bytes = name.len();
        let graph = NnGraph { name, model };
        Ok(Ok(self.push_owned(
            graph,
            Owned::NnGraph,
            bytes,
            "a wasi-nn graph",
        )?))
    }
}

impl graph::HostGraph for PluginState {
    fn init_execution_context(
        &mut self,
        graph: Resource<NnGraph>,
    ) -> wasmtime::Result<Result<Resource<NnContext>, Resource<NnError>>> {
        let graph = self.table.get(&graph)?;
        let context = NnContext {
            name: graph.name.clone(),
            model: Arc::clone(&graph.model),
        };
        let bytes = context.name.len();
        Ok(Ok(self.push_owned(
            context,
            Owned::NnContext,
            bytes,
            "a wasi-nn execution context",
        )?))
    }

    fn drop(&mut self, graph: Resource<NnGraph>) -> wasmtime::Result<()> {
        self.delete_owned(graph)?;
        Ok(())
    }
}

impl inference::Host for PluginState {}

impl inference::HostGraphExecutionContext for PluginState {
    async fn compute(
        &mut self,
        context: Resource<NnContext>,
        inputs: Vec<(String, Resource<NnTensor>)>,
    ) -> wasmtime::Result<Result<Vec<(String, Resource<NnTensor>)>, Resource<NnError>>> {
        let (name, model) = {
            let context = self.table.get(&context)?;
            (context.name.clone(), Arc::clone(&context.model))
        };
        let inputs = match self.core_inputs(inputs)? {
            Ok(inputs) => inputs,
            Err(message) => {
                return self.nn_error(
                    ErrorCode::InvalidArgument,
                    format!("model '{name}': {message}"),
                );
            }
        };
        if let Err(error) = model.metadata().validate_inputs(&inputs) {
            return self.nn_error(
                ErrorCode::InvalidArgument,
                format!("model '{name}': {error}"),
            );
        }
        // The model call waits on the model, not on plugin code: give the CPU turn to others
        // for its duration.
        let turn = self.cpu.clone();
        if let Some(turn) = &turn {
            turn.release();
        }
        let request = self.request.clone();
        let outputs = model.infer(&request, inputs).await;
        if let Some(turn) = &turn {
            turn.take().await;
        }
        let outputs = match outputs {
            Ok(outputs) => outputs,
            Err(error) => {
                return self.nn_error(ErrorCode::RuntimeError, format!("model '{name}': {error}"));
            }
        };
        let mut converted = Vec::with_capacity(outputs.len());
        for output in outputs {
            let datatype = output.tensor.datatype();
            let Some(ty) = tensor_type_of(datatype) else {
                let message = format!(
                    "model '{name}' output '{}' is {datatype}, which wasi-nn cannot carry",
                    output.name
                );
                return self.nn_error(ErrorCode::UnsupportedOperation, message);
            };
            let dimensions = output.tensor.shape().iter().map(|&d| d as u32).collect();
            let bytes = output.tensor.data().len();
            let tensor = NnTensor {
                dimensions,
                ty,
                data: output.tensor.data().clone(),
            };
            let handle = self.push_owned(tensor, Owned::NnTensor, bytes, "a model output")?;
            converted.push((output.name, handle));
        }
        Ok(Ok(converted))
    }

    fn drop(&mut self, context: Resource<NnContext>) -> wasmtime::Result<()> {
        self.delete_owned(context)?;
        Ok(())
    }
}
