//! GGUF reading and writing, the ggml type table and dequantization, in pure Rust.
//!
//! - [`GgufFile`] memory-maps a file and gives zero-copy access to tensor bytes;
//!   [`StreamReader`] reads a non-seeking stream (stdin) header first, then tensors.
//! - [`GgufWriter`] streams a file out (header, then tensor data in order); [`write_file`]
//!   and [`AtomicFile`] make writing to a path all-or-nothing.
//! - [`types`] is ggml's type table; [`quant`] dequantizes (and quantizes a few types).
//!
//! Versions 2 and 3, both byte orders, all 13 metadata value types are read. Parsing never
//! panics and never allocates from an unchecked count: see [`GgufError`].

pub mod error;
pub mod quant;
pub mod read;
pub mod types;
pub mod value;
pub mod write;

pub use error::{GgufError, Result};
pub use read::{
    parse_header, swapped_in_big_endian, tensor_to_f32, to_little_endian, ByteOrder, GgufFile,
    Header, StreamReader, TensorInfo, DEFAULT_ALIGNMENT,
};
pub use types::{GgmlType, TypeInfo, TYPE_TABLE};
pub use value::{Array, Metadata, Value, ValueType};
pub use write::{write_file, AtomicFile, GgufWriter, HeaderSpec, TensorSpec, MAX_TENSOR_NAME};
