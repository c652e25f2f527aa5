//! What `kqv-trace-monitor`, `tensor-diff-analyzer` and `gguf-reader` share on the
//! command line:
//! - [`tool`]: help, version, one error line and a documented exit code;
//! - [`progress`]: the progress line on stderr;
//! - [`capture_args`]: the split between the capture's own options and llama.cpp's;
//! - [`sink`] and [`stats`]: the monitor's sink (statistics lines, the trace writer,
//!   `--verify`), which the analyzer reuses to save its live run;
//! - [`trace`]: the monitor's whole run, for the monitor's `main` and for tests.

pub mod capture_args;
pub mod progress;
pub mod sink;
pub mod stats;
pub mod tool;
pub mod trace;

pub use tool::{Command, Failure, Tool};
