//! The monitor's run: the capture engine of `ggml-trace` with the monitor's sink
//! (statistics lines, `--save-gguf`, `--verify`), stopped cleanly by Ctrl-C.

use std::io::{self, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::capture_args::{Options, SaveTarget};
use crate::progress::Progress;
use crate::sink::MonitorSink;
use ggml_trace::capture::{CaptureConfig, CaptureError, CaptureSink, CapturedAttention};
use ggml_trace::session::{self, RunInfo, RunOptions, RunOutcome};

/// Documented exit codes of `kqv-trace-monitor`.
pub mod exit {
    pub const OK: u8 = 0;
    pub const FAILED: u8 = 1;
    pub const USAGE: u8 = 2;
}

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("{0}")]
    Session(#[from] session::SessionError),
    #[error("saving the trace: {0}")]
    Save(#[from] trace_format::TraceError),
    #[error("{0}")]
    Io(#[from] io::Error),
    /// `--replay FILE` names no trace, or one whose steps cannot be decoded again.
    #[error("--replay {path}: {why}")]
    Replay { path: String, why: String },
    #[error("--verify: {failed} of {total} (step, layer) groups failed verification, {missing} could not be checked")]
    Verify {
        failed: usize,
        missing: usize,
        total: usize,
    },
}

pub fn run(opts: &Options) -> Result<(), MonitorError> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        // A second handler cannot be installed (tests run several monitors in one
        // process): then Ctrl-C just ends the process as usual.
        let _ = ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst));
    }
    // Statistics go to stdout unless the trace itself does.
    let stats_out: Box<dyn Write> = if opts.save == Some(SaveTarget::Stdout) {
        Box::new(io::stderr())
    } else {
        Box::new(io::BufWriter::new(io::stdout()))
    };
    // Progress only where it cannot tangle with the statistics: stderr is a terminal
    // and the statistics go to a redirected stdout.
    let stats_on_terminal =
        opts.save == Some(SaveTarget::Stdout) || std::io::stdout().is_terminal();
    let progress = Progress::new("kqv-trace-monitor", opts.quiet || stats_on_terminal);
    let mut sink = MonitorSink::new(opts, stats_out, Arc::clone(&stop))?.with_progress(progress);
    let run_opts = RunOptions {
        capture: CaptureConfig {
            layer: opts.layer,
            from_step: opts.from_step,
            trace_sources: opts.trace_sources,
            keep: true,
            logits: opts.logits,
            kv_audit: opts.kv_audit,
        },
        prefill_only: opts.prefill_only,
        verbose: opts.verbose,
        eval_callback: true,
    };
    let mut started = Started {
        sink: &mut sink,
        info: None,
        steps: 0,
    };
    let replay = match &opts.replay {
        Some(p) => Some(load_replay(p)?),
        None => None,
    };
    let result = session::run_replay(&opts.llama_args, run_opts, replay.as_ref(), &mut started);
    let (started_info, started_steps) = (started.info.take(), started.steps);
    let (info, outcome) = match result {
        Ok(r) => r,
        Err(session::SessionError::Capture(e)) => {
            // As on Ctrl-C, save what was traced, marked incomplete; then fail (exit 1).
            if let Some(info) = started_info {
                let outcome = RunOutcome {
                    steps: started_steps,
                    interrupted: true,
                    generated_text: String::new(),
                    ..RunOutcome::default()
                };
                if let Err(save) = sink.finish(&info, &outcome) {
                    eprintln!("kqv-trace-monitor: {save}");
                }
            }
            return Err(session::SessionError::Capture(e).into());
        }
        Err(e) => return Err(e.into()),
    };
    if outcome.interrupted {
        eprintln!(
            "kqv-trace-monitor: interrupted after {} steps; saving what was traced",
            outcome.steps
        );
    }
    if opts.verbose && !outcome.generated_text.is_empty() {
        eprintln!("generated: {:?}", outcome.generated_text);
    }
    sink.finish(&info, &outcome)
}

/// The steps of the trace at `path`, to decode again (`--replay`).
pub fn load_replay(path: &std::path::Path) -> Result<session::Replay, MonitorError> {
    let shown = path.display().to_string();
    let err = |why: String| MonitorError::Replay {
        path: shown.clone(),
        why,
    };
    let trace = trace_format::TraceFile::open(path).map_err(|e| err(e.to_string()))?;
    session::Replay::from_steps(&trace.steps, &trace.run.prompt_tokens, shown.clone())
        .map_err(|e| err(format!("cannot be replayed: {e}")))
}

/// The monitor's sink, remembering the run's facts and its step count, so that a run
/// that ends with a capture error can still save what was traced.
struct Started<'a> {
    sink: &'a mut MonitorSink,
    info: Option<RunInfo>,
    steps: u32,
}

impl CaptureSink for Started<'_> {
    fn on_start(&mut self, info: &RunInfo) -> Result<(), CaptureError> {
        self.info = Some(info.clone());
        self.sink.on_start(info)
    }

    fn on_step(&mut self, step: &trace_format::StepMeta) -> bool {
        let go_on = self.sink.on_step(step);
        if go_on {
            self.steps = step.step + 1;
        }
        go_on
    }

    fn on_attention(&mut self, att: CapturedAttention) -> Result<(), CaptureError> {
        self.sink.on_attention(att)
    }

    fn on_output(&mut self, out: ggml_trace::capture::StepOutput) -> Result<(), CaptureError> {
        self.sink.on_output(out)
    }

    fn on_unexplained(&mut self, change: &ggml_trace::capture::UnexplainedChange) {
        self.sink.on_unexplained(change)
    }
}

impl crate::Failure for MonitorError {
    fn exit_code(&self) -> u8 {
        // An RPC endpoint that is down or speaks another protocol: the run's options
        // cannot work as given (one line naming the endpoint, no "try --help").
        if self.is_usage() || matches!(self, MonitorError::Session(session::SessionError::Rpc(_))) {
            exit::USAGE
        } else {
            exit::FAILED
        }
    }
    fn is_usage(&self) -> bool {
        matches!(
            self,
            MonitorError::Session(session::SessionError::Usage(_)) | MonitorError::Replay { .. }
        )
    }
}
