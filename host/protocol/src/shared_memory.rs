//! Triton's system shared memory extension, as far as the wire goes: an input or a requested
//! output names a registered region in its parameters instead of carrying bytes.
//!
//! `shared_memory_region` (the region's name), `shared_memory_byte_size` (bytes of the tensor)
//! and `shared_memory_offset` (from the region's start, default 0). The regions themselves —
//! registering, reading, writing — belong to the server; decoding only asks a
//! [`SharedMemoryInputs`] for an input's bytes.

use bytes::Bytes;
use serde_json::Value;
use weft_core::{Error, Result};

use crate::Parameters;

/// The parameter naming a region.
pub const REGION: &str = "shared_memory_region";
/// The parameter giving the tensor's bytes in the region.
pub const BYTE_SIZE: &str = "shared_memory_byte_size";
/// The parameter giving the tensor's offset in the region.
pub const OFFSET: &str = "shared_memory_offset";

/// Where in which region a tensor lies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedMemoryRef {
    pub region: String,
    pub offset: u64,
    pub byte_size: u64,
}

impl SharedMemoryRef {
    /// The reference `parameters` make for the tensor `name`, if they name a region.
    pub fn from_parameters(name: &str, parameters: &Parameters) -> Result<Option<Self>> {
        let Some(region) = parameters.get(REGION) else {
            return Ok(None);
        };
        let region = region
            .as_str()
            .filter(|region| !region.is_empty())
            .ok_or_else(|| Error::invalid(format!("'{name}': {REGION} must be a region's name")))?;
        let number = |key: &str| -> Result<Option<u64>> {
            match parameters.get(key) {
                None => Ok(None),
                Some(Value::Number(number)) if number.as_u64().is_some() => Ok(number.as_u64()),
                Some(other) => Err(Error::invalid(format!(
                    "'{name}': {key} must be a non-negative integer, not {other}"
                ))),
            }
        };
        let byte_size = number(BYTE_SIZE)?.ok_or_else(|| {
            Error::invalid(format!("'{name}': {REGION} needs {BYTE_SIZE} as well"))
        })?;
        Ok(Some(SharedMemoryRef {
            region: region.to_string(),
            offset: number(OFFSET)?.unwrap_or(0),
            byte_size,
        }))
    }

    /// The parameters a response gives an output written to this place (`byte_size` actual).
    pub fn to_parameters(&self, byte_size: usize) -> Parameters {
        let mut parameters = Parameters::new();
        parameters.insert(REGION.into(), self.region.clone().into());
        parameters.insert(BYTE_SIZE.into(), byte_size.into());
        if self.offset > 0 {
            parameters.insert(OFFSET.into(), self.offset.into());
        }
        parameters
    }
}

/// Whether an output's parameters say its bytes went to shared memory (so none are sent).
pub fn in_shared_memory(parameters: &Parameters) -> bool {
    parameters.contains_key(REGION)
}

/// Reads the bytes of an input that lies in a registered region, for one caller.
pub trait SharedMemoryInputs {
    /// A copy of the bytes at `place` (a copy: the client may change the region at any time).
    fn read(&self, input: &str, place: &SharedMemoryRef) -> Result<Bytes>;
}

/// Resolves inputs when no regions can exist here: every region is unknown.
#[derive(Debug)]
pub struct NoSharedMemory;

impl SharedMemoryInputs for NoSharedMemory {
    fn read(&self, input: &str, place: &SharedMemoryRef) -> Result<Bytes> {
        Err(Error::invalid(format!(
            "input '{input}' names shared memory region '{}', but shared memory inputs are not \
             available here",
            place.region
        )))
    }
}
