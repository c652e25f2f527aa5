//! Statistics, difference metrics and reference attention, accumulated in f64.

pub mod attention;
pub mod diff;
pub mod fmt;
pub mod split;
pub mod summary;

pub use attention::{
    alibi_slope, attention, attention_biased, bias_at, AttentionError, AttentionParams, Dense,
};
pub use diff::{
    diff, diff_parallel, unravel, DiffAccumulator, DiffError, DiffMetrics, Tolerance,
    ToleranceMode, Worst, REL_FLOOR,
};
pub use fmt::{sci, Sci};
pub use split::split_ranges;
pub use summary::{Summary, SummaryAccumulator};
