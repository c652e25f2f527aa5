//! What the project's tests and benchmarks share (a dev-dependency only, never
//! published):
//! - [`Rng`]: one seeded generator (xorshift64*), so random test data is reproducible;
//! - [`LlamaArgs`]: the llama.cpp argument vectors the tests spell out for the tools;
//! - [`gguf_py`]: PyPI `gguf` (gguf-py) in a virtualenv, the independent GGUF oracle;
//! - [`hostile`]: hostile traces derived from an honest one (issue 14), and a synthetic
//!   trace of any number of groups for the scale test;
//! - [`pty`]: run a tool with stderr on a pseudo-terminal (progress-line tests);
//! - `timed` (feature `capture`): time the generation steps of a run (benchmarks).

pub mod args;
pub mod gguf_py;
pub mod hostile;
pub mod pty;
pub mod rng;
#[cfg(feature = "capture")]
pub mod timed;

pub use args::LlamaArgs;
pub use rng::Rng;
