//! tiny-llama's integration tests in one binary: the file itself, gguf-py reading it, and
//! llama.cpp loading and running it.
//! One binary per crate, as ripgrep does (`tests/integration/`): each file below is a
//! module; shared helpers live in the `test-support` crate.

mod gguf_py;
mod llama_cpp;
mod model_file;
