//! Timing of the generation steps of a run, shared by the decode-speed benchmarks
//! (`ggml-trace/benches/mixed_kv.rs`, and `kqv-trace-monitor/benches/overhead.rs` through
//! `#[path]`).

use std::time::Instant;

use ggml_trace::capture::{CaptureSink, CapturedAttention};
use ggml_trace::session::RunInfo;
use trace_format::StepMeta;

/// Wraps a sink (or none) and times the generation steps: from the start of the first
/// step after the prompt to the end of the run.
pub struct Timed<S> {
    pub inner: Option<S>,
    n_prompt_steps: u32,
    gen_start: Option<Instant>,
    gen_steps: u32,
}

impl<S> Timed<S> {
    pub fn new(inner: Option<S>) -> Self {
        Timed {
            inner,
            n_prompt_steps: 0,
            gen_start: None,
            gen_steps: 0,
        }
    }

    /// Generated tokens per second, the run having ended at `end` (the last step's
    /// decode ends when `session::run` returns).
    pub fn tokens_per_s(&self, end: Instant) -> f64 {
        let secs = self.gen_start.map_or(f64::NAN, |s| (end - s).as_secs_f64());
        f64::from(self.gen_steps) / secs
    }
}

impl<S: CaptureSink> CaptureSink for Timed<S> {
    fn on_start(&mut self, info: &RunInfo) -> Result<(), String> {
        self.n_prompt_steps = (info.prompt_tokens.len() as u32).div_ceil(info.n_ubatch.max(1));
        match self.inner.as_mut() {
            Some(s) => s.on_start(info),
            None => Ok(()),
        }
    }
    fn on_step(&mut self, step: &StepMeta) -> bool {
        if step.step == self.n_prompt_steps {
            self.gen_start = Some(Instant::now());
        }
        if step.step >= self.n_prompt_steps {
            self.gen_steps += 1;
        }
        self.inner.as_mut().is_none_or(|s| s.on_step(step))
    }
    fn on_attention(&mut self, att: CapturedAttention) -> Result<(), String> {
        match self.inner.as_mut() {
            Some(s) => s.on_attention(att),
            None => Ok(()),
        }
    }
}

/// The median of a set of runs.
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
