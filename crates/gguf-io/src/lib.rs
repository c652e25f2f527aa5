//! GGUF reading and writing, the ggml type table and dequantization, in pure Rust.
#![forbid(unsafe_op_in_unsafe_fn)]

pub mod quant;
pub mod types;

pub use types::{GgmlType, TypeInfo, TYPE_TABLE};
