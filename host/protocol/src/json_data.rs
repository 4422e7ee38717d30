//! Tensor `data` in JSON: parsing flat or nested arrays into little-endian bytes, and writing
//! bytes back out as a flat JSON array without building a `serde_json::Value` tree.

use half::{bf16, f16};
use serde::ser::{Serialize, SerializeSeq, Serializer};
use serde_json::Value;
use weft_core::{DataType, Error, Result, bytes_elements, encode_bytes_elements};

/// Flattens `data` (row-major, any nesting) into the tensor's byte form, checking each element's
/// JSON type and range and that there are exactly `expected` elements.
pub fn parse(name: &str, datatype: DataType, data: &Value, expected: usize) -> Result<Vec<u8>> {
    // Sized by the data actually sent, never by the client's claimed shape (which may be huge).
    let mut leaves = Vec::new();
    flatten(data, &mut leaves);
    if leaves.len() != expected {
        return Err(Error::invalid(format!(
            "input '{name}': shape needs {expected} elements but data has {}",
            leaves.len()
        )));
    }
    let bad = |index: usize, value: &Value| {
        Error::invalid(format!(
            "input '{name}': element {index} ({value}) is not a valid {datatype} value"
        ))
    };
    if datatype == DataType::Bytes {
        let strings = leaves
            .iter()
            .enumerate()
            .map(|(index, value)| {
                value
                    .as_str()
                    .map(str::as_bytes)
                    .ok_or_else(|| bad(index, value))
            })
            .collect::<Result<Vec<&[u8]>>>()?;
        return encode_bytes_elements(strings);
    }
    let size = datatype.element_size().unwrap_or(1);
    let mut out = Vec::with_capacity(leaves.len() * size);
    for (index, value) in leaves.iter().enumerate() {
        let ok = match datatype {
            DataType::Bool => value.as_bool().map(|b| out.push(u8::from(b))),
            DataType::Uint8 => int::<u8>(value).map(|v| out.extend(v.to_le_bytes())),
            DataType::Uint16 => int::<u16>(value).map(|v| out.extend(v.to_le_bytes())),
            DataType::Uint32 => int::<u32>(value).map(|v| out.extend(v.to_le_bytes())),
            DataType::Uint64 => value.as_u64().map(|v| out.extend(v.to_le_bytes())),
            DataType::Int8 => int::<i8>(value).map(|v| out.extend(v.to_le_bytes())),
            DataType::Int16 => int::<i16>(value).map(|v| out.extend(v.to_le_bytes())),
            DataType::Int32 => int::<i32>(value).map(|v| out.extend(v.to_le_bytes())),
            DataType::Int64 => value.as_i64().map(|v| out.extend(v.to_le_bytes())),
            DataType::Fp16 => narrow(value, f16::from_f64).map(|v| out.extend(v.to_le_bytes())),
            DataType::Bf16 => narrow(value, bf16::from_f64).map(|v| out.extend(v.to_le_bytes())),
            DataType::Fp32 => narrow(value, |v| v as f32).map(|v| out.extend(v.to_le_bytes())),
            DataType::Fp64 => value.as_f64().map(|v| out.extend(v.to_le_bytes())),
            DataType::Bytes => None,
        };
        if ok.is_none() {
            return Err(bad(index, value));
        }
    }
    Ok(out)
}

fn flatten<'a>(value: &'a Value, out: &mut Vec<&'a Value>) {
    match value {
        Value::Array(items) => items.iter().for_each(|item| flatten(item, out)),
        leaf => out.push(leaf),
    }
}

/// An integer within the target type's range; floats and out-of-range values are refused.
fn int<T: TryFrom<i64> + TryFrom<u64>>(value: &Value) -> Option<T> {
    match (value.as_i64(), value.as_u64()) {
        (Some(signed), _) => T::try_from(signed).ok(),
        (None, Some(unsigned)) => T::try_from(unsigned).ok(),
        _ => None,
    }
}

/// A JSON number rounded to a narrower float; a finite number that overflows to infinity is
/// refused rather than silently becoming `inf`.
fn narrow<T: Copy + Into<f64>>(value: &Value, convert: impl Fn(f64) -> T) -> Option<T> {
    let narrow = convert(value.as_f64()?);
    narrow.into().is_finite().then_some(narrow)
}

/// Checks that every `BYTES` element is UTF-8, since JSON can only carry strings.
pub fn check_utf8(name: &str, data: &[u8]) -> Result<()> {
    for (index, element) in bytes_elements(data)?.enumerate() {
        if std::str::from_utf8(element).is_err() {
            return Err(Error::invalid(format!(
                "output '{name}' element {index} is BYTES that is not valid UTF-8; request the \
                 output with binary_data: true"
            )));
        }
    }
    Ok(())
}

/// Serializes a tensor's bytes as a flat JSON array. For `BYTES`, call [`check_utf8`] first.
pub struct JsonData<'a> {
    pub datatype: DataType,
    pub data: &'a [u8],
}

fn chunks<const N: usize>(data: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    data.chunks_exact(N).map(|chunk| {
        let mut array = [0u8; N];
        array.copy_from_slice(chunk);
        array
    })
}

/// JSON has no NaN or infinity: those become `null`, as serde_json writes them. `f32` values are
/// written with the shortest text that reads back as the same `f32` (FP16/BF16 widen to `f32`).
fn float<S: SerializeSeq, F: Serialize + Into<f64> + Copy>(
    seq: &mut S,
    value: F,
) -> std::result::Result<(), S::Error> {
    if value.into().is_finite() {
        seq.serialize_element(&value)
    } else {
        seq.serialize_element(&())
    }
}

impl Serialize for JsonData<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let data = self.data;
        let count = self.datatype.element_size().map(|size| data.len() / size);
        let mut seq = serializer.serialize_seq(count)?;
        match self.datatype {
            DataType::Bool => data
                .iter()
                .try_for_each(|&b| seq.serialize_element(&(b != 0)))?,
            DataType::Uint8 => data.iter().try_for_each(|b| seq.serialize_element(b))?,
            DataType::Int8 => data
                .iter()
                .try_for_each(|&b| seq.serialize_element(&(b as i8)))?,
            DataType::Uint16 => {
                chunks(data).try_for_each(|c| seq.serialize_element(&u16::from_le_bytes(c)))?
            }
            DataType::Int16 => {
                chunks(data).try_for_each(|c| seq.serialize_element(&i16::from_le_bytes(c)))?
            }
            DataType::Uint32 => {
                chunks(data).try_for_each(|c| seq.serialize_element(&u32::from_le_bytes(c)))?
            }
            DataType::Int32 => {
                chunks(data).try_for_each(|c| seq.serialize_element(&i32::from_le_bytes(c)))?
            }
            DataType::Uint64 => {
                chunks(data).try_for_each(|c| seq.serialize_element(&u64::from_le_bytes(c)))?
            }
            DataType::Int64 => {
                chunks(data).try_for_each(|c| seq.serialize_element(&i64::from_le_bytes(c)))?
            }
            DataType::Fp16 => {
                chunks(data).try_for_each(|c| float(&mut seq, f16::from_le_bytes(c).to_f32()))?
            }
            DataType::Bf16 => {
                chunks(data).try_for_each(|c| float(&mut seq, bf16::from_le_bytes(c).to_f32()))?
            }
            DataType::Fp32 => {
                chunks(data).try_for_each(|c| float(&mut seq, f32::from_le_bytes(c)))?
            }
            DataType::Fp64 => {
                chunks(data).try_for_each(|c| float(&mut seq, f64::from_le_bytes(c)))?
            }
            DataType::Bytes => {
                let elements = bytes_elements(data).map_err(serde::ser::Error::custom)?;
                for element in elements {
                    let text = std::str::from_utf8(element).map_err(serde::ser::Error::custom)?;
                    seq.serialize_element(text)?;
                }
            }
        }
        seq.end()
    }
}
