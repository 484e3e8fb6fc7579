//! Compiles `proto/` with protox (a pure-Rust protobuf compiler), so no system
//! `protoc` is needed, and hands the descriptors to prost-build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let files = ["proto/datasync/v1/sync.proto"];
    let descriptors = protox::compile(files, ["proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
