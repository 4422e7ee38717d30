//! Fuzzes a gRPC `ModelInferRequest` the way a tenant's call reaches the server: protobuf
//! bytes decoded by prost, then [`request_from_grpc`] (raw and typed contents, parameters,
//! shared-memory references read through a fake region of 64 bytes).
//!
//! Besides "never panics", every decoded input must hold exactly the bytes its datatype and
//! shape need, and a shared-memory read must stay inside the fake region.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use weft_core::Result;
use weft_grpc::convert::request_from_grpc;
use weft_grpc::inference::ModelInferRequest;
use weft_protocol::shared_memory::{SharedMemoryInputs, SharedMemoryRef};

/// One region, "r", of 64 bytes.
struct FakeRegion;

impl SharedMemoryInputs for FakeRegion {
    fn read(&self, _input: &str, place: &SharedMemoryRef) -> Result<Bytes> {
        let end = place.offset.checked_add(place.byte_size);
        if place.region != "r" || end.is_none_or(|end| end > 64) {
            return Err(weft_core::Error::invalid("outside the region"));
        }
        Ok(Bytes::from(vec![1u8; place.byte_size as usize]))
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(message) = ModelInferRequest::decode(data) else {
        return;
    };
    let Ok(request) = request_from_grpc(message, &FakeRegion) else {
        return;
    };
    for input in &request.inputs {
        let tensor = &input.tensor.tensor;
        if let Some(size) = tensor.datatype().element_size() {
            assert_eq!(tensor.data().len(), tensor.element_count() * size);
        }
    }
});
