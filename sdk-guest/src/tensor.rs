//! Typed views over host tensors, parameter helpers, and the one-line model call.

use crate::bindings::wasi::nn::{graph, tensor as nn};
use crate::bindings::weft::plugin::types::{Datatype, Error, NamedTensor, Params, Tensor};

macro_rules! typed_views {
    ($($to:ident, $from:ident, $ty:ty, $datatype:ident, $size:expr;)*) => {
        impl Tensor {
            $(
                #[doc = concat!("Copies the data out as `", stringify!($ty), "` values; fails unless the tensor is ", stringify!($datatype), ".")]
                ///
                /// ```ignore
                /// let values = tensor.to_f32()?;
                /// ```
                pub fn $to(&self) -> Result<Vec<$ty>, Error> {
                    self.expect(Datatype::$datatype)?;
                    Ok(self
                        .data()
                        .chunks_exact($size)
                        .map(|chunk| {
                            let mut bytes = [0u8; $size];
                            bytes.copy_from_slice(chunk);
                            <$ty>::from_le_bytes(bytes)
                        })
                        .collect())
                }

                #[doc = concat!("Makes a ", stringify!($datatype), " tensor of `shape` from `values`.")]
                ///
                /// ```ignore
                /// let tensor = Tensor::from_f32(&[1, 2], &[0.5, 1.5])?;
                /// ```
                pub fn $from(shape: &[u32], values: &[$ty]) -> Result<Tensor, Error> {
                    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                    Tensor::create(Datatype::$datatype, shape, &data)
                }
            )*
        }
    };
}

typed_views! {
    to_f32, from_f32, f32, Fp32, 4;
    to_f64, from_f64, f64, Fp64, 8;
    to_i64, from_i64, i64, Int64, 8;
    to_i32, from_i32, i32, Int32, 4;
    to_i16, from_i16, i16, Int16, 2;
    to_i8, from_i8, i8, Int8, 1;
    to_u64, from_u64, u64, Uint64, 8;
    to_u32, from_u32, u32, Uint32, 4;
    to_u16, from_u16, u16, Uint16, 2;
    to_u8, from_u8, u8, Uint8, 1;
}

impl Tensor {
    /// Fails with `invalid-input` unless the tensor has `datatype`.
    ///
    /// ```ignore
    /// tensor.expect(Datatype::Fp32)?;
    /// ```
    pub fn expect(&self, datatype: Datatype) -> Result<(), Error> {
        let actual = self.datatype();
        if actual == datatype {
            Ok(())
        } else {
            Err(Error::InvalidInput(format!(
                "expected a {datatype:?} tensor, got {actual:?}"
            )))
        }
    }

    /// Number of elements (product of the shape).
    ///
    /// ```ignore
    /// let n = tensor.element_count();
    /// ```
    pub fn element_count(&self) -> usize {
        self.shape().iter().map(|&d| d as usize).product()
    }

    /// Copies out a BOOL tensor.
    ///
    /// ```ignore
    /// let mask: Vec<bool> = tensor.to_bool()?;
    /// ```
    pub fn to_bool(&self) -> Result<Vec<bool>, Error> {
        self.expect(Datatype::Bool)?;
        Ok(self.data().iter().map(|&b| b != 0).collect())
    }

    /// Makes a BOOL tensor.
    ///
    /// ```ignore
    /// let mask = Tensor::from_bool(&[2], &[true, false])?;
    /// ```
    pub fn from_bool(shape: &[u32], values: &[bool]) -> Result<Tensor, Error> {
        let data: Vec<u8> = values.iter().map(|&b| u8::from(b)).collect();
        Tensor::create(Datatype::Bool, shape, &data)
    }

    /// Copies out the elements of a BYTES tensor.
    ///
    /// ```ignore
    /// let texts: Vec<Vec<u8>> = tensor.to_bytes()?;
    /// ```
    pub fn to_bytes(&self) -> Result<Vec<Vec<u8>>, Error> {
        self.expect(Datatype::Bytes)?;
        let data = self.data();
        let mut elements = Vec::new();
        let mut offset = 0usize;
        while offset + 4 <= data.len() {
            let length = u32::from_le_bytes([
                data[offset],
                data[offset + 1],
                data[offset + 2],
                data[offset + 3],
            ]) as usize;
            let start = offset + 4;
            let end = start + length;
            if end > data.len() {
                return Err(Error::InvalidInput("malformed BYTES tensor".into()));
            }
            elements.push(data[start..end].to_vec());
            offset = end;
        }
        Ok(elements)
    }

    /// Makes a BYTES tensor from elements.
    ///
    /// ```ignore
    /// let labels = Tensor::from_bytes(&[2], &[b"cat".as_slice(), b"dog"])?;
    /// ```
    pub fn from_bytes<E: AsRef<[u8]>>(shape: &[u32], elements: &[E]) -> Result<Tensor, Error> {
        let mut data = Vec::new();
        for element in elements {
            let element = element.as_ref();
            data.extend_from_slice(&(element.len() as u32).to_le_bytes());
            data.extend_from_slice(element);
        }
        Tensor::create(Datatype::Bytes, shape, &data)
    }
}

/// The value of node parameter `key`, if the graph set it.
///
/// ```ignore
/// let mode = weft_sdk::param(&params, "mode").unwrap_or("zscore");
/// ```
pub fn param<'a>(params: &'a Params, key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Parameter `key` parsed as `f32`; an unparsable value is an `invalid-input` error.
///
/// ```ignore
/// let scale = weft_sdk::param_f32(&params, "scale")?.unwrap_or(1.0);
/// ```
pub fn param_f32(params: &Params, key: &str) -> Result<Option<f32>, Error> {
    param(params, key)
        .map(|v| {
            v.trim().parse::<f32>().map_err(|_| {
                Error::InvalidInput(format!("parameter '{key}' must be a number, got '{v}'"))
            })
        })
        .transpose()
}

/// Parameter `key` parsed as `usize`.
///
/// ```ignore
/// let k = weft_sdk::param_usize(&params, "top_k")?.unwrap_or(1);
/// ```
pub fn param_usize(params: &Params, key: &str) -> Result<Option<usize>, Error> {
    param(params, key)
        .map(|v| {
            v.trim().parse::<usize>().map_err(|_| {
                Error::InvalidInput(format!(
                    "parameter '{key}' must be a whole number, got '{v}'"
                ))
            })
        })
        .transpose()
}

fn nn_type(datatype: Datatype) -> Option<nn::TensorType> {
    Some(match datatype {
        Datatype::Fp16 => nn::TensorType::Fp16,
        Datatype::Fp32 => nn::TensorType::Fp32,
        Datatype::Fp64 => nn::TensorType::Fp64,
        Datatype::Bf16 => nn::TensorType::Bf16,
        Datatype::Uint8 => nn::TensorType::U8,
        Datatype::Int32 => nn::TensorType::I32,
        Datatype::Int64 => nn::TensorType::I64,
        _ => return None,
    })
}

fn weft_type(ty: nn::TensorType) -> Datatype {
    match ty {
        nn::TensorType::Fp16 => Datatype::Fp16,
        nn::TensorType::Fp32 => Datatype::Fp32,
        nn::TensorType::Fp64 => Datatype::Fp64,
        nn::TensorType::Bf16 => Datatype::Bf16,
        nn::TensorType::U8 => Datatype::Uint8,
        nn::TensorType::I32 => Datatype::Int32,
        nn::TensorType::I64 => Datatype::Int64,
    }
}

fn model_error(model: &str, error: crate::bindings::wasi::nn::errors::Error) -> Error {
    Error::Model(format!(
        "model '{model}': {:?}: {}",
        error.code(),
        error.data()
    ))
}

/// Calls a model granted to this node, by name, through `wasi:nn`, in one line.
///
/// ```ignore
/// let outputs = weft_sdk::infer("mlp", &[("x", &tensor)])?;
/// ```
pub fn infer(model: &str, inputs: &[(&str, &Tensor)]) -> Result<Vec<NamedTensor>, Error> {
    let graph = graph::load_by_name(model).map_err(|e| model_error(model, e))?;
    compute(model, graph, inputs)
}

/// Where a plugin asks a granted model to run (`wasi:nn`'s execution target).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Cpu,
    Gpu,
}

/// Like [`infer`], on the device asked for: the host refuses (`unsupported-operation`, saying
/// where the model runs) when the granted model is not there, instead of running it elsewhere.
///
/// ```ignore
/// let outputs = weft_sdk::infer_on("wide", weft_sdk::Target::Gpu, &[("x", &tensor)])?;
/// ```
pub fn infer_on(
    model: &str,
    target: Target,
    inputs: &[(&str, &Tensor)],
) -> Result<Vec<NamedTensor>, Error> {
    let target = match target {
        Target::Cpu => graph::ExecutionTarget::Cpu,
        Target::Gpu => graph::ExecutionTarget::Gpu,
    };
    let graph = graph::load(&[model.as_bytes().to_vec()], graph::GraphEncoding::Onnx, target)
        .map_err(|e| model_error(model, e))?;
    compute(model, graph, inputs)
}

fn compute(
    model: &str,
    graph: graph::Graph,
    inputs: &[(&str, &Tensor)],
) -> Result<Vec<NamedTensor>, Error> {
    let context = graph
        .init_execution_context()
        .map_err(|e| model_error(model, e))?;
    let mut nn_inputs = Vec::with_capacity(inputs.len());
    for (name, tensor) in inputs {
        let datatype = tensor.datatype();
        let ty = nn_type(datatype).ok_or_else(|| {
            Error::InvalidInput(format!(
                "input '{name}' is {datatype:?}, which wasi-nn cannot carry"
            ))
        })?;
        nn_inputs.push((
            name.to_string(),
            nn::Tensor::new(&tensor.shape(), ty, &tensor.data()),
        ));
    }
    let outputs = context
        .compute(nn_inputs)
        .map_err(|e| model_error(model, e))?;
    outputs
        .into_iter()
        .map(|(name, output)| {
            let tensor =
                Tensor::create(weft_type(output.ty()), &output.dimensions(), &output.data())?;
            Ok(NamedTensor { name, tensor })
        })
        .collect()
}
