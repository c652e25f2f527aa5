//! The ggml tensor type table: every type id ggml has ever assigned, its name as ggml
//! spells it (`ggml_type_name`), block size in elements and bytes per block.
//!
//! Ids that ggml retired (Q4_2, Q4_3, the Q4_0_x_y / IQ4_NL_x_y repack types) are kept
//! so that an old file gets a precise error instead of "unknown type". The table matches
//! `ggml.h` of the pinned llama.cpp (GGML_TYPE_COUNT = 43); a test against ggml's own
//! type traits (crate `ggml-trace`) keeps it honest.

use std::fmt;

/// A ggml tensor element type, by its stable on-disk id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GgmlType(pub u32);

/// Static facts about one ggml type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TypeInfo {
    pub id: u32,
    /// Name as `ggml_type_name` prints it (`f32`, `q4_0`, `iq2_xxs`, ...).
    pub name: &'static str,
    /// Elements per block (1 for scalar types).
    pub block_size: u32,
    /// Bytes per block; 0 for ids ggml has retired.
    pub type_size: u32,
    /// ggml removed this id; files using it cannot be read by current ggml.
    pub retired: bool,
}

const fn t(id: u32, name: &'static str, block_size: u32, type_size: u32) -> TypeInfo {
    TypeInfo {
        id,
        name,
        block_size,
        type_size,
        retired: false,
    }
}
const fn gone(id: u32, name: &'static str) -> TypeInfo {
    TypeInfo {
        id,
        name,
        block_size: 0,
        type_size: 0,
        retired: true,
    }
}

/// Indexed by type id.
pub const TYPE_TABLE: &[TypeInfo] = &[
    t(0, "f32", 1, 4),
    t(1, "f16", 1, 2),
    t(2, "q4_0", 32, 18),
    t(3, "q4_1", 32, 20),
    gone(4, "q4_2"),
    gone(5, "q4_3"),
    t(6, "q5_0", 32, 22),
    t(7, "q5_1", 32, 24),
    t(8, "q8_0", 32, 34),
    t(9, "q8_1", 32, 36),
    t(10, "q2_K", 256, 84),
    t(11, "q3_K", 256, 110),
    t(12, "q4_K", 256, 144),
    t(13, "q5_K", 256, 176),
    t(14, "q6_K", 256, 210),
    t(15, "q8_K", 256, 292),
    t(16, "iq2_xxs", 256, 66),
    t(17, "iq2_xs", 256, 74),
    t(18, "iq3_xxs", 256, 98),
    t(19, "iq1_s", 256, 50),
    t(20, "iq4_nl", 32, 18),
    t(21, "iq3_s", 256, 110),
    t(22, "iq2_s", 256, 82),
    t(23, "iq4_xs", 256, 136),
    t(24, "i8", 1, 1),
    t(25, "i16", 1, 2),
    t(26, "i32", 1, 4),
    t(27, "i64", 1, 8),
    t(28, "f64", 1, 8),
    t(29, "iq1_m", 256, 56),
    t(30, "bf16", 1, 2),
    gone(31, "q4_0_4_4"),
    gone(32, "q4_0_4_8"),
    gone(33, "q4_0_8_8"),
    t(34, "tq1_0", 256, 54),
    t(35, "tq2_0", 256, 66),
    gone(36, "iq4_nl_4_4"),
    gone(37, "iq4_nl_4_8"),
    gone(38, "iq4_nl_8_8"),
    t(39, "mxfp4", 32, 17),
    t(40, "nvfp4", 64, 36),
    t(41, "q1_0", 128, 18),
    t(42, "q2_0", 64, 18),
];

impl GgmlType {
    pub const F32: Self = Self(0);
    pub const F16: Self = Self(1);
    pub const Q4_0: Self = Self(2);
    pub const Q4_1: Self = Self(3);
    pub const Q5_0: Self = Self(6);
    pub const Q5_1: Self = Self(7);
    pub const Q8_0: Self = Self(8);
    pub const Q8_1: Self = Self(9);
    pub const Q2_K: Self = Self(10);
    pub const Q3_K: Self = Self(11);
    pub const Q4_K: Self = Self(12);
    pub const Q5_K: Self = Self(13);
    pub const Q6_K: Self = Self(14);
    pub const Q8_K: Self = Self(15);
    pub const IQ2_XXS: Self = Self(16);
    pub const IQ2_XS: Self = Self(17);
    pub const IQ3_XXS: Self = Self(18);
    pub const IQ1_S: Self = Self(19);
    pub const IQ4_NL: Self = Self(20);
    pub const IQ3_S: Self = Self(21);
    pub const IQ2_S: Self = Self(22);
    pub const IQ4_XS: Self = Self(23);
    pub const I8: Self = Self(24);
    pub const I16: Self = Self(25);
    pub const I32: Self = Self(26);
    pub const I64: Self = Self(27);
    pub const F64: Self = Self(28);
    pub const IQ1_M: Self = Self(29);
    pub const BF16: Self = Self(30);
    pub const TQ1_0: Self = Self(34);
    pub const TQ2_0: Self = Self(35);
    pub const MXFP4: Self = Self(39);
    pub const NVFP4: Self = Self(40);
    pub const Q1_0: Self = Self(41);
    pub const Q2_0: Self = Self(42);

    /// Facts about this type, or `None` for an id ggml never assigned.
    pub fn info(self) -> Option<&'static TypeInfo> {
        TYPE_TABLE.get(self.0 as usize)
    }

    /// A type current ggml can store (known and not retired).
    pub fn is_supported(self) -> bool {
        self.info().is_some_and(|i| !i.retired)
    }

    /// Look a type up by its ggml name (case-insensitive: `Q4_K` and `q4_K` both work).
    pub fn from_name(name: &str) -> Option<Self> {
        TYPE_TABLE
            .iter()
            .find(|i| !i.retired && i.name.eq_ignore_ascii_case(name))
            .map(|i| Self(i.id))
    }

    pub fn name(self) -> &'static str {
        self.info().map_or("unknown", |i| i.name)
    }

    /// True for block-quantized types (block size > 1).
    pub fn is_quantized(self) -> bool {
        self.info().is_some_and(|i| i.block_size > 1)
    }

    /// Bytes needed for `n_elements` elements, `None` if `n_elements` is not a whole
    /// number of blocks, the type is unknown/retired, or the product overflows.
    pub fn bytes_for(self, n_elements: u64) -> Option<u64> {
        let info = self.info().filter(|i| !i.retired)?;
        let bs = u64::from(info.block_size);
        if n_elements % bs != 0 {
            return None;
        }
        (n_elements / bs).checked_mul(u64::from(info.type_size))
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.info() {
            Some(i) => f.write_str(i.name),
            None => write!(f, "unknown({})", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_indexed_by_id() {
        for (i, info) in TYPE_TABLE.iter().enumerate() {
            assert_eq!(info.id as usize, i, "{}", info.name);
        }
    }

    #[test]
    fn byte_counts() {
        assert_eq!(GgmlType::Q4_0.bytes_for(64), Some(36));
        assert_eq!(GgmlType::Q4_0.bytes_for(33), None);
        assert_eq!(GgmlType::F32.bytes_for(u64::MAX), None);
        assert_eq!(GgmlType(4).bytes_for(32), None);
        assert_eq!(GgmlType(999).bytes_for(1), None);
        assert_eq!(GgmlType::from_name("Q4_K"), Some(GgmlType::Q4_K));
        assert_eq!(GgmlType::from_name("q4_2"), None);
    }
}
