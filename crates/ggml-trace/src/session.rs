//! A traced llama.cpp run: llama.cpp parses its own options, loads the model, and decodes
//! the prompt (one ubatch per step) and the generated tokens, while [`Capture`] watches
//! the graph. The C side is `csrc/kcm_session.{h,cpp}` in ggml-trace-sys, declared in
//! `ggml_trace_sys::session`.

use std::ffi::{c_char, c_void, CStr, CString};

use trace_format::StepMeta;

use ggml_trace_sys::session::{
    kcm_replay, kcm_run_info, kcm_session, kcm_session_create, kcm_session_free,
    kcm_session_generated_text, kcm_session_info, kcm_session_prompt_tokens, kcm_session_run,
    kcm_session_threadpool,
};

use crate::capture::{Capture, CaptureConfig, CaptureError, CaptureSink, StepOutput};
// Defined in `run_info` (shared with `capture`); re-exported here, where they are made.
pub use crate::run_info::{MixedKvInfo, RunInfo, RunOutcome};

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("argument contains a NUL byte: {0:?}")]
    NulInArgument(String),
    /// llama.cpp's own parser rejected an option (a usage error).
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Setup(String),
    #[error("{0}")]
    Decode(String),
    #[error("capture failed: {0}")]
    Capture(#[from] CaptureError),
    /// An RPC endpoint of `--rpc` is down, speaks another protocol, or cannot serve this
    /// run (checked before llama.cpp connects: see [`crate::rpc`]).
    #[error("{0}")]
    Rpc(#[from] crate::rpc::RpcError),
}

/// The options of our mixed KV cache (vendor/patches/0003, 0005).
const MIXED_OPTIONS: [&str; 4] = [
    "--mixed-kv-cache",
    "--mixed-hot-window",
    "--mixed-cold-type",
    "--mixed-swa-type",
];

/// The refusal line when `llama_args` (or `LLAMA_ARG_MIXED_KV_CACHE`) ask for the mixed KV
/// cache and the build has none (`available` false); `None` otherwise.
pub fn mixed_kv_unavailable(
    llama_args: &[String],
    env: Option<&str>,
    available: bool,
) -> Option<String> {
    if available {
        return None;
    }
    let option = llama_args
        .iter()
        .map(|a| a.split('=').next().unwrap_or(a))
        .find(|a| MIXED_OPTIONS.contains(a))
        .map(str::to_string)
        .or_else(|| {
            crate::rpc::mixed_kv_cache(&[], env).then(|| crate::rpc::MIXED_ENV.to_string())
        })?;
    Some(format!(
        "{option}: the llama.cpp these tools were built from ({}) has no mixed KV cache \
         (our vendor/patches add it: `cargo xtask build-llama --llama-src PATH \
         --with-patches`, where they apply and compile; docs/build.md)",
        ggml_trace_sys::LLAMA_ORIGIN
    ))
}

fn c_string(buf: &[c_char]) -> String {
    let bytes: Vec<u8> = buf
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Why a trace's steps cannot be replayed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReplayError {
    #[error("the trace records no steps")]
    NoSteps,
    #[error("the trace records no prompt tokens (kqv_trace.run.prompt_tokens)")]
    NoPrompt,
    #[error("its steps are not numbered 0, 1, 2, ... (step {found} where {expected} was due)")]
    Numbering { expected: u32, found: u32 },
    #[error("its step {step} decodes no tokens")]
    EmptyStep { step: u32 },
    #[error("its step {step} has {tokens} tokens and {positions} positions")]
    Lengths {
        step: u32,
        tokens: usize,
        positions: usize,
    },
    #[error(
        "its step {step} covers positions from {found}, where one sequence decoded from \
         position 0 would be at {expected} (a trace of another program?)"
    )]
    Positions {
        step: u32,
        expected: i32,
        found: i32,
    },
    #[error("it has more tokens than a replay can index")]
    TooLarge,
}

/// The steps of an earlier trace, to decode again instead of the prompt and sampled
/// tokens: every step the same tokens in the same ubatch, so that two runs compute the
/// same thing step by step (`--replay`; the analyzer's default).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replay {
    /// Each step's tokens.
    pub steps: Vec<Vec<i32>>,
    /// How many of the first steps' tokens are the prompt.
    pub n_prompt_tokens: usize,
    /// What to record as its source (the trace's path as the user gave it).
    pub source: String,
}

impl Replay {
    /// The steps of a trace (its `kqv_trace.step.*` and prompt): numbered 0.., none
    /// empty, each covering consecutive positions that continue the step before (a model
    /// with an encoder restarts at 0 after its encoder step).
    pub fn from_steps(
        steps: &[trace_format::StepMeta],
        prompt_tokens: &[i32],
        source: impl Into<String>,
    ) -> Result<Self, ReplayError> {
        if steps.is_empty() {
            return Err(ReplayError::NoSteps);
        }
        if prompt_tokens.is_empty() {
            return Err(ReplayError::NoPrompt);
        }
        let mut next_pos = 0i64;
        for (i, st) in steps.iter().enumerate() {
            let expected = u32::try_from(i).map_err(|_| ReplayError::TooLarge)?;
            if st.step != expected {
                return Err(ReplayError::Numbering {
                    expected,
                    found: st.step,
                });
            }
            if st.tokens.is_empty() {
                return Err(ReplayError::EmptyStep { step: st.step });
            }
            if st.tokens.len() != st.positions.len() {
                return Err(ReplayError::Lengths {
                    step: st.step,
                    tokens: st.tokens.len(),
                    positions: st.positions.len(),
                });
            }
            let first = i64::from(st.positions[0]);
            // An encoder model's decoder starts again at 0 after step 0.
            let restart = i == 1 && first == 0;
            let mut want = if restart { 0 } else { next_pos };
            for &p in &st.positions {
                if i64::from(p) != want {
                    return Err(ReplayError::Positions {
                        step: st.step,
                        expected: i32::try_from(want).unwrap_or(i32::MAX),
                        found: p,
                    });
                }
                want += 1;
            }
            next_pos = want;
        }
        if steps.len() > i32::MAX as usize
            || steps.iter().map(|s| s.tokens.len()).sum::<usize>() > i32::MAX as usize
        {
            return Err(ReplayError::TooLarge);
        }
        Ok(Self {
            steps: steps.iter().map(|s| s.tokens.clone()).collect(),
            n_prompt_tokens: prompt_tokens.len(),
            source: source.into(),
        })
    }
}

/// What `run` needs besides llama.cpp's own options.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub capture: CaptureConfig,
    /// Install the eval callback (false only to measure llama.cpp without it: the sink
    /// then sees the steps but no attention).
    pub eval_callback: bool,
    pub prefill_only: bool,
    /// Show llama.cpp's logs on stderr (otherwise errors only).
    pub verbose: bool,
}

struct State<'a> {
    capture: Capture<'a>,
    stopped: bool,
}

unsafe extern "C" fn on_step(
    user: *mut c_void,
    step: u32,
    tokens: *const i32,
    positions: *const i32,
    n: i32,
) -> i32 {
    // SAFETY: `user` is the `*mut State` passed to kcm_session_run, alive for the run.
    let state = unsafe { &mut *(user as *mut State) };
    // A panic (the sink's on_step) must not unwind into C++: catch it, stop the run.
    let go_on = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let n = n.max(0) as usize;
        // SAFETY: the C side passes `n` valid tokens and positions.
        let (tokens, positions) = unsafe {
            (
                std::slice::from_raw_parts(tokens, n).to_vec(),
                std::slice::from_raw_parts(positions, n).to_vec(),
            )
        };
        let meta = StepMeta {
            step,
            positions,
            tokens,
        };
        state.capture.begin_step(&meta)
    }));
    match go_on {
        Ok(true) => 1,
        Ok(false) => {
            state.stopped = true;
            0
        }
        Err(panic) => {
            state.capture.fail(CaptureError::from_panic(panic));
            0
        }
    }
}

unsafe extern "C" fn on_output(
    user: *mut c_void,
    step: u32,
    sampled: i32,
    logits: *const f32,
    n_vocab: i32,
) -> i32 {
    // SAFETY: `user` is the `*mut State` passed to kcm_session_run, alive for the run.
    let state = unsafe { &mut *(user as *mut State) };
    let go_on = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let logits =
            (state.capture.wants_logits() && !logits.is_null() && n_vocab > 0).then(|| {
                // SAFETY: the C side passes n_vocab valid floats, alive during this call.
                unsafe { std::slice::from_raw_parts(logits, n_vocab as usize) }.to_vec()
            });
        state.capture.end_step(StepOutput {
            step,
            sampled: (sampled >= 0).then_some(sampled),
            logits,
        })
    }));
    match go_on {
        Ok(true) => 1,
        Ok(false) => 0,
        Err(panic) => {
            state.capture.fail(CaptureError::from_panic(panic));
            0
        }
    }
}

/// Run llama.cpp with `llama_args` (llama.cpp's own options, without a program name),
/// capturing attention into `sink`.
pub fn run(
    llama_args: &[String],
    opts: RunOptions,
    sink: &mut dyn CaptureSink,
) -> Result<(RunInfo, RunOutcome), SessionError> {
    run_replay(llama_args, opts, None, sink)
}

/// [`run`], decoding the steps of `replay` (when given) instead of the prompt and sampled
/// tokens.
pub fn run_replay(
    llama_args: &[String],
    opts: RunOptions,
    replay: Option<&Replay>,
    sink: &mut dyn CaptureSink,
) -> Result<(RunInfo, RunOutcome), SessionError> {
    run_with(llama_args, opts, replay, sink, false)
}

/// [`run`] with llama.cpp's own eval callback, `common_debug_cb_eval` (what
/// `llama-eval-callback` and `llama-debug` install: every node's values printed through
/// common's log, on stderr with `opts.verbose`), instead of the capture; the sink sees
/// the steps only. The benchmarks' anchor for the cost of looking at every node.
pub fn run_llama_debug(
    llama_args: &[String],
    opts: RunOptions,
    sink: &mut dyn CaptureSink,
) -> Result<(RunInfo, RunOutcome), SessionError> {
    run_with(llama_args, opts, None, sink, true)
}

fn run_with(
    llama_args: &[String],
    opts: RunOptions,
    replay: Option<&Replay>,
    sink: &mut dyn CaptureSink,
    llama_debug: bool,
) -> Result<(RunInfo, RunOutcome), SessionError> {
    // A build without the mixed KV cache (ggml_trace_sys::MIXED_KV_CACHE): its options are
    // refused in one line (a usage error, exit 2), not left to llama.cpp's parser.
    if let Some(why) = mixed_kv_unavailable(
        llama_args,
        std::env::var(crate::rpc::MIXED_ENV).ok().as_deref(),
        ggml_trace_sys::MIXED_KV_CACHE,
    ) {
        return Err(SessionError::Usage(why));
    }
    // Before llama.cpp's parser registers the servers (its client aborts on a dead one).
    let rpc_endpoints = crate::rpc::check_run(llama_args)?;
    // With RPC servers, a server that dies mid-run makes ggml-rpc abort the process on its
    // dispatcher thread: the sink gets on_fatal there instead (crate::fatal).
    let lock = std::sync::Arc::new(std::sync::Mutex::new(()));
    let sink_ptr: *mut (dyn CaptureSink + '_) = sink;
    let mut guarded = crate::fatal::Guarded {
        // SAFETY: reborrows the caller's `&mut` sink; `sink` is not used again directly.
        inner: unsafe { &mut *sink_ptr },
        lock: std::sync::Arc::clone(&lock),
    };
    let _armed = (!rpc_endpoints.is_empty()).then(|| {
        // SAFETY: the sink outlives `_armed` (dropped at the end of this function, before
        // the caller's borrow ends) and is reached only through `guarded` meanwhile.
        unsafe { crate::fatal::Armed::arm(sink_ptr, lock, rpc_endpoints.clone()) }
    });
    let sink: &mut dyn CaptureSink = if rpc_endpoints.is_empty() {
        guarded.inner
    } else {
        &mut guarded
    };
    let mut argv_owned = vec![CString::new("kqv-trace-monitor").unwrap_or_default()];
    for a in llama_args {
        argv_owned
            .push(CString::new(a.as_str()).map_err(|_| SessionError::NulInArgument(a.clone()))?);
    }
    let argv: Vec<*const c_char> = argv_owned.iter().map(|c| c.as_ptr()).collect();
    let want_logits = opts.capture.logits;
    let mut state = Box::new(State {
        capture: Capture::new(opts.capture, sink),
        stopped: false,
    });
    let state_ptr: *mut State = &mut *state;
    // The eval callback receives a pointer to the Capture inside the boxed state.
    // SAFETY: field projection of a live box; the box outlives the session below.
    let cap_ptr: *mut Capture = unsafe { &mut (*state_ptr).capture };
    let mut err = vec![0 as c_char; 1024];
    let mut usage_error = 0i32;
    // The replayed steps as the C side reads them (copied there).
    let replay_tokens: Vec<i32> = replay
        .map(|r| r.steps.iter().flatten().copied().collect())
        .unwrap_or_default();
    let replay_lens: Vec<i32> = replay
        .map(|r| r.steps.iter().map(|s| s.len() as i32).collect())
        .unwrap_or_default();
    let replay_c = replay.map(|r| kcm_replay {
        tokens: replay_tokens.as_ptr(),
        n_tokens: replay_lens.as_ptr(),
        n_steps: replay_lens.len() as i32,
        n_prompt_tokens: i32::try_from(r.n_prompt_tokens).unwrap_or(i32::MAX),
    });
    // llama.cpp's own callback's state, freed after the session (declared first: dropped
    // last).
    struct DebugData(*mut c_void);
    impl Drop for DebugData {
        fn drop(&mut self) {
            if !self.0.is_null() {
                // SAFETY: made by kcm_llama_debug_new, freed once, after the session.
                unsafe { ggml_trace_sys::shim::kcm_llama_debug_free(self.0) }
            }
        }
    }
    // SAFETY: no arguments; NULL on failure (checked).
    let debug =
        llama_debug.then(|| DebugData(unsafe { ggml_trace_sys::shim::kcm_llama_debug_new() }));
    if debug.as_ref().is_some_and(|d| d.0.is_null()) {
        return Err(SessionError::Setup(
            "common_debug_cb_user_data could not be made".into(),
        ));
    }
    let (callback, callback_data): (crate::sys::ggml_backend_sched_eval_callback, *mut c_void) =
        match &debug {
            Some(d) => (Some(ggml_trace_sys::shim::kcm_llama_debug_cb), d.0),
            None if opts.eval_callback => (Some(Capture::callback), cap_ptr.cast()),
            None => (None, cap_ptr.cast()),
        };
    // SAFETY: argv holds argc valid C strings; the callback and its user data stay valid
    // until kcm_session_free below.
    let session = unsafe {
        kcm_session_create(
            argv.len() as i32,
            argv.as_ptr(),
            callback,
            callback_data,
            i32::from(opts.verbose),
            replay_c
                .as_ref()
                .map_or(std::ptr::null(), |r| r as *const kcm_replay),
            err.as_mut_ptr(),
            err.len(),
            &mut usage_error,
        )
    };
    if session.is_null() {
        return Err(if usage_error != 0 {
            SessionError::Usage(c_string(&err))
        } else {
            SessionError::Setup(c_string(&err))
        });
    }
    let guard = SessionGuard(session);
    if opts.eval_callback && debug.is_none() {
        let mut n_threads = 0i32;
        // SAFETY: valid session; the pool lives until kcm_session_free (the guard), after
        // the last decode, and the eval callback runs between the computations on it.
        unsafe {
            let pool = kcm_session_threadpool(guard.0, &mut n_threads);
            (*state_ptr).capture.use_threadpool(pool, n_threads);
        }
    }
    let mut raw = std::mem::MaybeUninit::<kcm_run_info>::zeroed();
    // SAFETY: valid session, writable out-struct.
    let raw = unsafe {
        kcm_session_info(guard.0, raw.as_mut_ptr());
        raw.assume_init()
    };
    let mut prompt = vec![0i32; raw.n_prompt_tokens.max(0) as usize];
    // SAFETY: the buffer holds n_prompt_tokens entries.
    unsafe { kcm_session_prompt_tokens(guard.0, prompt.as_mut_ptr(), prompt.len() as i32) };
    let info = RunInfo {
        n_layer: raw.n_layer.max(0) as u32,
        n_head: raw.n_head.max(0) as u32,
        n_head_kv: raw.n_head_kv.max(0) as u32,
        n_ctx: raw.n_ctx,
        n_batch: raw.n_batch,
        n_ubatch: raw.n_ubatch,
        n_predict: raw.n_predict,
        seed: raw.seed,
        flash_attn_requested: match raw.flash_attn {
            1 => Some(true),
            0 => Some(false),
            _ => None,
        },
        type_k: gguf_io::GgmlType(raw.type_k as u32),
        type_v: gguf_io::GgmlType(raw.type_v as u32),
        architecture: c_string(&raw.arch),
        model_path: c_string(&raw.model_path),
        prompt_tokens: prompt,
        mixed: (raw.mixed_kv_cache != 0).then_some(MixedKvInfo {
            hot_window: raw.mixed_hot_window,
            cold_type: gguf_io::GgmlType(raw.mixed_cold_type as u32),
            swa_type: u32::try_from(raw.mixed_swa_type)
                .ok()
                .map(gguf_io::GgmlType),
        }),
        kv_buffer_bytes: raw.kv_buffer_bytes,
        n_threads: raw.n_threads.max(0) as u32,
        n_threads_batch: raw.n_threads_batch.max(0) as u32,
        replayed_from: replay.map(|r| r.source.clone()),
        rpc_endpoints,
    };
    // SAFETY: state_ptr is live (boxed above).
    unsafe { (*state_ptr).capture.start(&info) }.map_err(SessionError::Capture)?;
    // SAFETY: valid session; on_step gets the live state pointer.
    let steps = unsafe {
        kcm_session_run(
            guard.0,
            i32::from(opts.prefill_only),
            i32::from(want_logits),
            Some(on_step),
            Some(on_output),
            state_ptr.cast(),
            err.as_mut_ptr(),
            err.len(),
        )
    };
    // SAFETY: state_ptr is live.
    if let Some(e) = unsafe { (*state_ptr).capture.take_error() } {
        return Err(SessionError::Capture(e));
    }
    if steps < 0 {
        return Err(SessionError::Decode(c_string(&err)));
    }
    // SAFETY: valid session; the text is copied out before the session is freed.
    let generated_text = unsafe {
        let p = kcm_session_generated_text(guard.0);
        if p.is_null() {
            String::new()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    drop(guard);
    let interrupted = state.stopped;
    let capture = state.capture.stats();
    let remote_read_bytes = state.capture.remote_bytes_per_step().to_vec();
    drop(state);
    Ok((
        info,
        RunOutcome {
            steps: steps as u32,
            interrupted,
            generated_text,
            capture,
            remote_read_bytes,
        },
    ))
}

struct SessionGuard(*mut kcm_session);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        // SAFETY: created by kcm_session_create and freed once.
        unsafe { kcm_session_free(self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trace_format::StepMeta;

    fn step(step: u32, positions: std::ops::Range<i32>) -> StepMeta {
        StepMeta {
            step,
            tokens: positions.clone().map(|p| 100 + p).collect(),
            positions: positions.collect(),
        }
    }

    #[test]
    fn a_trace_of_one_sequence_replays_step_by_step() {
        let steps = [step(0, 0..3), step(1, 3..5), step(2, 5..6), step(3, 6..7)];
        let r = Replay::from_steps(&steps, &[100, 101, 102, 103, 104], "t.gguf").unwrap();
        assert_eq!(
            r.steps,
            vec![vec![100, 101, 102], vec![103, 104], vec![105], vec![106]]
        );
        assert_eq!(r.n_prompt_tokens, 5);
        assert_eq!(r.source, "t.gguf");
        // An encoder model's decoder restarts at position 0 after the encoder step.
        let t5 = [step(0, 0..4), step(1, 0..1), step(2, 1..2)];
        assert!(Replay::from_steps(&t5, &[1, 2, 3, 4], "t5").is_ok());
    }

    #[test]
    fn steps_that_are_not_one_sequence_are_refused_with_the_step() {
        let p = [1];
        assert_eq!(Replay::from_steps(&[], &p, "x"), Err(ReplayError::NoSteps));
        assert_eq!(
            Replay::from_steps(&[step(0, 0..1)], &[], "x"),
            Err(ReplayError::NoPrompt)
        );
        assert_eq!(
            Replay::from_steps(&[step(0, 0..1), step(2, 1..2)], &p, "x"),
            Err(ReplayError::Numbering {
                expected: 1,
                found: 2
            })
        );
        assert_eq!(
            Replay::from_steps(&[step(0, 0..1), step(1, 5..6)], &p, "x"),
            Err(ReplayError::Positions {
                step: 1,
                expected: 1,
                found: 5
            })
        );
        assert_eq!(
            Replay::from_steps(&[step(0, 0..1), step(1, 1..2), step(2, 0..1)], &p, "x"),
            Err(ReplayError::Positions {
                step: 2,
                expected: 2,
                found: 0
            })
        );
        let mut empty = step(1, 1..1);
        empty.tokens.clear();
        assert_eq!(
            Replay::from_steps(&[step(0, 0..1), empty], &p, "x"),
            Err(ReplayError::EmptyStep { step: 1 })
        );
        let mut short = step(0, 0..2);
        short.tokens.pop();
        assert_eq!(
            Replay::from_steps(&[short], &p, "x"),
            Err(ReplayError::Lengths {
                step: 0,
                tokens: 1,
                positions: 2
            })
        );
    }
}

#[cfg(test)]
mod mixed_kv_refusal_tests {
    use super::mixed_kv_unavailable;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn refused_only_without_the_feature() {
        let a = args(&["-m", "x.gguf", "--mixed-kv-cache"]);
        assert_eq!(mixed_kv_unavailable(&a, None, true), None);
        let line = mixed_kv_unavailable(&a, None, false).expect("refused");
        assert!(line.starts_with("--mixed-kv-cache: "), "{line}");
        assert!(line.contains("has no mixed KV cache"), "{line}");
        assert!(!line.contains('\n'), "one line: {line}");
    }

    #[test]
    fn every_mixed_option_and_the_environment_are_refused() {
        for opt in [
            "--mixed-hot-window",
            "--mixed-cold-type=q4_0",
            "--mixed-swa-type",
        ] {
            let line = mixed_kv_unavailable(&args(&[opt, "64"]), None, false).expect(opt);
            assert!(line.starts_with(opt.split('=').next().unwrap()), "{line}");
        }
        let line = mixed_kv_unavailable(&[], Some("on"), false).expect("env");
        assert!(line.starts_with("LLAMA_ARG_MIXED_KV_CACHE: "), "{line}");
        assert_eq!(mixed_kv_unavailable(&[], Some("0"), false), None);
        assert_eq!(
            mixed_kv_unavailable(&args(&["-fa", "on"]), None, false),
            None
        );
    }
}
