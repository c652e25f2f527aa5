//! Statistics, difference metrics and reference attention, accumulated in f64.

pub mod summary;

pub use summary::{Summary, SummaryAccumulator};
