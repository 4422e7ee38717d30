//! Tensor `data` in JSON, both ways, without ever building a `serde_json::Value` tree: reading
//! flat or nested arrays straight into little-endian bytes (a serde visitor that checks types,
//! ranges and the element count as it goes), and writing bytes back out as a flat JSON array.

use std::fmt;

use half::{bf16, f16};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeSeq, Serializer};
use serde_json::value::RawValue;
use weft_core::{DataType, Error, Result, bytes_elements};

/// The most bytes reserved for one input before any element has been read. The reservation is
/// also bounded by what the data's text can hold, so a claimed shape alone never allocates; past
/// it the buffer grows with the elements that actually arrive.
const RESERVE_CAP: usize = 16 << 20;

/// Longest string value quoted back in an error message.
const QUOTE_CAP: usize = 64;

/// Decodes `data` (row-major, flat or nested to any depth serde_json accepts) straight into the
/// tensor's byte form, checking each element's JSON type and range as it is read and stopping as
/// soon as there are more than `expected` elements. `json` is the request's JSON text that `data`
/// was borrowed from; it only serves to give syntax errors their position in the whole request.
pub fn parse(
    name: &str,
    datatype: DataType,
    data: &RawValue,
    json: &[u8],
    expected: usize,
) -> Result<Vec<u8>> {
    let text = data.get();
    // Every element takes at least one character and a separator, so the text bounds the count.
    let reserve = match datatype.element_size() {
        Some(size) => expected.min(text.len() / 2 + 1).saturating_mul(size),
        None => text.len(),
    };
    let mut sink = Sink {
        name,
        datatype,
        expected,
        count: 0,
        out: Vec::with_capacity(reserve.min(RESERVE_CAP)),
        refused: None,
    };
    // A fresh deserializer over the data alone: serde_json's recursion limit (128 levels) bounds
    // how deeply nested arrays can make the visitor below recurse.
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let outcome = DataSeed(&mut sink)
        .deserialize(&mut deserializer)
        .and_then(|()| deserializer.end());
    if let Some(error) = sink.refused.take() {
        return Err(error);
    }
    if let Err(error) = outcome {
        return Err(syntax_error(name, data, json, &error));
    }
    if sink.count != expected {
        return Err(Error::invalid(format!(
            "input '{name}': shape needs {expected} elements but data has {}",
            sink.count
        )));
    }
    Ok(sink.out)
}

/// An error serde_json found only on the second, typed pass over the data (the first pass, which
/// borrowed it as raw text, checks syntax but neither depth nor number range), placed in the
/// request's text rather than in the data's.
fn syntax_error(name: &str, data: &RawValue, json: &[u8], error: &serde_json::Error) -> Error {
    let message = error.to_string();
    let suffix = format!(" at line {} column {}", error.line(), error.column());
    let bare = message.strip_suffix(&suffix).unwrap_or(&message);
    if bare == "recursion limit exceeded" {
        return Error::invalid(format!(
            "input '{name}': data nests arrays more than {MAX_NESTING} levels deep"
        ));
    }
    // `data` is a slice of `json`, so its offset there is the difference of the addresses.
    let start = (data.get().as_ptr() as usize)
        .checked_sub(json.as_ptr() as usize)
        .filter(|&start| start <= json.len());
    let Some(start) = start else {
        return Error::invalid(format!(
            "malformed JSON in request: input '{name}' data: {message}"
        ));
    };
    let before = &json[..start];
    let lines_before = before.iter().filter(|&&byte| byte == b'\n').count();
    let (line, column) = if error.line() <= 1 {
        let line_start = before
            .iter()
            .rposition(|&byte| byte == b'\n')
            .map_or(0, |newline| newline + 1);
        (lines_before + 1, start - line_start + error.column())
    } else {
        (lines_before + error.line(), error.column())
    };
    Error::invalid(format!(
        "malformed JSON in request: input '{name}' data: {bare} at line {line} column {column}"
    ))
}

/// Deepest array nesting `data` may have: serde_json refuses the 128th level.
pub const MAX_NESTING: usize = 127;

/// Where decoded elements go, with the count so far and the first refusal.
struct Sink<'n> {
    name: &'n str,
    datatype: DataType,
    expected: usize,
    count: usize,
    out: Vec<u8>,
    /// Set when an element is refused; the serde error that unwinds the parse only carries it.
    refused: Option<Error>,
}

/// One JSON value that is not an array, as the visitor saw it.
#[derive(Clone, Copy)]
enum Leaf<'a> {
    Null,
    Bool(bool),
    Unsigned(u64),
    Signed(i64),
    Float(f64),
    Str(&'a str),
    Object,
}

impl fmt::Display for Leaf<'_> {
    /// As the JSON text would show it; long strings are cut short.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Leaf::Null => f.write_str("null"),
            Leaf::Bool(value) => write!(f, "{value}"),
            Leaf::Unsigned(value) => write!(f, "{value}"),
            Leaf::Signed(value) => write!(f, "{value}"),
            Leaf::Float(value) => match serde_json::Number::from_f64(value) {
                Some(number) => write!(f, "{number}"),
                None => f.write_str("null"),
            },
            Leaf::Str(text) => {
                let cut = text
                    .char_indices()
                    .nth(QUOTE_CAP)
                    .map_or(text.len(), |(index, _)| index);
                let quoted = serde_json::Value::from(&text[..cut]).to_string();
                if cut < text.len() {
                    write!(f, "{}...\"", &quoted[..quoted.len() - 1])
                } else {
                    f.write_str(&quoted)
                }
            }
            Leaf::Object => f.write_str("an object"),
        }
    }
}

impl Sink<'_> {
    /// Appends one element, or records why not and returns the error that stops the parse.
    fn element<E: de::Error>(&mut self, leaf: Leaf<'_>) -> std::result::Result<(), E> {
        if self.count == self.expected {
            let expected = self.expected;
            return self.refuse(format!(
                "input '{}': shape needs {expected} elements but data has more",
                self.name
            ));
        }
        let out = &mut self.out;
        let ok = match self.datatype {
            DataType::Bool => match leaf {
                Leaf::Bool(value) => {
                    out.push(u8::from(value));
                    true
                }
                _ => false,
            },
            DataType::Uint8 => put(out, int::<u8>(leaf), u8::to_le_bytes),
            DataType::Uint16 => put(out, int::<u16>(leaf), u16::to_le_bytes),
            DataType::Uint32 => put(out, int::<u32>(leaf), u32::to_le_bytes),
            DataType::Uint64 => put(out, int::<u64>(leaf), u64::to_le_bytes),
            DataType::Int8 => put(out, int::<i8>(leaf), i8::to_le_bytes),
            DataType::Int16 => put(out, int::<i16>(leaf), i16::to_le_bytes),
            DataType::Int32 => put(out, int::<i32>(leaf), i32::to_le_bytes),
            DataType::Int64 => put(out, int::<i64>(leaf), i64::to_le_bytes),
            DataType::Fp16 => put(out, narrow(leaf, f16::from_f64), f16::to_le_bytes),
            DataType::Bf16 => put(out, narrow(leaf, bf16::from_f64), bf16::to_le_bytes),
            DataType::Fp32 => put(out, narrow(leaf, |v| v as f32), f32::to_le_bytes),
            DataType::Fp64 => put(out, number(leaf), f64::to_le_bytes),
            DataType::Bytes => match leaf {
                Leaf::Str(text) => {
                    let Ok(length) = u32::try_from(text.len()) else {
                        return self.refuse(format!(
                            "input '{}': element {} is a BYTES element longer than 4 GiB",
                            self.name, self.count
                        ));
                    };
                    out.extend_from_slice(&length.to_le_bytes());
                    out.extend_from_slice(text.as_bytes());
                    true
                }
                _ => false,
            },
        };
        if !ok {
            return self.refuse(format!(
                "input '{}': element {} ({leaf}) is not a valid {} value",
                self.name, self.count, self.datatype
            ));
        }
        self.count += 1;
        Ok(())
    }

    fn refuse<E: de::Error>(&mut self, message: String) -> std::result::Result<(), E> {
        self.refused = Some(Error::invalid(message));
        Err(E::custom("tensor data refused"))
    }
}

fn put<T, const N: usize>(out: &mut Vec<u8>, value: Option<T>, le: fn(T) -> [u8; N]) -> bool {
    value
        .map(|value| out.extend_from_slice(&le(value)))
        .is_some()
}

/// An integer within the target type's range; floats and out-of-range values are refused.
fn int<T: TryFrom<i64> + TryFrom<u64>>(leaf: Leaf<'_>) -> Option<T> {
    match leaf {
        Leaf::Unsigned(value) => T::try_from(value).ok(),
        Leaf::Signed(value) => T::try_from(value).ok(),
        _ => None,
    }
}

/// Any JSON number, as `f64`.
fn number(leaf: Leaf<'_>) -> Option<f64> {
    match leaf {
        Leaf::Unsigned(value) => Some(value as f64),
        Leaf::Signed(value) => Some(value as f64),
        Leaf::Float(value) => Some(value),
        _ => None,
    }
}

/// A JSON number rounded to a narrower float; a finite number that overflows to infinity is
/// refused rather than silently becoming `inf`.
fn narrow<T: Copy + Into<f64>>(leaf: Leaf<'_>, convert: impl Fn(f64) -> T) -> Option<T> {
    let narrow = convert(number(leaf)?);
    narrow.into().is_finite().then_some(narrow)
}

/// Reads one JSON value into the sink: arrays are walked (each nested array is one more level of
/// serde_json's bounded recursion), everything else is an element.
struct DataSeed<'s, 'n>(&'s mut Sink<'n>);

impl<'de> DeserializeSeed<'de> for DataSeed<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> std::result::Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DataSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("tensor data: a value or (nested) arrays of values")
    }

    fn visit_unit<E: de::Error>(self) -> std::result::Result<(), E> {
        self.0.element(Leaf::Null)
    }

    fn visit_none<E: de::Error>(self) -> std::result::Result<(), E> {
        self.0.element(Leaf::Null)
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> std::result::Result<(), E> {
        self.0.element(Leaf::Bool(value))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> std::result::Result<(), E> {
        self.0.element(Leaf::Unsigned(value))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> std::result::Result<(), E> {
        self.0.element(Leaf::Signed(value))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> std::result::Result<(), E> {
        self.0.element(Leaf::Float(value))
    }

    fn visit_str<E: de::Error>(self, value: &str) -> std::result::Result<(), E> {
        self.0.element(Leaf::Str(value))
    }

    fn visit_map<A: MapAccess<'de>>(self, _map: A) -> std::result::Result<(), A::Error> {
        self.0.element(Leaf::Object)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        while seq.next_element_seed(DataSeed(&mut *self.0))?.is_some() {}
        Ok(())
    }
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
