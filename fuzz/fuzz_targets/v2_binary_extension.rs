//! Fuzzes decoding a V2 request that uses the binary tensor data extension: a JSON header of
//! `Inference-Header-Content-Length` bytes followed by raw tensor bytes.
//!
//! The first two input bytes (little-endian) choose the header length, taken modulo the rest's
//! length plus one so that most inputs split the body somewhere inside it (0 means the whole
//! body is one raw input). Every body that decodes must survive a round trip through the binary
//! encoding unchanged.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use weft_protocol::{decode_infer_request, encode_infer_request};

fuzz_target!(|data: &[u8]| {
    let [low, high, body @ ..] = data else {
        return;
    };
    let header_length = usize::from(u16::from_le_bytes([*low, *high])) % (body.len() + 1);
    let Ok(request) = decode_infer_request(Bytes::copy_from_slice(body), Some(header_length))
    else {
        return;
    };
    if let Some(raw) = &request.raw_single_input {
        assert_eq!(&raw[..], body);
        return;
    }
    let Ok((encoded, encoded_length)) = encode_infer_request(&request.inputs, true) else {
        return;
    };
    let again = match decode_infer_request(Bytes::from(encoded), encoded_length) {
        Ok(again) => again,
        Err(error) => panic!("a decoded request re-encoded as binary does not decode: {error}"),
    };
    assert_eq!(again.inputs.len(), request.inputs.len());
    for (before, after) in request.inputs.iter().zip(&again.inputs) {
        assert_eq!(before.tensor, after.tensor);
    }
});
