//! Attention verification for kv-cache-monitor traces: recompute each traced attention
//! from its traced inputs (in f64, with the layouts the trace recorded, never guessed from
//! names), compare with the traced output, and when they disagree, find which input
//! explains it. Used by `gguf-reader --verify-attention` (saved traces) and
//! `kqv-trace-monitor --verify` (live captures); docs/verification.md is the reference.
//!
//! The unit is a [`Group`]: the q, k, v, mask, sinks and `kqv_out` of one (step, layer)
//! with the attention op's parameters, built from a saved trace ([`Group::from_trace`]) or
//! from live captures ([`Group::from_tensors`], what `kqv-trace-monitor --verify` uses).
//! [`check()`] recomputes it and returns a [`Checked`]: the metrics, the documented bound
//! ([`nmse_bound`]) and, for a group that fails, a diagnosis.
//!
//! **Diagnosis.** A failed group is tried against the mistakes a tracer or a reader
//! makes, one input at a time; each try *repairs* one input from the data the trace
//! holds (nothing is taken from outside the trace) and recomputes:
//!
//! - q, k, v: data in memory order `[ne0, ne2, ne1]` read as if it were in `ne` order
//!   (the seed's K-cache mistake: `[head_dim, n_kv, n_head_kv]` over memory ordered
//!   `[head_dim, n_head_kv, n_kv]`);
//! - v: data stored transposed (dims 0 and 1 exchanged);
//! - q: heads permuted (each output head is matched with the q head that reproduces it);
//! - mask: rows shifted by one, either way (the tokens the shift leaves without a row are
//!   not compared);
//! - the op's scale: fitted (a candidate set and a 1-d search);
//! - any input byte-identical to the same input of the previous step: a stale buffer
//!   (evidence, not a repair: the real data is gone).
//!
//! A repair counts when the repaired group passes the bound on the compared tokens while
//! the unrepaired one fails on the same tokens. Each [`Finding`] names the input, its
//! tensor and the NMSE after the repair. When nothing explains the failure, the heads
//! and tokens whose own error exceeds the bound are reported (a kernel bug, or more than
//! one wrong input).
//!
//! Modules, by idea:
//!
//! - [`group`]: the [`Group`] and its [`Operand`]s, assembled from a trace or from live
//!   captures; input [`Fingerprint`]s; what a group lacks ([`Missing`]);
//! - [`bounds`]: the documented bound ([`nmse_bound`]) and the metrics of a comparison;
//! - `recompute`: the operands as the reference attention reads them, and the reference;
//! - [`diagnose`]: the repairs tried on a failed group ([`Finding`], [`Suspect`]);
//! - [`check`](mod@check): [`check()`] itself ([`Outcome`], [`Checked`]), with its child
//!   [`check::mixed`] for the mixed KV cache's node;
//! - [`render`]: the verdicts as text and JSON (both tools print the same).

pub mod bounds;
pub mod check;
pub mod diagnose;
pub mod group;
pub mod kernel;
mod recompute;
pub mod render;
pub mod synth;

pub use bounds::{faithful_bound, nmse_bound};
pub use check::mixed;
pub use check::{
    check, check_in_trace, check_in_trace_with, check_with, verify_group, Checked, Limits, Outcome,
    Verification, DEFAULT_MAX_WORK, DIAGNOSIS_WORK_FACTOR, MAX_DIAGNOSIS_HEADS,
};
pub use diagnose::{Finding, Suspect};
pub use group::{
    trace_fingerprints, Fingerprint, Fingerprints, Group, KernelFacts, Missing, Operand, FLASH_OP,
};

use trace_format::{escape, TraceError, Violation};

/// Why a group could not be verified at all. A group that lacks inputs is no error: it
/// is [`Outcome::Missing`].
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Reading a traced tensor from the trace failed.
    #[error(transparent)]
    Trace(#[from] TraceError),
    /// The traced inputs do not fit together (shapes, sizes, a tensor too large), or the
    /// reference cannot be computed from them.
    #[error("malformed trace: {0}")]
    Malformed(String),
    /// The trace's validation found problems in this group
    /// ([`TraceFile::group_problems`](trace_format::TraceFile::group_problems)).
    #[error("{first}{}", if *.more > 0 { format!(" (and {} more)", .more) } else { String::new() })]
    Invalid { first: Violation, more: usize },
    /// Recomputing the group would take more work than the budget allows
    /// ([`Limits::max_work`]).
    #[error("step {step} layer {layer}: recomputing it takes {work} multiply-adds (heads x tokens x cells x (D_k + D_v)), over the work budget of {limit}")]
    Budget {
        step: u32,
        layer: i32,
        work: u128,
        limit: u64,
    },
}

impl VerifyError {
    /// The error as one line, strings from the file escaped.
    pub fn line(&self) -> String {
        escape(&self.to_string()).into_owned()
    }
}
