//! What crosses between the server and a model worker: length-prefixed `postcard` frames on a
//! Unix socket for the (small) control messages, and one sealed memfd of fixed-size slots for
//! tensor bytes, so a request's tensors are written once into shared memory instead of being
//! serialised into a message.
//!
//! Each in-flight call owns one slot: the server writes the inputs into it, the worker reads
//! them in place (ONNX Runtime gets views of the mapping), runs the model and writes the outputs
//! into the same slot. A tensor that does not fit travels inline in the frame instead, so no
//! size is refused for being larger than a slot; it only costs a copy through the socket.
//!
//! The worker runs a tenant's model and is treated as hostile by the server: every frame
//! length, slot offset and tensor descriptor it sends is checked before use, the memfd is
//! sealed against shrinking (a shrunk mapping would fault the server), and reads out of shared
//! memory are copies, so the worker changing bytes afterwards cannot change what the server
//! answers.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};
use weft_core::{DataType, Error, ErrorKind, Result};

/// Largest frame the worker accepts from the server (a model upload travels in one frame).
pub const MAX_FRAME_TO_WORKER: usize = 4 << 30;

/// Tensor bytes go at offsets aligned to this, so typed views over them are aligned.
pub const ALIGN: usize = 64;

/// Rounds `n` up to [`ALIGN`].
pub fn aligned(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// Messages from the server to a worker.
#[derive(Debug, Serialize, Deserialize)]
pub enum ToWorker {
    /// Load a model from the bytes carried in the frame; answered by [`FromWorker::Loaded`].
    Load {
        call: u64,
        handle: u64,
        #[serde(with = "serde_bytes")]
        onnx: Vec<u8>,
        options: crate::onnx::OnnxOptions,
    },
    /// Free a model's sessions; no answer.
    Unload { handle: u64 },
    /// Run a model on tensors in `slot` (or inline); answered by [`FromWorker::Inferred`].
    Infer {
        call: u64,
        handle: u64,
        slot: u32,
        inputs: Vec<WireTensor>,
    },
}

/// Messages from a worker to the server.
#[derive(Debug, Serialize, Deserialize)]
pub enum FromWorker {
    /// The sandbox is in force and the worker takes requests.
    Ready { sandbox: String },
    Loaded {
        call: u64,
        result: std::result::Result<WireMetadata, WireError>,
    },
    Inferred {
        call: u64,
        result: std::result::Result<Vec<WireTensor>, WireError>,
    },
}

/// A tensor's descriptor; its bytes are in the call's slot or inline.
#[derive(Debug, Serialize, Deserialize)]
pub struct WireTensor {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<u64>,
    pub data: Placement,
}

/// Where a tensor's bytes are.
#[derive(Debug, Serialize, Deserialize)]
pub enum Placement {
    /// `len` bytes at `offset` within the call's slot.
    Slot { offset: u64, len: u64 },
    /// In the frame itself (did not fit the slot).
    Inline(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// A model's metadata as the worker reports it after loading.
#[derive(Debug, Serialize, Deserialize)]
pub struct WireMetadata {
    pub inputs: Vec<weft_core::TensorSpec>,
    pub outputs: Vec<weft_core::TensorSpec>,
}

/// An error with its kind, so a model's "invalid input" stays a 400 across the process boundary.
#[derive(Debug, Serialize, Deserialize)]
pub struct WireError {
    pub kind: u8,
    pub message: String,
}

const KINDS: [ErrorKind; 11] = [
    ErrorKind::InvalidArgument,
    ErrorKind::NotFound,
    ErrorKind::PayloadTooLarge,
    ErrorKind::Unavailable,
    ErrorKind::Unsupported,
    ErrorKind::DeadlineExceeded,
    ErrorKind::Internal,
    ErrorKind::Unauthenticated,
    ErrorKind::PermissionDenied,
    ErrorKind::Conflict,
    ErrorKind::ResourceExhausted,
];

impl From<&Error> for WireError {
    fn from(error: &Error) -> Self {
        WireError {
            kind: KINDS
                .iter()
                .position(|kind| *kind == error.kind())
                .unwrap_or(6) as u8,
            message: error.message().to_string(),
        }
    }
}

impl From<WireError> for Error {
    fn from(error: WireError) -> Self {
        let kind = KINDS
            .get(usize::from(error.kind))
            .copied()
            .unwrap_or(ErrorKind::Internal);
        Error::new(kind, error.message)
    }
}

/// Puts `data` into `slot` after the `used` bytes already there (aligned), or inline when it
/// does not fit; advances `used`.
pub fn place(
    arena: &super::shm::SharedArena,
    slot: u32,
    used: &mut usize,
    data: &[u8],
) -> Result<Placement> {
    let start = aligned(*used);
    if start + data.len() > arena.slot_bytes() {
        return Ok(Placement::Inline(data.to_vec()));
    }
    arena.write(slot, start as u64, data)?;
    *used = start + data.len();
    Ok(Placement::Slot {
        offset: start as u64,
        len: data.len() as u64,
    })
}

/// The body length a frame header announces, refused over `max`.
pub fn frame_len(header: [u8; 4], max: usize) -> std::io::Result<usize> {
    let len = u32::from_le_bytes(header) as usize;
    if len > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is over the limit of {max}"),
        ));
    }
    Ok(len)
}

/// Encodes `message` as one frame: a 4-byte little-endian length, then the postcard bytes.
pub fn encode_frame<T: Serialize>(message: &T) -> Result<Vec<u8>> {
    let mut frame = vec![0u8; 4];
    let body = postcard::to_extend(message, Vec::new())
        .map_err(|error| Error::internal(format!("cannot encode a worker message: {error}")))?;
    let len = u32::try_from(body.len())
        .map_err(|_| Error::invalid("a worker message is larger than 4 GiB"))?;
    frame[..4].copy_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Decodes a frame body.
pub fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T> {
    postcard::from_bytes(body)
        .map_err(|error| Error::internal(format!("malformed worker message: {error}")))
}

/// Reads one frame body (blocking), refusing one longer than `max`. `Ok(None)` at a clean end.
pub fn read_frame(reader: &mut impl Read, max: usize) -> std::io::Result<Option<Vec<u8>>> {
    let mut header = [0u8; 4];
    match reader.read_exact(&mut header) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error),
    }
    let len = frame_len(header, max)?;
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body)?;
    Ok(Some(body))
}

/// Writes one frame (blocking).
pub fn write_frame<T: Serialize>(writer: &mut impl Write, message: &T) -> Result<()> {
    let frame = encode_frame(message)?;
    writer
        .write_all(&frame)
        .map_err(|error| Error::unavailable(format!("model worker connection lost: {error}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_lengths_are_checked() {
        let message = ToWorker::Infer {
            call: 7,
            handle: 2,
            slot: 3,
            inputs: vec![WireTensor {
                name: "x".into(),
                datatype: DataType::Fp32,
                shape: vec![1, 4],
                data: Placement::Slot { offset: 0, len: 16 },
            }],
        };
        let frame = encode_frame(&message).unwrap();
        let body = read_frame(&mut &frame[..], 1 << 20).unwrap().unwrap();
        match decode::<ToWorker>(&body).unwrap() {
            ToWorker::Infer { call, inputs, .. } => {
                assert_eq!(call, 7);
                assert_eq!(inputs[0].shape, vec![1, 4]);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(read_frame(&mut &frame[..], 4).is_err());
        assert!(read_frame(&mut &[][..], 4).unwrap().is_none());
        assert!(decode::<ToWorker>(&[0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn errors_keep_their_kind() {
        let error = Error::invalid("bad input");
        let back: Error = WireError::from(&error).into();
        assert_eq!(back, error);
        let unknown: Error = WireError {
            kind: 200,
            message: "m".into(),
        }
        .into();
        assert_eq!(unknown.kind(), ErrorKind::Internal);
    }
}
