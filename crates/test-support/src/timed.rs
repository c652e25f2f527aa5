//! Timing of the generation steps of a run, shared by the decode-speed benchmarks
//! (`ggml-trace/benches/mixed_kv.rs`, `kqv-trace-monitor/benches/overhead.rs`).

use std::time::{Duration, Instant};

use ggml_trace::capture::{CaptureError, CaptureSink, CapturedAttention};
use ggml_trace::session::RunInfo;
use trace_format::StepMeta;

/// Wraps a sink (or none) and times the generation steps: from the start of the first
/// step after the prompt to the end of the run.
pub struct Timed<S> {
    pub inner: Option<S>,
    n_prompt_steps: u32,
    gen_start: Option<Instant>,
    gen_steps: u32,
    /// Time spent inside the inner sink during the generation steps.
    sink_time: Duration,
}

impl<S> Timed<S> {
    pub fn new(inner: Option<S>) -> Self {
        Timed {
            inner,
            n_prompt_steps: 0,
            gen_start: None,
            gen_steps: 0,
            sink_time: Duration::ZERO,
        }
    }

    /// Generated tokens per second, the run having ended at `end` (the last step's
    /// decode ends when `session::run` returns).
    pub fn tokens_per_s(&self, end: Instant) -> f64 {
        let secs = self.gen_start.map_or(f64::NAN, |s| (end - s).as_secs_f64());
        f64::from(self.gen_steps) / secs
    }

    /// Milliseconds per generated token spent inside the inner sink (statistics,
    /// formatting, spooling), out of the callback's whole time.
    #[allow(dead_code)] // used by the overhead bench, not by mixed_kv (no inner sink)
    pub fn sink_ms_per_token(&self) -> f64 {
        self.sink_time.as_secs_f64() * 1e3 / f64::from(self.gen_steps.max(1))
    }
}

impl<S: CaptureSink> CaptureSink for Timed<S> {
    fn on_start(&mut self, info: &RunInfo) -> Result<(), CaptureError> {
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
    fn on_attention(&mut self, att: CapturedAttention) -> Result<(), CaptureError> {
        let Some(s) = self.inner.as_mut() else {
            return Ok(());
        };
        if self.gen_start.is_none() {
            return s.on_attention(att);
        }
        let t0 = Instant::now();
        let r = s.on_attention(att);
        self.sink_time += t0.elapsed();
        r
    }
    fn on_node(&mut self, node: ggml_trace::capture::CapturedTensor) -> Result<(), CaptureError> {
        let Some(s) = self.inner.as_mut() else {
            return Ok(());
        };
        let t0 = Instant::now();
        let r = s.on_node(node);
        if self.gen_start.is_some() {
            self.sink_time += t0.elapsed();
        }
        r
    }
    fn on_output(&mut self, out: ggml_trace::capture::StepOutput) -> Result<(), CaptureError> {
        match self.inner.as_mut() {
            Some(s) => s.on_output(out),
            None => Ok(()),
        }
    }
    fn on_unexplained(&mut self, change: &ggml_trace::capture::UnexplainedChange) {
        if let Some(s) = self.inner.as_mut() {
            s.on_unexplained(change);
        }
    }
}

/// The median of a set of runs.
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
