//! Compiles proto/carrel/v1/carrel.proto with protox (a protobuf compiler in Rust, so no
//! protoc is needed on the build host) and generates the tonic services and clients; the
//! encoded descriptor set is kept for gRPC server reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["carrel/v1/carrel.proto"], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("carrel_descriptor.bin"), prost::Message::encode_to_vec(&descriptors))?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
