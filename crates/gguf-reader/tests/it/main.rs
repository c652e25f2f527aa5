//! gguf-reader's integration tests in one binary: the command line (cli.rs) and
//! `--verify-attention` / `--shapes` on synthetic traces, honest and lying (verify.rs).

mod cli;
mod verify;
