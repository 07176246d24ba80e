//! Compiles `proto/` with protox (no system `protoc` needed) into tonic/prost code, and writes the
//! encoded descriptor set that server reflection serves; and names the git commit it builds
//! (`CHARGEGATE_GIT_COMMIT`, for `chargegate --version`).

use std::{env, path::PathBuf, process::Command};

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
    "chargegate.v1.ExplainDecisionRequest",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rustc-env=CHARGEGATE_GIT_COMMIT={}", git_commit());
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

/// The commit being built (12 hex digits), or `unknown` outside a git checkout (a source
/// tarball). Builds again when HEAD moves: a new commit, a checkout of another branch.
fn git_commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        let dir = PathBuf::from(dir);
        for watched in [PathBuf::from("HEAD"), PathBuf::from("packed-refs")]
            .into_iter()
            .chain(git(&["symbolic-ref", "-q", "HEAD"]).map(PathBuf::from))
        {
            let path = dir.join(watched);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_owned())
}
