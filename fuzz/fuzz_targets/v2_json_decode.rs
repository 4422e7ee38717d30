//! Fuzzes decoding a JSON-only V2 inference request body (no `Inference-Header-Content-Length`).
//!
//! Besides "never panics", every body that decodes must survive a round trip: encoded back as a
//! JSON request and decoded again, it yields the same tensors and parameters.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use weft_protocol::{decode_infer_request, encode_infer_request};

fuzz_target!(|data: &[u8]| {
    let Ok(request) = decode_infer_request(Bytes::copy_from_slice(data), None) else {
        return;
    };
    let Ok((body, header_length)) = encode_infer_request(&request.inputs, false) else {
        return;
    };
    assert_eq!(header_length, None);
    let again = match decode_infer_request(Bytes::from(body), None) {
        Ok(again) => again,
        Err(error) => panic!("a decoded request re-encoded as JSON does not decode: {error}"),
    };
    assert_eq!(again.inputs.len(), request.inputs.len());
    for (before, after) in request.inputs.iter().zip(&again.inputs) {
        assert_eq!(before.tensor, after.tensor);
        assert_eq!(before.parameters, after.parameters);
    }
});
