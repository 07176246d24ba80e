//! Compiles `proto/` with protox (no system `protoc` needed) into tonic/prost code, and writes the
//! encoded descriptor set that server reflection serves.

use std::{env, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "chargegate/v1/authorization.proto",
    "chargegate/v1/grants.proto",
    "chargegate/v1/audit.proto",
    "chargegate/v1/webhooks.proto",
];

/// Messages that carry a plain driver token: their `Debug` is written by hand and redacts it.
const REDACTED_DEBUG: &[&str] = &[
    "chargegate.v1.AuthorizeRequest",
    "chargegate.v1.PutGrantRequest",
    "chargegate.v1.DeleteGrantRequest",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let fds = protox::Compiler::new(["proto"])?
        .include_imports(true)
        .include_source_info(true)
        .open_files(PROTOS)?
        .file_descriptor_set();
    std::fs::write(
        out_dir.join("chargegate_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .skip_debug(REDACTED_DEBUG)
        .compile_fds(fds)?;
    Ok(())
}
