//! What the project's tests and benchmarks share (a dev-dependency only, never
//! published):
//! - [`Rng`]: one seeded generator (xorshift64*), so random test data is reproducible;
//! - [`LlamaArgs`]: the llama.cpp argument vectors the tests spell out for the tools;
//! - [`gguf_py`]: PyPI `gguf` (gguf-py) in a virtualenv, the independent GGUF oracle;
//! - [`hostile`]: hostile traces derived from an honest one (issue 14), and a synthetic
//!   trace of any number of groups for the scale test;
//! - [`pty`]: run a tool with stderr on a pseudo-terminal (progress-line tests);
//! - [`rpc_server`]: `kcm-rpc-server` processes on free loopback ports, killed on drop;
//! - [`storage`]: trace tests for both storages (`--kv-storage full` and `delta`);
//! - `timed` (feature `capture`): time the generation steps of a run (benchmarks).

pub mod args;
pub mod gguf_py;
pub mod hostile;
pub mod pty;
pub mod rng;
pub mod rpc_server;
pub mod storage;
#[cfg(feature = "capture")]
pub mod timed;

pub use args::LlamaArgs;
pub use rng::Rng;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// A workspace binary (`target/<profile>/<bin>`, beside the running test's `deps/`
/// directory), built once per test process with `cargo build -p <package>` (a no-op when
/// it is up to date): a test of another crate must never run a stale binary. From a
/// benchmark (`target/release/deps/`: cargo's bench profile writes there) it is built
/// with `--release`, into the directory it is looked for in.
pub fn workspace_bin(package: &str, bin: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    let exe = std::env::current_exe().expect("current test executable");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executables live in target/<profile>/deps")
        .to_path_buf();
    let path = dir.join(format!("{bin}{}", std::env::consts::EXE_SUFFIX));
    let mut built = BUILT
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if !built.iter().any(|p| p == package) {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let release = dir.file_name().is_some_and(|d| d == "release");
        let mut args = vec!["build", "-p", package];
        if release {
            args.push("--release");
        }
        let st = Command::new(cargo)
            .args(&args)
            .current_dir(gguf_py::workspace_root())
            .status()
            .expect("run cargo");
        assert!(st.success(), "cargo build -p {package}: {st:?}");
        built.push(package.to_owned());
    }
    assert!(path.exists(), "{} is missing", path.display());
    path
}
