//! Statistics, difference metrics, reference attention and next-token KL divergence,
//! accumulated in f64.

pub mod attention;
pub mod diff;
pub mod fmt;
pub mod kld;
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
pub use kld::{
    mean_and_uncertainty, step_kld, summarize, DeltaPSummary, Distribution, KldAccumulator,
    KldError, KldSummary, NextToken, Percentile, Side, StatRow, StepKld,
};
pub use split::split_ranges;
pub use summary::{Summary, SummaryAccumulator};
