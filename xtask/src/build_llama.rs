//! `cargo xtask build-llama`: prepare vendor/llama.cpp (or stage another tree, or link a
//! cmake build), then build ggml-trace-sys.

use std::path::{Path, PathBuf};

use crate::cmake_plan::{self, BUILD_ENV};
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
    let llama_build: Option<PathBuf> = args
        .opt_value_from_str("--llama-build")
        .map_err(|e| format!("--llama-build: {e}"))?;
    util::no_more_args(args)?;
    if let Some(build) = llama_build {
        if with_patches || force || prepare_only {
            return Err("--llama-build takes only --llama-src and --release: the cmake build is linked as it was built".into());
        }
        let (src, plan) = cmake_env(&build, llama_src.as_deref())?;
        build_tree(Some(&src), Some(&plan.build), release)?;
        let mut exports = vec![
            format!(
                "{BUILD_ENV}={}",
                util::shell_quote(&plan.build.display().to_string())
            ),
            format!(
                "{SRC_ENV}={}",
                util::shell_quote(&src.display().to_string())
            ),
        ];
        if !plan.rpath_dirs().is_empty() {
            exports.push(format!(
                "RUSTFLAGS={}",
                util::shell_quote(&std::env::var("RUSTFLAGS").unwrap_or_default())
            ));
        }
        eprintln!(
            "xtask: linked against the cmake build at {} ({}); for cargo build/test/install, export {}",
            plan.build.display(),
            plan.kind(),
            exports.join(" ")
        );
        return Ok(());
    }
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
            build_tree(Some(&tree), None, release)?;
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
            build_tree(None, None, release)
        }
    }
}

/// For a cmake build at `build` (its source tree `src`, default the one it was configured
/// from): checks it ([`cmake_plan::plan`], the build script's own checks, so a bad build
/// fails here in one line), sets `KCM_LLAMA_BUILD` and `KCM_LLAMA_SRC` in this process for
/// the cargo commands that follow, and, when it has shared libraries, adds their rpath
/// to `RUSTFLAGS` (a -sys crate's link arguments do not reach other packages'
/// executables). Returns the source tree and the plan.
pub fn cmake_env(build: &Path, src: Option<&Path>) -> Result<(PathBuf, cmake_plan::Plan)> {
    let build = build
        .canonicalize()
        .map_err(|e| format!("--llama-build {}: {e}", build.display()))?;
    let src = match src {
        Some(s) => s.to_path_buf(),
        None => cmake_plan::source_of(&build)?,
    };
    let src = src
        .canonicalize()
        .map_err(|e| format!("--llama-src {}: {e}", src.display()))?;
    let plan = cmake_plan::plan(&build, &src)?;
    std::env::set_var(BUILD_ENV, &plan.build);
    std::env::set_var(SRC_ENV, &src);
    let rpath = plan.rpath_dirs();
    if !rpath.is_empty() {
        let flag = cmake_plan::rpath_flag(&rpath);
        let current = std::env::var("RUSTFLAGS").unwrap_or_default();
        if !current.contains(&flag) {
            let joined = if current.trim().is_empty() {
                flag
            } else {
                format!("{current} {flag}")
            };
            std::env::set_var("RUSTFLAGS", joined);
        }
        if std::env::var_os("CARGO_ENCODED_RUSTFLAGS").is_some() {
            eprintln!("xtask: CARGO_ENCODED_RUSTFLAGS is set, so cargo ignores RUSTFLAGS: add the rpath of {} yourself", plan.build.display());
        }
    }
    Ok((src, plan))
}

/// For `cargo xtask test`, `demo`, `install` and `bench`: the tree `KCM_LLAMA_SRC` names
/// when it is set (the cargo commands they run next inherit it), else the pinned tree.
pub fn build(release: bool, force: bool) -> Result {
    if let Some(build) = std::env::var_os(BUILD_ENV).filter(|b| !b.is_empty()) {
        let src = std::env::var_os(SRC_ENV)
            .filter(|t| !t.is_empty())
            .map(PathBuf::from);
        let (src, plan) = cmake_env(Path::new(&build), src.as_deref())?;
        eprintln!(
            "xtask: {BUILD_ENV} is set: linking the cmake build at {} ({})",
            plan.build.display(),
            plan.kind()
        );
        return build_tree(Some(&src), Some(&plan.build), release);
    }
    if let Some(tree) = std::env::var_os(SRC_ENV).filter(|t| !t.is_empty()) {
        eprintln!(
            "xtask: {SRC_ENV} is set: building against {}",
            Path::new(&tree).display()
        );
        return build_tree(Some(Path::new(&tree)), None, release);
    }
    llama_tree::prepare(force)?;
    build_tree(None, None, release)
}

/// `cargo build -p ggml-trace-sys` against `tree` (`KCM_LLAMA_SRC`), or against
/// vendor/llama.cpp when `None` (the variable removed from the environment); linking the
/// cmake build `cmake` (`KCM_LLAMA_BUILD`) when given (else that variable is removed).
pub fn build_tree(tree: Option<&Path>, cmake: Option<&Path>, release: bool) -> Result {
    let mut cmd = util::cargo();
    cmd.args(["build", "-p", "ggml-trace-sys"]);
    if release {
        cmd.arg("--release");
    }
    match tree {
        Some(t) => cmd.env(SRC_ENV, t),
        None => cmd.env_remove(SRC_ENV),
    };
    match cmake {
        Some(b) => cmd.env(BUILD_ENV, b),
        None => cmd.env_remove(BUILD_ENV),
    };
    if cmake.is_some() {
        eprintln!("xtask: building ggml-trace-sys (only its shim is compiled; llama.cpp's libraries come from the cmake build)");
    } else {
        eprintln!("xtask: building ggml-trace-sys (llama.cpp is compiled by its build script; a cold build takes minutes)");
    }
    util::run(&mut cmd)
}
