//! `cargo xtask build-llama`: prepare vendor/llama.cpp (or stage another tree), then build
//! ggml-trace-sys.

use std::path::{Path, PathBuf};

use crate::llama_tree;
use crate::util::{self, Result};

/// The environment variable crates/ggml-trace-sys/build.rs reads (keep in sync).
pub const SRC_ENV: &str = "KCM_LLAMA_SRC";

pub fn run(mut args: pico_args::Arguments) -> Result {
    let release = args.contains("--release");
    let force = args.contains("--force");
    let prepare_only = args.contains("--prepare-only");
    let with_patches = args.contains("--with-patches");
    let llama_src: Option<PathBuf> = args
        .opt_value_from_str("--llama-src")
        .map_err(|e| format!("--llama-src: {e}"))?;
    util::no_more_args(args)?;
    match llama_src {
        Some(src) => {
            if force {
                return Err("--force is for the pinned tree; --llama-src always re-stages".into());
            }
            let tree = llama_tree::stage_external(&src, with_patches)?;
            if prepare_only {
                println!("{}", tree.display());
                return Ok(());
            }
            build_tree(Some(&tree), release)?;
            eprintln!(
                "xtask: built against {}; for cargo build/test/install, export {SRC_ENV}={}",
                src.display(),
                util::shell_quote(&tree.display().to_string())
            );
            Ok(())
        }
        None if with_patches => {
            Err("--with-patches needs --llama-src PATH (the pinned tree always has them)".into())
        }
        None if prepare_only => llama_tree::prepare(force),
        None => {
            llama_tree::prepare(force)?;
            build_tree(None, release)
        }
    }
}

/// For `cargo xtask test`, `demo`, `install` and `bench`: the tree `KCM_LLAMA_SRC` names
/// when it is set (the cargo commands they run next inherit it), else the pinned tree.
pub fn build(release: bool, force: bool) -> Result {
    if let Some(tree) = std::env::var_os(SRC_ENV).filter(|t| !t.is_empty()) {
        eprintln!(
            "xtask: {SRC_ENV} is set: building against {}",
            Path::new(&tree).display()
        );
        return build_tree(Some(Path::new(&tree)), release);
    }
    llama_tree::prepare(force)?;
    build_tree(None, release)
}

/// `cargo build -p ggml-trace-sys` against `tree` (`KCM_LLAMA_SRC`), or against
/// vendor/llama.cpp when `None` (the variable removed from the environment).
pub fn build_tree(tree: Option<&Path>, release: bool) -> Result {
    let mut cmd = util::cargo();
    cmd.args(["build", "-p", "ggml-trace-sys"]);
    if release {
        cmd.arg("--release");
    }
    match tree {
        Some(t) => cmd.env(SRC_ENV, t),
        None => cmd.env_remove(SRC_ENV),
    };
    eprintln!("xtask: building ggml-trace-sys (llama.cpp is compiled by its build script; a cold build takes minutes)");
    util::run(&mut cmd)
}
