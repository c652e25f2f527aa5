//! Statistics, difference metrics and reference attention, accumulated in f64.

pub mod attention;
pub mod fmt;
pub mod summary;

pub use attention::{alibi_slope, attention, AttentionError, AttentionParams, Dense};
pub use fmt::sci;
pub use summary::{Summary, SummaryAccumulator};
