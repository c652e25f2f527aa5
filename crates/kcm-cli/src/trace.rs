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
    let sink = MonitorSink::new(opts, stats_out, Arc::clone(&stop))?.with_progress(progress);
    let run_opts = RunOptions {
        capture: CaptureConfig {
            layer: opts.layer,
            from_step: opts.from_step,
            trace_sources: opts.trace_sources,
            keep: true,
            logits: opts.logits,
            kv_audit: opts.kv_audit,
            nodes: opts.node_filter(),
        },
        prefill_only: opts.prefill_only,
        verbose: opts.verbose,
        eval_callback: true,
    };
    let mut started = Started {
        sink: Some(sink),
        info: None,
        steps: 0,
        tokens: Vec::new(),
    };
    let replay = match &opts.replay {
        Some(p) => Some(load_replay(p)?),
        None => None,
    };
    let result = session::run_replay(&opts.llama_args, run_opts, replay.as_ref(), &mut started);
    let (started_info, started_steps) = (started.info.take(), started.steps);
    let step_tokens = std::mem::take(&mut started.tokens);
    let sink = started.sink.take().ok_or_else(|| {
        MonitorError::Io(io::Error::other("the monitor's sink was already finished"))
    })?;
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
    // The capture's RPC traffic, unless --quiet (the analyzer's --compare-devices sides).
    let traffic = crate::sink::rpc_traffic_line(
        "kqv-trace-monitor",
        &info,
        &outcome.remote_read_bytes,
        &step_tokens,
    )
    .filter(|_| !opts.quiet);
    let finished = sink.finish(&info, &outcome);
    if let Some(line) = traffic {
        eprintln!("{line}");
    }
    finished
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
/// that ends with a capture error (or a backend failure) can still save what was traced.
/// The sink is `None` only once `on_fatal` finished it (the process then ends).
struct Started {
    sink: Option<MonitorSink>,
    info: Option<RunInfo>,
    steps: u32,
    /// Tokens decoded in each step begun (index = step).
    tokens: Vec<usize>,
}

impl Started {
    fn sink(&mut self) -> Result<&mut MonitorSink, CaptureError> {
        self.sink
            .as_mut()
            .ok_or_else(|| CaptureError::Sink("the trace was already finished".into()))
    }
}

impl CaptureSink for Started {
    fn on_start(&mut self, info: &RunInfo) -> Result<(), CaptureError> {
        self.info = Some(info.clone());
        self.sink()?.on_start(info)
    }

    fn on_step(&mut self, step: &trace_format::StepMeta) -> bool {
        let go_on = self.sink.as_mut().is_some_and(|s| s.on_step(step));
        if go_on {
            self.steps = step.step + 1;
            let i = step.step as usize;
            if self.tokens.len() <= i {
                self.tokens.resize(i + 1, 0);
            }
            self.tokens[i] = step.tokens.len();
        }
        go_on
    }

    fn on_attention(&mut self, att: CapturedAttention) -> Result<(), CaptureError> {
        self.sink()?.on_attention(att)
    }

    fn on_node(&mut self, node: ggml_trace::capture::CapturedTensor) -> Result<(), CaptureError> {
        self.sink()?.on_node(node)
    }

    fn on_output(&mut self, out: ggml_trace::capture::StepOutput) -> Result<(), CaptureError> {
        self.sink()?.on_output(out)
    }

    fn on_unexplained(&mut self, change: &ggml_trace::capture::UnexplainedChange) {
        if let Some(s) = self.sink.as_mut() {
            s.on_unexplained(change)
        }
    }

    /// An RPC server died mid-run (ggml would abort): as on Ctrl-C, save what was traced,
    /// marked incomplete; one line; exit 1.
    fn on_fatal(&mut self, reason: &str) -> u8 {
        let saved = match (self.info.clone(), self.sink.take()) {
            (Some(info), Some(sink)) => {
                let outcome = RunOutcome {
                    steps: self.steps,
                    interrupted: true,
                    generated_text: String::new(),
                    ..RunOutcome::default()
                };
                match sink.finish(&info, &outcome) {
                    Ok(()) => format!(
                        "; stopped after {} steps, what was traced is saved (marked incomplete)",
                        self.steps
                    ),
                    Err(e) => format!("; saving what was traced failed too: {e}"),
                }
            }
            _ => String::new(),
        };
        eprintln!("kqv-trace-monitor: {reason}{saved}");
        exit::FAILED
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
