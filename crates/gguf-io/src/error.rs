//! The one error type of `gguf-io`. Every parse error says what was wrong and at which
//! byte offset of the input, so a user can look at the file with a hex editor.

use crate::quant::QuantError;
use crate::types::GgmlType;

/// Everything that can go wrong reading or writing GGUF.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),

    #[error("not a GGUF file: magic bytes {found:02x?} at offset 0 (expected \"GGUF\")")]
    BadMagic { found: [u8; 4] },

    #[error("unsupported GGUF version {version} at offset 4: only versions 2 and 3 are read")]
    UnsupportedVersion { version: u32 },

    #[error("input ends at byte {end}: {what} needs {needed} bytes at offset {offset}")]
    Truncated {
        what: &'static str,
        offset: u64,
        needed: u64,
        end: u64,
    },

    #[error(
        "{what} count {count} at offset {offset} is impossible: at most {max} fit in what follows"
    )]
    CountTooLarge {
        what: &'static str,
        offset: u64,
        count: u64,
        max: u64,
    },

    #[error("string of {len} bytes at offset {offset} exceeds the limit of {limit} bytes")]
    StringTooLong { offset: u64, len: u64, limit: u64 },

    #[error("invalid UTF-8 in {what} at offset {offset}")]
    InvalidUtf8 { what: &'static str, offset: u64 },

    #[error("unknown metadata value type {ty} at offset {offset}")]
    BadValueType { ty: u32, offset: u64 },

    #[error("bool value {value} at offset {offset} is neither 0 nor 1")]
    BadBool { value: u8, offset: u64 },

    #[error("arrays nested deeper than {limit} levels at offset {offset}")]
    NestingTooDeep { offset: u64, limit: u32 },

    #[error("duplicate metadata key '{key}' at offset {offset}")]
    DuplicateKey { key: String, offset: u64 },

    #[error("metadata key '{key}': {problem}")]
    BadKey { key: String, problem: String },

    #[error("tensor '{name}' at offset {offset}: {n_dims} dimensions (1 to 4 allowed)")]
    BadDimCount {
        name: String,
        offset: u64,
        n_dims: u32,
    },

    #[error("tensor '{name}' at offset {offset}: dimension {dim} has size {size}")]
    BadDim {
        name: String,
        offset: u64,
        dim: usize,
        size: u64,
    },

    #[error("tensor '{name}' at offset {offset}: unknown or retired ggml type id {ty}")]
    UnknownType { name: String, offset: u64, ty: u32 },

    #[error("tensor '{name}': shape {dims:?} of type {ty} overflows a 64-bit byte count")]
    SizeOverflow {
        name: String,
        dims: Vec<u64>,
        ty: GgmlType,
    },

    #[error(
        "tensor '{name}': first dimension {ne0} is not a multiple of the {ty} block size {block}"
    )]
    NotWholeBlocks {
        name: String,
        ne0: u64,
        ty: GgmlType,
        block: u64,
    },

    #[error("duplicate tensor name '{name}' at offset {offset}")]
    DuplicateTensor { name: String, offset: u64 },

    #[error(
        "tensor '{name}': data offset {data_offset} is not a multiple of the alignment {alignment}"
    )]
    Misaligned {
        name: String,
        data_offset: u64,
        alignment: u64,
    },

    #[error("tensor '{name}': data bytes [{start}, {end}) of the data section lie past its end ({len} bytes)")]
    DataOutOfBounds {
        name: String,
        start: u64,
        end: u64,
        len: u64,
    },

    #[error("tensors '{first}' and '{second}' overlap in the data section")]
    Overlap { first: String, second: String },

    #[error("general.alignment must be a u32 power of two, got {value}")]
    BadAlignment { value: String },

    #[error("tensor name '{name}' is {len} bytes; ggml allows at most 63")]
    NameTooLong { name: String, len: usize },

    #[error("tensor '{name}': got {got} bytes of data, its shape and type need {expected}")]
    DataSizeMismatch {
        name: String,
        expected: u64,
        got: u64,
    },

    #[error("writer: {0}")]
    WriterState(&'static str),

    #[error("tensor '{name}': {source}")]
    Dequantize {
        name: String,
        #[source]
        source: QuantError,
    },
}

pub type Result<T, E = GgufError> = std::result::Result<T, E>;
