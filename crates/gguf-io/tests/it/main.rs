//! gguf-io's integration tests in one binary: round trips, and gguf-py (PyPI `gguf`) as
//! the independent oracle for reading, writing and dequantization.
//! One binary per crate, as ripgrep does (`tests/integration/`): each file below is a
//! module; shared helpers live in the `test-support` crate.

mod dequant_gguf_py;
mod interop_gguf_py;
mod roundtrip;
