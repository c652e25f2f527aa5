//! A panic in a sink's Rust code, called from inside llama.cpp's callbacks, must not
//! unwind into C/C++ (which would abort the process): the capture catches it, stops the
//! run, and `session::run` returns it as `CaptureError::Panicked`.

use std::path::{Path, PathBuf};

use ggml_trace::capture::{CaptureConfig, CaptureError, CaptureSink, CapturedAttention};
use ggml_trace::session::{self, RunOptions, SessionError};
use trace_format::StepMeta;

fn model(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.gguf");
    tiny_llama::write_model(&path, &tiny_llama::TinyLlamaConfig::default()).expect("model");
    path
}

fn llama_args(model: &Path, flash: &str) -> Vec<String> {
    [
        "-m",
        &model.display().to_string(),
        "-p",
        "Hello world",
        "-n",
        "4",
        "-t",
        "1",
        "--temp",
        "0",
        "-fa",
        flash,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn options() -> RunOptions {
    RunOptions {
        capture: CaptureConfig {
            from_step: 0,
            layer: None,
            trace_sources: true,
            keep: true,
            logits: false,
            kv_audit: ggml_trace::capture::DEFAULT_KV_AUDIT,
            nodes: None,
        },
        eval_callback: true,
        prefill_only: false,
        verbose: false,
    }
}

/// Panics in `on_attention` (the eval callback) or `on_step` (the step callback) at
/// step `at`; records the steps it saw.
struct Panicky {
    in_attention: bool,
    at: u32,
    steps: Vec<u32>,
    attention_steps: Vec<u32>,
}

impl Panicky {
    fn new(in_attention: bool, at: u32) -> Panicky {
        Panicky {
            in_attention,
            at,
            steps: Vec::new(),
            attention_steps: Vec::new(),
        }
    }
}

impl CaptureSink for Panicky {
    fn on_step(&mut self, step: &StepMeta) -> bool {
        self.steps.push(step.step);
        if !self.in_attention && step.step == self.at {
            panic!("planted panic in on_step at step {}", step.step);
        }
        true
    }

    fn on_attention(&mut self, att: CapturedAttention) -> Result<(), CaptureError> {
        self.attention_steps.push(att.step);
        if self.in_attention && att.step == self.at {
            panic!("planted panic in on_attention at step {}", att.step);
        }
        Ok(())
    }
}

fn expect_panicked(result: Result<impl std::fmt::Debug, SessionError>, what: &str) {
    match result {
        Err(SessionError::Capture(CaptureError::Panicked(msg))) => {
            assert!(msg.contains(what), "{msg:?}");
        }
        other => panic!("expected a caught panic, got {other:?}"),
    }
}

#[test]
fn a_panic_in_on_attention_stops_the_run_with_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = model(dir.path());
    for flash in ["on", "off"] {
        let mut sink = Panicky::new(true, 1);
        let result = session::run(&llama_args(&model, flash), options(), &mut sink);
        expect_panicked(result, "planted panic in on_attention at step 1");
        assert!(
            sink.attention_steps.contains(&0),
            "-fa {flash}: step 0 was traced"
        );
        // The first panic stopped the run: nothing after it, no step 2.
        assert_eq!(sink.attention_steps.last(), Some(&1), "-fa {flash}");
        assert_eq!(sink.steps, [0, 1], "-fa {flash}");
    }
}

#[test]
fn a_panic_in_on_step_stops_the_run_with_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = model(dir.path());
    let mut sink = Panicky::new(false, 2);
    let result = session::run(&llama_args(&model, "on"), options(), &mut sink);
    expect_panicked(result, "planted panic in on_step at step 2");
    assert_eq!(sink.steps, [0, 1, 2]);
    assert!(sink.attention_steps.iter().all(|&s| s < 2));
}
