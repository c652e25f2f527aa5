//! gguf-reader's integration tests in one binary, one module per file (as in the other
//! crates): the command line on ordinary GGUF files, and hostile traces (issue 14).

mod cli;
mod hostile;
mod scale;
