//! gguf-reader's integration tests in one binary, one module per file (as in the other
//! crates): the command line on ordinary GGUF files (cli.rs), `--verify-attention` /
//! `--shapes` on synthetic traces, honest and lying (verify.rs), every reader command on
//! hostile traces derived from an honest one (hostile.rs), a 20k-group trace (scale.rs),
//! version-2 storage against version 1 of the same run (storage.rs), and the pure-Python
//! module python/kqv_trace.py against the Rust reader on the same files (python_module.rs).

mod cli;
mod export;
mod hostile;
mod python_module;
mod scale;
mod storage;
mod verify;
