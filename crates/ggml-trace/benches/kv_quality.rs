//! What a KV cache costs a real model and what it saves: gemma-3-270m (15 of its 18
//! layers slide over a 512-token window), a prompt of ~2,000 tokens then KCM_BENCH_TOKENS
//! (default 256) generated tokens, for the plain F16 cache, plain q8_0 and q4_0 caches and
//! the mixed cache (hot window 256, cold q4_0 and cold q8_0; and cold q4_0 with the
//! sliding-window layers' cache quantized too, `--mixed-swa-type q4_0` / `q8_0`), all with
//! flash attention:
//!
//! - KV bytes: ggml's buffer sizes of the context's KV cache (`llama_memory_buffer_size`),
//!   ÷ F16.
//! - Quality: the F16 run is the reference; every other cache replays its tokens (the
//!   same computation step by step) and each decode step's output distribution is
//!   compared with the reference's: KL divergence (mean ± uncertainty, max, 99 %, as
//!   llama-perplexity defines them; `tensor_stats::kld`) and top-1 agreement. F16 replayed
//!   against itself is the sanity row (KLD exactly 0).
//! - Decode speed: tokens/s of the generation steps of each replay (logits read each
//!   step, as for every row), ÷ F16's.
//!
//! Every run decodes the prompt in ubatches of 32 tokens (`-ub 32 -b 32`): the most the
//! mixed cache takes, and a replay repeats the reference's steps exactly.
//!
//! `cargo bench -p ggml-trace --bench kv_quality` (KCM_BENCH_PROMPT_FILE: the prompt,
//! default the first 8,600 characters of docs/design.md; KCM_BENCH_THREADS, default 2;
//! KCM_BENCH_JSON=FILE: the results as JSON for `cargo xtask bench`).

use std::path::Path;
use std::time::Instant;

use ggml_trace::capture::{
    CaptureConfig, CaptureError, CaptureSink, CapturedAttention, StepOutput,
};
use ggml_trace::session::{self, Replay, RunOptions};
use tensor_stats::kld::{step_kld, KldAccumulator};
use test_support::timed::Timed;
use trace_format::StepMeta;

/// Keeps each step's tokens and output logits.
#[derive(Default)]
struct Logits {
    steps: Vec<StepMeta>,
    logits: Vec<Option<Vec<f32>>>,
}

impl CaptureSink for Logits {
    fn on_step(&mut self, step: &StepMeta) -> bool {
        self.steps.push(step.clone());
        true
    }
    fn on_attention(&mut self, _att: CapturedAttention) -> Result<(), CaptureError> {
        Ok(())
    }
    fn on_output(&mut self, out: StepOutput) -> Result<(), CaptureError> {
        let i = out.step as usize;
        if self.logits.len() <= i {
            self.logits.resize(i + 1, None);
        }
        self.logits[i] = out.logits;
        Ok(())
    }
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Row {
    name: &'static str,
    kv_bytes: u64,
    tokens_per_s: f64,
    steps: usize,
    mean_kld: f64,
    mean_kld_unc: f64,
    max_kld: f64,
    p99_kld: f64,
    same_top: f64,
    same_top_unc: f64,
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn main() {
    let load_start = load();
    let tokens: u32 = env_or("KCM_BENCH_TOKENS", 256);
    let threads: u32 = env_or("KCM_BENCH_THREADS", 2);
    let model = model_fetch::gemma3_270m(&model_fetch::default_cache_dir()).expect("gemma-3-270m");
    let prompt = match std::env::var_os("KCM_BENCH_PROMPT_FILE") {
        Some(p) => std::fs::read_to_string(&p).expect("KCM_BENCH_PROMPT_FILE"),
        None => {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
            let design = std::fs::read_to_string(root.join("docs/design.md")).expect("design.md");
            design.chars().take(8_600).collect()
        }
    };
    let common = |n: u32| -> Vec<String> {
        let mut a: Vec<String> = [
            "-m",
            &model.display().to_string(),
            "-c",
            "4096",
            "-t",
            &threads.to_string(),
            "--temp",
            "0",
            "-fa",
            "on",
            // The mixed cache decodes at most 32 tokens per ubatch; every run (and the
            // reference they replay) takes the same steps.
            "-ub",
            "32",
            "-b",
            "32",
            "-n",
            &n.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.push("-p".into());
        a.push(prompt.clone());
        a
    };
    let opts = || RunOptions {
        capture: CaptureConfig {
            from_step: 0,
            layer: None,
            trace_sources: false,
            keep: true,
            logits: true,
            kv_audit: ggml_trace::capture::DEFAULT_KV_AUDIT,
            nodes: None,
        },
        eval_callback: false,
        prefill_only: false,
        verbose: false,
    };

    // The reference: F16, sampling greedily (EOS ignored so every run has `tokens` steps).
    let mut args = common(tokens);
    args.push("--ignore-eos".into());
    let mut reference = Logits::default();
    let (info, _) = session::run(&args, opts(), &mut reference).expect("reference run");
    let replay = Replay::from_steps(&reference.steps, &info.prompt_tokens, "reference")
        .expect("replay of the reference");
    let prompt_steps = reference.steps.len() - tokens as usize;

    let caches: [(&'static str, &[&str]); 8] = [
        ("F16 (replayed against itself)", &[]),
        ("q8_0", &["-ctk", "q8_0", "-ctv", "q8_0"]),
        ("q4_0", &["-ctk", "q4_0", "-ctv", "q4_0"]),
        (
            "mixed: window 256, cold q4_0",
            &[
                "--mixed-kv-cache",
                "--mixed-hot-window",
                "256",
                "--mixed-cold-type",
                "q4_0",
            ],
        ),
        (
            "mixed: window 256, cold q8_0",
            &[
                "--mixed-kv-cache",
                "--mixed-hot-window",
                "256",
                "--mixed-cold-type",
                "q8_0",
            ],
        ),
        (
            "mixed + SWA q4_0: window 256, cold q4_0, window layers q4_0",
            &[
                "--mixed-kv-cache",
                "--mixed-hot-window",
                "256",
                "--mixed-cold-type",
                "q4_0",
                "--mixed-swa-type",
                "q4_0",
            ],
        ),
        (
            "mixed + SWA q8_0: window 256, cold q4_0, window layers q8_0",
            &[
                "--mixed-kv-cache",
                "--mixed-hot-window",
                "256",
                "--mixed-cold-type",
                "q4_0",
                "--mixed-swa-type",
                "q8_0",
            ],
        ),
        ("F16 (a second run, for the speed ratio's noise)", &[]),
    ];
    let mut rows = Vec::new();
    let mut f16_bytes = 0u64;
    for (name, extra) in caches {
        let mut args = common(tokens);
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut timed = Timed::new(Some(Logits::default()));
        let result = session::run_replay(&args, opts(), Some(&replay), &mut timed);
        let end = Instant::now();
        let (info, _) = match result {
            Ok(r) => r,
            Err(e) => {
                eprintln!("{name}: {e}");
                continue;
            }
        };
        let tps = timed.tokens_per_s(end);
        let run = timed.inner.take().expect("sink");
        if f16_bytes == 0 {
            f16_bytes = info.kv_buffer_bytes;
        }
        let mut acc = KldAccumulator::new();
        for s in prompt_steps - 1..reference.steps.len() {
            let (Some(Some(base)), Some(Some(cur))) = (reference.logits.get(s), run.logits.get(s))
            else {
                continue;
            };
            let next = reference
                .steps
                .get(s + 1)
                .and_then(|st| st.tokens.first().copied());
            acc.push(&step_kld(base, cur, next).expect("kld"));
        }
        let sum = acc.finish().expect("steps compared");
        rows.push(Row {
            name,
            kv_bytes: info.kv_buffer_bytes,
            tokens_per_s: tps,
            steps: sum.count,
            mean_kld: sum.kld.mean,
            mean_kld_unc: sum.kld.mean_uncertainty,
            max_kld: sum.kld.max,
            p99_kld: sum.kld.percentile(0.99).unwrap_or(f64::NAN),
            same_top: sum.same_top,
            same_top_unc: sum.same_top_uncertainty,
        });
    }
    let f16_tps = rows.first().map_or(f64::NAN, |r| r.tokens_per_s);
    println!(
        "gemma-3-270m Q4_K_M, -c 4096, -t {threads}, -fa on, prompt {} tokens, {tokens} replayed tokens",
        info.prompt_tokens.len()
    );
    for r in &rows {
        println!(
            "{:<62} KV {:>10} bytes ({:.3} of F16)  decode {:7.2} tokens/s ({:.3})  KLD mean {:.6} ± {:.6}  99% {:.6}  max {:.6}  same top {:.2} ± {:.2} %  ({} steps)",
            r.name,
            r.kv_bytes,
            r.kv_bytes as f64 / f16_bytes as f64,
            r.tokens_per_s,
            r.tokens_per_s / f16_tps,
            r.mean_kld,
            r.mean_kld_unc,
            r.p99_kld,
            r.max_kld,
            100.0 * r.same_top,
            100.0 * r.same_top_unc,
            r.steps
        );
    }
    if let Some(path) = std::env::var_os("KCM_BENCH_JSON") {
        let rows_json: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "cache": r.name,
                    "kv_bytes": r.kv_bytes,
                    "kv_ratio": r.kv_bytes as f64 / f16_bytes as f64,
                    "tokens_per_s": r.tokens_per_s,
                    "speed_ratio": r.tokens_per_s / f16_tps,
                    "steps": r.steps,
                    "mean_kld": r.mean_kld,
                    "mean_kld_uncertainty": r.mean_kld_unc,
                    "p99_kld": r.p99_kld,
                    "max_kld": r.max_kld,
                    "same_top": r.same_top,
                    "same_top_uncertainty": r.same_top_unc,
                })
            })
            .collect();
        let doc = serde_json::json!({
            "model": "gemma-3-270m Q4_K_M",
            "threads": threads,
            "prompt_tokens": info.prompt_tokens.len(),
            "tokens": tokens,
            "load_start": load_start,
            "load_end": load(),
            "rows": rows_json,
        });
        std::fs::write(&path, format!("{doc:#}\n")).expect("write KCM_BENCH_JSON");
    }
}
