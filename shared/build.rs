//! Compiles `proto/msae.proto` with the vendored protoc, so a fresh machine needs nothing installed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded.
    unsafe { std::env::set_var("PROTOC", protoc) };
    // Read at run time, not with env!(): a build-script binary reused by a copy of the
    // workspace sharing the target dir would otherwise compile (and watch) the copy's proto.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let proto_dir = std::path::Path::new(&manifest_dir).join("../proto");
    let proto = proto_dir.join("msae.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    tonic_prost_build::configure().compile_protos(&[proto], &[proto_dir])?;
    Ok(())
}
