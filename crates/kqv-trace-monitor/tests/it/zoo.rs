//! The tiny-model zoo (`tiny_llama::zoo`): every architecture traced in three modes
//! (flash attention on, off, and a q8_0 K/V cache with flash attention, which a
//! quantized V needs), each trace then checked by `gguf-reader --verify-attention`.
//!
//! [`expected`] is the table of what happens today, one entry per (architecture, mode):
//! `Verifies` (the monitor succeeds and every (step, layer) group verifies), or
//! `Known(...)`: the stage that fails, its exit status and lines of its output, as seen.
//! The test asserts exactly that, so a change in behaviour (a fix above all) fails it
//! with a message naming the entry to update. The tools run as subprocesses: an abort
//! in llama.cpp is an exit status here, never the end of the test runner.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use test_support::LlamaArgs;
use tiny_llama::zoo::{write_zoo_model, Arch};
use trace_format::{Role, TraceFile};

/// 43 prompt tokens in ubatches of 16 (3 steps), then 3 generated tokens: 6 steps.
const PROMPT: &str = "The quick brown fox jumps over a lazy dog";
const STEPS: usize = 6;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    FaOn,
    FaOff,
    /// `-fa on -ctk q8_0 -ctv q8_0`.
    Q8,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::FaOn, Mode::FaOff, Mode::Q8];

    fn name(self) -> &'static str {
        match self {
            Mode::FaOn => "fa-on",
            Mode::FaOff => "fa-off",
            Mode::Q8 => "q8_0",
        }
    }

    fn args(self, a: LlamaArgs) -> LlamaArgs {
        match self {
            Mode::FaOn => a.flash(true),
            Mode::FaOff => a.flash(false),
            Mode::Q8 => a.flash(true).cache("q8_0", "q8_0"),
        }
    }
}

/// The tool whose run decides the outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// `kqv-trace-monitor ... --save-gguf TRACE`.
    Monitor,
    /// `gguf-reader TRACE --verify-attention`.
    Verify,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Exit {
    Code(i32),
    /// Killed by this signal (6: SIGABRT, a failed GGML_ASSERT).
    Signal(i32),
}

impl Exit {
    fn of(s: ExitStatus) -> Exit {
        match (s.code(), s.signal()) {
            (Some(c), _) => Exit::Code(c),
            (None, Some(sig)) => Exit::Signal(sig),
            (None, None) => Exit::Code(-1),
        }
    }
}

/// A failure as it happens today: the stage that fails, its exit status, and text that
/// its output (stdout and stderr) has, each entry within one line.
#[derive(Clone, Copy, Debug)]
struct Failure {
    stage: Stage,
    exit: Exit,
    lines: &'static [&'static str],
}

#[derive(Clone, Copy, Debug)]
enum Outcome {
    /// The monitor succeeds, the trace holds this many (step, layer) groups and
    /// `gguf-reader --verify-attention` verifies every one (exit 0).
    Verifies { groups: usize },
    /// Fails today, exactly so (no entry does at present; kept for the next one).
    #[allow(dead_code)]
    Known(Failure),
    /// llama.cpp cannot run this mode: the monitor says so in exactly this one line
    /// (its whole output) and exits 2 (a bad option), before any work.
    Refused(&'static str),
}

use Outcome::{Known, Refused, Verifies};

/// What each (architecture, mode) does today. Flip an entry to `Verifies` when a fix
/// makes it verify (the test says which).
fn expected(arch: Arch, mode: Mode) -> Outcome {
    let two_layers = Verifies { groups: STEPS * 2 };
    match (arch, mode) {
        (
            Arch::Llama
            | Arch::Qwen2
            | Arch::Qwen3
            | Arch::Phi3
            | Arch::Gemma2
            | Arch::Gemma3
            | Arch::Bloom
            | Arch::Mpt
            | Arch::StableLm
            | Arch::Olmo2
            | Arch::Granite
            | Arch::GptOss
            | Arch::Falcon,
            _,
        ) => two_layers,
        // Two short-convolution layers and two attention layers: 2 traced.
        (Arch::Lfm2, _) => two_layers,
        (Arch::Llama4, _) => Verifies { groups: STEPS * 4 },
        // Rotation is read from the graph per layer and per K/V: gemma4's q8_0 cache is
        // not rotated at all (llama.cpp decides from layer 0's head size, 32), deepseek2
        // rotates K (heads of 64) but not V (32).
        (Arch::Gemma4, _) => Verifies { groups: STEPS * 3 },
        // Absorbed MLA: kqv_out is reached from the attention op through the MUL_MAT by
        // attn_v_b (v_mla); the attention op's output is verified against the latent
        // attention, and kqv_out against v_mla · attn.
        (Arch::Deepseek2Mla, _) => two_layers,
        (Arch::Deepseek2, _) => two_layers,
        // llama.cpp forces flash attention off for Grok ("-fa on" runs the same graph as
        // "-fa off"); the scale (attention.output_scale) and softcap are SCALE → TANH →
        // SCALE ops before the softmax, folded into the recorded scale and softcap.
        (Arch::Grok, Mode::FaOn | Mode::FaOff) => two_layers,
        // llama.cpp itself cannot run it (flash attention forced off, and a quantized V
        // cache needs it): refused as a bad option, before any work.
        (Arch::Grok, Mode::Q8) => Refused(
            "kqv-trace-monitor: a quantized V cache (-ctv q8_0) needs flash attention, \
             which llama.cpp turns off for grok models: use -ctv f16, bf16 or f32 (try --help)",
        ),
        // Encoder: no KV cache (K and V are activations), non-causal; the node bert.cpp
        // also names kqv_out-<layer> (the output projection) is not traced.
        (Arch::Bert, _) => two_layers,
        // Encoder-decoder: the session calls llama_encode (the encoder pass is step 0,
        // the whole prompt in one ubatch: -ub 64 here) and decodes from the decoder start
        // token. The self-attention's softmax adds the relative-position bias (kq_b),
        // traced as kq_bias and added to the scores; llama.cpp refuses flash attention
        // for it, so only cross-attention runs FLASH_ATTN_EXT with -fa on
        // (run.cross_flash_attn). Cross-attention (K/V from the encoder output, no
        // cache, no causal mask) is recorded as layer n_layer + il: 2 encoder groups,
        // then 4 per decoder step (2 self, 2 cross).
        (Arch::T5, _) => Verifies { groups: 18 },
    }
}

fn gguf_reader() -> PathBuf {
    test_support::workspace_bin("gguf-reader", "gguf-reader")
}

/// What one (architecture, mode) did.
struct Run {
    stage: Stage,
    exit: Exit,
    output: String,
    trace: Option<PathBuf>,
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn run(model: &Path, dir: &Path, arch: Arch, mode: Mode) -> Run {
    let trace = dir.join(format!("{arch}-{}.gguf", mode.name()));
    let args = mode
        .args(
            LlamaArgs::new(model, PROMPT)
                .n(3)
                .ubatch(if arch == Arch::T5 { 64 } else { 16 })
                .threads(2)
                .greedy(),
        )
        .arg("--save-gguf")
        .arg(trace.display().to_string())
        .build();
    let o = Command::new(env!("CARGO_BIN_EXE_kqv-trace-monitor"))
        .args(&args)
        // An abort prints the message only (no gdb backtrace: slow, and noise).
        .env("GGML_NO_BACKTRACE", "1")
        .output()
        .unwrap();
    if !o.status.success() {
        return Run {
            stage: Stage::Monitor,
            exit: Exit::of(o.status),
            output: text(&o),
            trace: None,
        };
    }
    let v = Command::new(gguf_reader())
        .arg(&trace)
        .arg("--verify-attention")
        .output()
        .unwrap();
    // Both storages without a second run: the trace (delta, version 2) and its version-1
    // copy (test_support::storage::as_storage) verify alike, verdict for verdict.
    let full = test_support::storage::as_storage(&trace, test_support::storage::KvStorage::Full);
    let v1 = Command::new(gguf_reader())
        .arg(&full)
        .arg("--verify-attention")
        .output()
        .unwrap();
    assert_eq!(
        (v1.status.code(), &v1.stdout),
        (v.status.code(), &v.stdout),
        "{arch} {}: version 1 verifies otherwise than version 2:\n{}",
        mode.name(),
        text(&v1)
    );
    Run {
        stage: Stage::Verify,
        exit: Exit::of(v.status),
        output: text(&v),
        trace: Some(trace),
    }
}

/// Mean over the softmax rows of step `last`'s layer-0 scores (FA off): the largest
/// weight, and 1 / the number of cells the row attends to. Attention that is neither
/// uniform nor one-hot has `uniform < max < 1`.
fn softmax_spread(t: &TraceFile, last: u32) -> (f64, f64) {
    let sm = t
        .find(Role::KqSoftMax, 0, last)
        .or_else(|| {
            // The first attention layer of a hybrid model need not be 0.
            t.groups()
                .keys()
                .filter(|(s, _)| *s == last)
                .find_map(|&(s, l)| t.find(Role::KqSoftMax, l, s))
        })
        .expect("a traced softmax");
    let w = t.f32(sm).unwrap();
    let n = sm.meta.layout.ne[0] as usize;
    let (mut max_sum, mut uni_sum, mut rows) = (0.0f64, 0.0f64, 0usize);
    for row in w.chunks(n) {
        let live = row.iter().filter(|&&x| x > 0.0).count();
        if live == 0 {
            continue;
        }
        max_sum += row.iter().fold(0.0f32, |a, &b| a.max(b)) as f64;
        uni_sum += 1.0 / live as f64;
        rows += 1;
    }
    (max_sum / rows as f64, uni_sum / rows as f64)
}

/// Runs every mode of `arch` and checks each against [`expected`]; one report of every
/// difference.
fn check_arch(arch: Arch) {
    let dir = tempfile::tempdir().unwrap();
    let model = write_zoo_model(dir.path(), arch).unwrap();
    let mut problems = Vec::new();
    for mode in Mode::ALL {
        let want = expected(arch, mode);
        let got = run(&model, dir.path(), arch, mode);
        let label = format!("{arch} {}", mode.name());
        eprintln!(
            "{label}: {:?} {:?}\n{}",
            got.stage,
            got.exit,
            got.output
                .lines()
                .rev()
                .take(3)
                .collect::<Vec<_>>()
                .join("\n")
        );
        match want {
            Verifies { groups } => {
                if got.stage != Stage::Verify || got.exit != Exit::Code(0) {
                    problems.push(format!(
                        "{label}: expected to verify, but {:?} exited {:?}:\n{}",
                        got.stage, got.exit, got.output
                    ));
                    continue;
                }
                let summary =
                    format!("verified {groups} of {groups} (step, layer) groups: 0 failed, 0 missing inputs");
                if !got.output.lines().any(|l| l.trim() == summary) {
                    problems.push(format!("{label}: no line '{summary}' in\n{}", got.output));
                }
                // The distances behind docs/verification.md's zoo table: the verdict's
                // (faithful reference) and the exact one, worst over the groups, by path.
                let (mut faithful, mut exact, mut kernels) = (0f64, 0f64, Vec::new());
                for l in got.output.lines() {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    if f.len() >= 11 && f[0].parse::<u32>().is_ok() && f[f.len() - 1] == "ok" {
                        faithful = faithful.max(f[3].parse().unwrap_or(f64::NAN));
                        exact = exact.max(f[f.len() - 3].parse().unwrap_or(0.0));
                        let k = f[f.len() - 2].to_owned();
                        if !kernels.contains(&k) {
                            kernels.push(k);
                        }
                    }
                }
                eprintln!(
                    "ZOO-MEASURE {label}: faithful {faithful:.1e} exact {exact:.1e} kernels {}",
                    kernels.join(",")
                );
                let t = TraceFile::open(got.trace.as_ref().unwrap()).unwrap();
                assert_eq!(t.run.architecture, arch.gguf_arch(), "{label}");
                // T5: the encoder pass (the whole prompt), then the decoder start token
                // and 3 generated tokens' steps (the last generated one is not decoded).
                let steps = if arch == Arch::T5 { 5 } else { STEPS };
                assert_eq!(t.steps.len(), steps, "{label}");
                // llama.cpp forces flash attention off for Grok.
                let asked = if mode == Mode::FaOff { "off" } else { "on" };
                // llama.cpp forces flash attention off for Grok, and for T5's
                // self-attention (a kq_b); T5's cross-attention runs as asked.
                let flash = if arch == Arch::Grok || arch == Arch::T5 {
                    "off"
                } else {
                    asked
                };
                assert_eq!(t.run.flash_attn, flash, "{label}");
                if arch == Arch::T5 {
                    assert_eq!(t.run.n_cross_layer, 2, "{label}");
                    assert_eq!(t.run.cross_flash_attn, asked, "{label}");
                    // The encoder's (step 0) and the decoder's self-attention carry the
                    // traced relative-position bias; cross-attention (layers 2, 3) none.
                    for (step, layer) in [(0, 0), (1, 1)] {
                        assert!(t.find(Role::KqBias, layer, step).is_some(), "{label}");
                    }
                    assert!(t.find(Role::KqBias, 2, 1).is_none(), "{label}");
                    assert!(t.find(Role::KqvOut, 3, 1).is_some(), "{label}");
                } else {
                    assert_eq!(t.run.n_cross_layer, 0, "{label}");
                }
                if flash == "off" {
                    // The random weights make attention that is neither uniform nor
                    // one-hot (and finite: the group verified).
                    // An encoder has no cache: a generated token attends to itself
                    // alone, so its spread is read on the first prompt step.
                    let step = if arch == Arch::Bert {
                        0
                    } else {
                        steps as u32 - 1
                    };
                    let (max, uniform) = softmax_spread(&t, step);
                    eprintln!(
                        "{label}: mean largest softmax weight {max:.3} (uniform {uniform:.3})"
                    );
                    assert!(
                        max > 1.5 * uniform && max < 0.95,
                        "{label}: degenerate attention: mean largest weight {max}, uniform {uniform}"
                    );
                }
            }
            Refused(line) => {
                if got.stage != Stage::Monitor
                    || got.exit != Exit::Code(2)
                    || got.output.trim() != line
                {
                    problems.push(format!(
                        "{label}: expected the monitor to refuse with exit 2 and exactly\n{line}\n\
                         got {:?} {:?}:\n{}",
                        got.stage, got.exit, got.output
                    ));
                }
            }
            Known(f) => {
                let same = got.stage == f.stage && got.exit == f.exit;
                let missing: Vec<&str> = f
                    .lines
                    .iter()
                    .copied()
                    .filter(|want| !got.output.lines().any(|l| l.contains(want)))
                    .collect();
                if got.stage == Stage::Verify && got.exit == Exit::Code(0) {
                    problems.push(format!(
                        "{label}: now verifies; flip its entry in zoo.rs `expected` to Verifies \
                         (was Known: {:?} exit {:?})",
                        f.stage, f.exit
                    ));
                } else if !same || !missing.is_empty() {
                    problems.push(format!(
                        "{label}: expected Known({:?}, {:?}, {:?}), got {:?} {:?}; missing {missing:?}:\n{}",
                        f.stage, f.exit, f.lines, got.stage, got.exit, got.output
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

macro_rules! zoo_tests {
    ($($test:ident => $arch:expr,)*) => {
        $(
            #[test]
            fn $test() {
                check_arch($arch);
            }
        )*

        /// Every zoo architecture has a test above.
        #[test]
        fn every_zoo_architecture_is_tested() {
            let tested = [$($arch),*];
            for a in Arch::ALL {
                assert!(tested.contains(&a), "{a} has no zoo test");
            }
        }
    };
}

zoo_tests! {
    zoo_llama => Arch::Llama,
    zoo_qwen2 => Arch::Qwen2,
    zoo_qwen3 => Arch::Qwen3,
    zoo_phi3 => Arch::Phi3,
    zoo_gemma2 => Arch::Gemma2,
    zoo_gemma3 => Arch::Gemma3,
    zoo_gemma4 => Arch::Gemma4,
    zoo_bloom => Arch::Bloom,
    zoo_mpt => Arch::Mpt,
    zoo_stablelm => Arch::StableLm,
    zoo_olmo2 => Arch::Olmo2,
    zoo_granite => Arch::Granite,
    zoo_gpt_oss => Arch::GptOss,
    zoo_deepseek2_mla => Arch::Deepseek2Mla,
    zoo_deepseek2 => Arch::Deepseek2,
    zoo_falcon => Arch::Falcon,
    zoo_llama4 => Arch::Llama4,
    zoo_grok => Arch::Grok,
    zoo_bert => Arch::Bert,
    zoo_t5 => Arch::T5,
    zoo_lfm2 => Arch::Lfm2,
}
