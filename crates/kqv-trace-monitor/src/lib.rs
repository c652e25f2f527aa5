//! `kqv-trace-monitor`: run llama.cpp with the capture engine of `ggml-trace`, print one
//! statistics line per traced tensor, and save the trace with `--save-gguf`. The work is
//! `kcm_cli::trace::run`; this crate is its command line.

mod usage;

use std::ffi::OsString;
use std::process::ExitCode;

use kcm_cli::capture_args::{self, UsageError};
use kcm_cli::tool::{utf8_args, Tool};
pub use kcm_cli::trace::exit;

/// The tool's name, help text and version.
pub const TOOL: Tool = Tool {
    name: "kqv-trace-monitor",
    usage: usage::USAGE,
    version: env!("CARGO_PKG_VERSION"),
};

/// The whole program: parse, run, one error line and a documented exit code.
pub fn main(args: Vec<OsString>) -> ExitCode {
    TOOL.main(
        args,
        |a| match utf8_args(a) {
            Ok(a) => capture_args::parse(a),
            Err(e) => Err(UsageError::NotUtf8(e)),
        },
        |opts| TOOL.exit(kcm_cli::trace::run(&opts).map(|()| exit::OK)),
    )
}
