//! Tensors as the protocol sees them: a datatype, a shape and little-endian row-major bytes.
//!
//! The bytes are a [`Bytes`] so a tensor decoded from a binary request body is a slice of that
//! body, not a copy. `BYTES` tensors keep the binary-extension layout (4-byte little-endian length
//! before each element) so the same representation serves JSON, binary and backends.

use bytes::Bytes;

use crate::{DataType, Error, Result};

/// A tensor whose byte length has been checked against its datatype and shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tensor {
    datatype: DataType,
    shape: Vec<usize>,
    data: Bytes,
}

/// A tensor with the name a model or request gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedTensor {
    pub name: String,
    pub tensor: Tensor,
}

impl NamedTensor {
    pub fn new(name: impl Into<String>, tensor: Tensor) -> Self {
        NamedTensor {
            name: name.into(),
            tensor,
        }
    }
}

impl Tensor {
    /// Builds a tensor, checking that `data` holds exactly `shape`'s element count of `datatype`.
    pub fn new(datatype: DataType, shape: Vec<usize>, data: Bytes) -> Result<Self> {
        let elements = element_count(&shape)?;
        match datatype.element_size() {
            Some(size) => {
                let expected = elements.checked_mul(size).ok_or_else(|| {
                    Error::invalid(format!("shape {shape:?} of {datatype} is too large"))
                })?;
                if data.len() != expected {
                    return Err(Error::invalid(format!(
                        "shape {shape:?} of {datatype} needs {expected} bytes but {} came",
                        data.len()
                    )));
                }
            }
            None => {
                let found = bytes_elements(&data)?.count();
                if found != elements {
                    return Err(Error::invalid(format!(
                        "shape {shape:?} of BYTES needs {elements} elements but {found} came"
                    )));
                }
            }
        }
        if datatype == DataType::Bool && data.iter().any(|&byte| byte > 1) {
            return Err(Error::invalid("BOOL elements must be bytes 0 or 1"));
        }
        Ok(Tensor {
            datatype,
            shape,
            data,
        })
    }

    pub fn datatype(&self) -> DataType {
        self.datatype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The raw little-endian bytes (length-prefixed elements for `BYTES`).
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// Number of elements (the product of the shape; 1 for a scalar).
    pub fn element_count(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Product of the dimensions, refusing overflow.
pub fn element_count(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |count, &dim| count.checked_mul(dim))
        .ok_or_else(|| Error::invalid(format!("shape {shape:?} has too many elements")))
}

/// Iterates the elements of a `BYTES` tensor's binary form, failing if a length prefix points
/// past the end. The iterator is validated eagerly, so iterating it afterwards cannot fail.
pub fn bytes_elements(data: &[u8]) -> Result<impl Iterator<Item = &[u8]>> {
    let mut offset = 0usize;
    let mut spans = Vec::new();
    while offset < data.len() {
        let header = data.get(offset..offset + 4).ok_or_else(|| {
            Error::invalid(format!(
                "BYTES element at byte {offset} has a truncated 4-byte length prefix"
            ))
        })?;
        let length = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let start = offset + 4;
        let end = start.checked_add(length).filter(|&end| end <= data.len());
        let end = end.ok_or_else(|| {
            Error::invalid(format!(
                "BYTES element at byte {offset} claims {length} bytes but only {} remain",
                data.len() - start
            ))
        })?;
        spans.push((start, end));
        offset = end;
    }
    Ok(spans.into_iter().map(move |(start, end)| &data[start..end]))
}

/// Encodes elements into the `BYTES` binary form: each a u32 little-endian length, then the bytes.
pub fn encode_bytes_elements<'a>(elements: impl IntoIterator<Item = &'a [u8]>) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for element in elements {
        let length = u32::try_from(element.len())
            .map_err(|_| Error::invalid("a BYTES element is longer than 4 GiB"))?;
        out.extend_from_slice(&length.to_le_bytes());
        out.extend_from_slice(element);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_size_tensor_needs_exact_byte_length() {
        assert!(Tensor::new(DataType::Fp32, vec![2, 3], Bytes::from(vec![0u8; 24])).is_ok());
        let error = Tensor::new(DataType::Fp32, vec![2, 3], Bytes::from(vec![0u8; 23]));
        assert_eq!(
            error.err().map(|e| e.to_string()),
            Some("shape [2, 3] of FP32 needs 24 bytes but 23 came".to_string())
        );
    }

    #[test]
    fn bytes_tensor_counts_length_prefixed_elements() {
        let data = encode_bytes_elements([&b"ab"[..], b"", b"xyz"]).unwrap_or_default();
        let tensor = Tensor::new(DataType::Bytes, vec![3], Bytes::from(data));
        assert!(tensor.is_ok());
        let short = encode_bytes_elements([&b"ab"[..]]).unwrap_or_default();
        assert!(Tensor::new(DataType::Bytes, vec![2], Bytes::from(short)).is_err());
    }

    #[test]
    fn bytes_prefix_past_the_end_is_an_error_not_a_panic() {
        let mut data = 100u32.to_le_bytes().to_vec();
        data.extend_from_slice(b"abc");
        let error = bytes_elements(&data).err().map(|e| e.to_string());
        assert!(error.is_some_and(|e| e.contains("claims 100 bytes but only 3 remain")));
        assert!(bytes_elements(&[1, 0]).is_err());
    }

    #[test]
    fn bool_rejects_values_other_than_zero_and_one() {
        assert!(Tensor::new(DataType::Bool, vec![2], Bytes::from_static(&[0, 1])).is_ok());
        assert!(Tensor::new(DataType::Bool, vec![2], Bytes::from_static(&[0, 2])).is_err());
    }

    #[test]
    fn overflowing_shape_is_refused() {
        let shape = vec![usize::MAX, 2];
        assert!(Tensor::new(DataType::Uint8, shape, Bytes::new()).is_err());
    }
}
