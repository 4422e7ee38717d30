//! Compiles Triton's protos with protox, a protobuf compiler in Rust, so no `protoc` is needed
//! on the build machine, then generates prost messages and tonic stubs from the descriptors.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/grpc_service.proto", "proto/model_config.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        // RPCs Weft does not serve answer UNIMPLEMENTED instead of needing a method each.
        .generate_default_stubs(true)
        // Clients bring their own channel (`Client::new(channel)`); no transport needed here.
        .build_transport(false)
        // Tensor bytes stay `Bytes`: sliced from the received buffer, not copied out of it.
        .bytes(".")
        .compile_fds(descriptors)?;
    Ok(())
}
