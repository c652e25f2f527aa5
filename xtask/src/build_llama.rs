//! `cargo xtask build-llama`: prepare vendor/llama.cpp, then build ggml-trace-sys.

use crate::llama_tree;
use crate::util::{self, Result};

pub fn run(mut args: pico_args::Arguments) -> Result {
    let release = args.contains("--release");
    let force = args.contains("--force");
    let prepare_only = args.contains("--prepare-only");
    util::no_more_args(args)?;
    if prepare_only {
        return llama_tree::prepare(force);
    }
    build(release, force)
}

/// Shared with `cargo xtask test`.
pub fn build(release: bool, force: bool) -> Result {
    llama_tree::prepare(force)?;
    let mut cmd = util::cargo();
    cmd.args(["build", "-p", "ggml-trace-sys"]);
    if release {
        cmd.arg("--release");
    }
    eprintln!("xtask: building ggml-trace-sys (llama.cpp is compiled by its build script; a cold build takes minutes)");
    util::run(&mut cmd)
}
