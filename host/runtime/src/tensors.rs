//! The host side of `weft:plugin/types` and `weft:plugin/host`: tensors that stay in the host
//! until a plugin asks for their bytes (each one charged to the call's host budget), and the
//! plugin's log line (capped and escaped, see `state.rs`).

use bytes::Bytes;
use wasmtime::component::Resource;
use weft_core::{DataType, Tensor};

use crate::bindings::weft::plugin::host::{self, Level};
use crate::bindings::weft::plugin::types::{self, Datatype, Error as GuestError};
use crate::state::{Owned, PluginState};

/// A tensor a plugin holds a handle to. Cloning shares the bytes.
#[derive(Clone, Debug)]
pub struct HostTensor(pub Tensor);

pub(crate) fn to_wit(datatype: DataType) -> Datatype {
    match datatype {
        DataType::Bool => Datatype::Bool,
        DataType::Uint8 => Datatype::Uint8,
        DataType::Uint16 => Datatype::Uint16,
        DataType::Uint32 => Datatype::Uint32,
        DataType::Uint64 => Datatype::Uint64,
        DataType::Int8 => Datatype::Int8,
        DataType::Int16 => Datatype::Int16,
        DataType::Int32 => Datatype::Int32,
        DataType::Int64 => Datatype::Int64,
        DataType::Fp16 => Datatype::Fp16,
        DataType::Bf16 => Datatype::Bf16,
        DataType::Fp32 => Datatype::Fp32,
        DataType::Fp64 => Datatype::Fp64,
        DataType::Bytes => Datatype::Bytes,
    }
}

pub(crate) fn from_wit(datatype: Datatype) -> DataType {
    match datatype {
        Datatype::Bool => DataType::Bool,
        Datatype::Uint8 => DataType::Uint8,
        Datatype::Uint16 => DataType::Uint16,
        Datatype::Uint32 => DataType::Uint32,
        Datatype::Uint64 => DataType::Uint64,
        Datatype::Int8 => DataType::Int8,
        Datatype::Int16 => DataType::Int16,
        Datatype::Int32 => DataType::Int32,
        Datatype::Int64 => DataType::Int64,
        Datatype::Fp16 => DataType::Fp16,
        Datatype::Bf16 => DataType::Bf16,
        Datatype::Fp32 => DataType::Fp32,
        Datatype::Fp64 => DataType::Fp64,
        Datatype::Bytes => DataType::Bytes,
    }
}

impl PluginState {
    fn tensor(&self, handle: &Resource<HostTensor>) -> wasmtime::Result<&Tensor> {
        Ok(&self.table.get(handle)?.0)
    }
}

impl types::Host for PluginState {}

impl types::HostTensor for PluginState {
    fn create(
        &mut self,
        datatype: Datatype,
        shape: Vec<u32>,
        data: Vec<u8>,
    ) -> wasmtime::Result<Result<Resource<HostTensor>, GuestError>> {
        let shape = shape.into_iter().map(|d| d as usize).collect();
        let bytes = data.len();
        match Tensor::new(from_wit(datatype), shape, Bytes::from(data)) {
            Ok(tensor) => Ok(Ok(self.push_owned(
                HostTensor(tensor),
                Owned::Tensor,
                bytes,
                "tensor.create",
            )?)),
            Err(error) => Ok(Err(GuestError::InvalidInput(error.to_string()))),
        }
    }

    fn datatype(&mut self, handle: Resource<HostTensor>) -> wasmtime::Result<Datatype> {
        Ok(to_wit(self.tensor(&handle)?.datatype()))
    }

    fn shape(&mut self, handle: Resource<HostTensor>) -> wasmtime::Result<Vec<u32>> {
        let shape = self.tensor(&handle)?.shape();
        Ok(shape
            .iter()
            .map(|&d| u32::try_from(d).unwrap_or(u32::MAX))
            .collect())
    }

    fn byte_length(&mut self, handle: Resource<HostTensor>) -> wasmtime::Result<u64> {
        Ok(self.tensor(&handle)?.data().len() as u64)
    }

    fn data(&mut self, handle: Resource<HostTensor>) -> wasmtime::Result<Vec<u8>> {
        Ok(self.tensor(&handle)?.data().to_vec())
    }

    fn drop(&mut self, handle: Resource<HostTensor>) -> wasmtime::Result<()> {
        self.delete_owned(handle)?;
        Ok(())
    }
}

impl host::Host for PluginState {
    fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        let level = match level {
            Level::Trace => tracing::Level::TRACE,
            Level::Debug => tracing::Level::DEBUG,
            Level::Info => tracing::Level::INFO,
            Level::Warn => tracing::Level::WARN,
            Level::Error => tracing::Level::ERROR,
        };
        self.log_line(level, &message)
    }
}
