//! Live mode: the monitor's capture engine runs llama.cpp, and each layer's tensors are
//! compared with the reference as they are captured (then dropped). With `--save-gguf`
//! or `--noise-floor` the monitor's own sink spools them to a trace as well.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use ggml_trace::capture::{
    CaptureError, CaptureSink, CapturedAttention, CapturedTensor, StepOutput,
};
use ggml_trace::session::RunInfo;
use kcm_cli::progress::{Counters, Progress};
use kcm_cli::sink::MonitorSink;
use trace_format::{RunMeta, StepMeta};

use crate::compare::Analyzer;

pub struct LiveSink<'a, 'r> {
    pub analyzer: &'a mut Analyzer<'r>,
    /// The monitor's sink (statistics to nowhere), when the run is also saved.
    pub save: Option<MonitorSink>,
    /// Set when the metadata check refused the run (exit 2).
    pub fatal: Option<String>,
    /// Progress on stderr (a terminal, not `--quiet`); nothing reaches stdout before the
    /// summary, so it cannot tangle with it.
    progress: Progress,
    counters: Counters,
}

impl<'a, 'r> LiveSink<'a, 'r> {
    pub fn new(
        analyzer: &'a mut Analyzer<'r>,
        save_opts: Option<&kcm_cli::capture_args::Options>,
        quiet: bool,
    ) -> Result<Self, String> {
        let save = match save_opts {
            Some(o) => Some(
                MonitorSink::new(
                    o,
                    Box::new(std::io::sink()),
                    Arc::new(AtomicBool::new(false)),
                )
                .map_err(|e| e.to_string())?,
            ),
            None => None,
        };
        Ok(Self {
            analyzer,
            save,
            fatal: None,
            progress: Progress::hidden(),
            counters: Counters::default(),
        }
        .with_progress(quiet))
    }

    fn with_progress(mut self, quiet: bool) -> Self {
        self.progress = Progress::new("tensor-diff-analyzer", quiet);
        self
    }

    /// Erases the progress line (before the summary is printed).
    pub fn clear_progress(&mut self) {
        self.progress.clear();
    }
}

/// What the trace of this run will say about it, as far as it is known before the first
/// decode (flash attention "auto" is resolved by the first attention op).
pub fn current_run_meta(info: &RunInfo, with_sha: bool) -> RunMeta {
    kcm_cli::sink::run_meta(info, with_sha)
}

impl CaptureSink for LiveSink<'_, '_> {
    /// An RPC server died mid-run (ggml would abort): one line, exit 2 (nothing compared
    /// to conclude from; the current run's trace is not saved).
    fn on_fatal(&mut self, reason: &str) -> u8 {
        self.clear_progress();
        eprintln!("tensor-diff-analyzer: {reason}; nothing is concluded");
        crate::exit::ERROR
    }

    fn on_unexplained(&mut self, change: &ggml_trace::capture::UnexplainedChange) {
        match self.save.as_mut() {
            Some(s) => s.on_unexplained(change),
            None => {
                self.progress.clear();
                eprintln!("{}", kcm_cli::sink::unexplained_line(change));
            }
        }
    }

    fn on_start(&mut self, info: &RunInfo) -> Result<(), CaptureError> {
        let generated = if info.n_predict > 0 {
            info.n_predict as u64
        } else {
            0
        };
        self.counters.tokens_total = info.prompt_tokens.len() as u64 + generated;
        let with_sha = !self.analyzer.reference.run.model_sha256.is_empty();
        let run = current_run_meta(info, with_sha);
        // The running context's own facts, not a file's claims.
        let seen = crate::trust::Observed::claimed(&run);
        let check = self.analyzer.set_current_run(run, seen);
        if !check.fatal.is_empty() {
            let msg = check.fatal.join("; ");
            self.fatal = Some(msg.clone());
            return Err(CaptureError::sink(msg));
        }
        match self.save.as_mut() {
            Some(s) => s.on_start(info),
            None => Ok(()),
        }
    }

    fn on_step(&mut self, step: &StepMeta) -> bool {
        self.counters.steps = step.step;
        self.progress.update(self.counters);
        self.counters.tokens += step.tokens.len() as u64;
        self.analyzer.add_current_step(step.clone());
        self.save.as_mut().is_none_or(|s| s.on_step(step))
    }

    fn on_attention(&mut self, att: CapturedAttention) -> Result<(), CaptureError> {
        if let Some(r) = att.rotation {
            // What the graph showed; V from its cache write, else from whether the
            // un-rotation follows (it would arrive next, so no: not rotated).
            self.analyzer
                .set_current_rotation(att.layer, r.k, r.v.unwrap_or(false));
        }
        if !att.op.is_empty() {
            // The mixed KV cache's node has flash attention's layout.
            self.analyzer.set_current_flash(
                att.op == "FLASH_ATTN_EXT" || att.op == trace_format::MIXED_ATTN_OP,
            );
        }
        for t in &att.tensors {
            let name = trace_format::tensor_name(&t.meta, false);
            self.analyzer
                .compare_ordered(&t.meta, &name, &t.data, t.graph_order);
        }
        self.progress.update(self.counters);
        match self.save.as_mut() {
            Some(s) => s.on_attention(att),
            None => Ok(()),
        }
    }

    fn on_node(&mut self, node: CapturedTensor) -> Result<(), CaptureError> {
        let name = trace_format::tensor_name(&node.meta, false);
        self.analyzer
            .compare_ordered(&node.meta, &name, &node.data, node.graph_order);
        match self.save.as_mut() {
            Some(s) => s.on_node(node),
            None => Ok(()),
        }
    }

    fn on_output(&mut self, out: StepOutput) -> Result<(), CaptureError> {
        let reference = self.analyzer.reference;
        self.analyzer
            .outputs
            .add(reference, out.step, out.sampled, out.logits.as_deref());
        match self.save.as_mut() {
            Some(s) => s.on_output(out),
            None => Ok(()),
        }
    }
}
