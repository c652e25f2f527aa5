//! The mixed KV cache (`--mixed-kv-cache`) against llama.cpp's plain F16 cache with flash
//! attention, side by side in one run, on tiny-llama's `larger()` model (8 layers,
//! n_embd 1024, 16 heads over 4 KV heads, head_dim 64, F32 weights):
//!
//! - KV bytes: ggml's buffer sizes of the context's KV cache (`llama_memory_buffer_size`)
//!   at `-c 4096`, mixed (window 256, cold q4_0) ÷ plain F16. Goal <= 0.35.
//! - Decode speed: a prompt of 2,048 tokens, then KCM_BENCH_TOKENS (default 32) greedy
//!   tokens; tokens/s of the generation steps, mixed ÷ plain. Goal >= 0.9.
//! - Decode speed at long context (issue 21): the same with a prompt of KCM_BENCH_LONG
//!   tokens (default 8,192; 0 skips it) at `-c 16384` (twice the prompt, rounded up to a
//!   power of two, for other lengths). Goal: mixed ÷ plain >= 1.0 at 8k.
//!
//! Runs alternate between the two caches (KCM_BENCH_RUNS, default 3) so that machine
//! load hits both alike; the median and the best run of each are reported (on a shared
//! machine the best run is the least disturbed one).
//!
//! `cargo bench -p ggml-trace --bench mixed_kv` (-t 2; KCM_BENCH_THREADS overrides; with
//! KCM_BENCH_JSON=FILE the results are also written there as JSON for `cargo xtask bench`).

use std::time::Instant;

use ggml_trace::capture::{CaptureConfig, CaptureError, CaptureSink, CapturedAttention};
use ggml_trace::session::{self, RunOptions};

use test_support::timed::{median, Timed};

/// No sink: the runs are timed without an eval callback.
struct Discard;

impl CaptureSink for Discard {
    fn on_attention(&mut self, _att: CapturedAttention) -> Result<(), CaptureError> {
        Ok(())
    }
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Names of the two caches, in the order of [`Measured`]'s vectors.
const MODES: [&str; 2] = [
    "plain F16 cache, flash attention",
    "mixed: window 256, cold q4_0",
];

/// Decode rates (tokens/s per run) and KV bytes of the two caches at one prompt length.
struct Measured {
    rates: Vec<Vec<f64>>,
    bytes: Vec<u64>,
    prompt_len: usize,
}

/// Runs alternating between the plain F16 cache and the mixed cache: a prompt of
/// `prompt` tokens (BOS, "▁" and byte tokens) at `-c ctx`, then `tokens` greedy tokens.
fn measure(
    model: &std::path::Path,
    prompt: usize,
    ctx: usize,
    tokens: u32,
    runs: usize,
    threads: u32,
) -> Measured {
    // BOS, "▁" and prompt - 2 byte tokens.
    let text: String = "The quick brown fox jumps over a lazy dog. "
        .chars()
        .cycle()
        .take(prompt - 2)
        .collect();
    let base: Vec<String> = [
        "-m",
        &model.display().to_string(),
        "-p",
        &text,
        "-n",
        &tokens.to_string(),
        "-c",
        &ctx.to_string(),
        "-t",
        &threads.to_string(),
        "--temp",
        "0",
        "-fa",
        "on",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut mixed = base.clone();
    mixed.extend(
        [
            "--mixed-kv-cache",
            "--mixed-hot-window",
            "256",
            "--mixed-cold-type",
            "q4_0",
        ]
        .map(String::from),
    );
    let modes = [base, mixed];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut bytes = vec![0u64; modes.len()];
    let mut prompt_len = 0;
    for _ in 0..runs {
        for (m, args) in modes.iter().enumerate() {
            let mut timed = Timed::<Discard>::new(None);
            let opts = RunOptions {
                capture: CaptureConfig {
                    from_step: 0,
                    layer: None,
                    trace_sources: false,
                    keep: true,
                    logits: false,
                    kv_audit: ggml_trace::capture::DEFAULT_KV_AUDIT,
                    nodes: None,
                },
                eval_callback: false,
                prefill_only: false,
                verbose: false,
            };
            let (info, _) = session::run(args, opts, &mut timed).expect("run");
            rates[m].push(timed.tokens_per_s(Instant::now()));
            bytes[m] = info.kv_buffer_bytes;
            prompt_len = info.prompt_tokens.len();
        }
    }
    Measured {
        rates,
        bytes,
        prompt_len,
    }
}

/// Prints one prompt length's table and returns its modes as JSON (ratios ÷ plain F16).
fn report(m: &Measured, ctx: usize, tokens: u32, runs: usize, threads: u32) -> serde_json::Value {
    let best = |v: &[f64]| v.iter().copied().fold(f64::NAN, f64::max);
    let (rates, bytes) = (&m.rates, &m.bytes);
    println!(
        "tiny-llama larger() (8 layers, n_embd 1024, 16/4 heads, head_dim 64), -c {ctx}, -t {threads}, \
         prompt {} tokens, {tokens} generated, median of {runs} runs",
        m.prompt_len
    );
    let (r0, b0, best0) = (median(&rates[0]), bytes[0] as f64, best(&rates[0]));
    for (i, name) in MODES.iter().enumerate() {
        let r = median(&rates[i]);
        println!(
            "{name:<34} KV {:>10} bytes ({:.1} MiB)  ratio {:.4}   decode median {r:7.2} tokens/s  ratio {:.3}   best {:7.2}  ratio {:.3}   runs {:?}",
            bytes[i],
            bytes[i] as f64 / (1024.0 * 1024.0),
            bytes[i] as f64 / b0,
            r / r0,
            best(&rates[i]),
            best(&rates[i]) / best0,
            rates[i].iter().map(|x| (x * 100.0).round() / 100.0).collect::<Vec<_>>()
        );
    }
    let modes: Vec<serde_json::Value> = MODES
        .iter()
        .enumerate()
        .map(|(i, name)| {
            serde_json::json!({
                "mode": name,
                "kv_bytes": bytes[i],
                "kv_ratio": bytes[i] as f64 / b0,
                "median_tokens_per_s": median(&rates[i]),
                "median_ratio": median(&rates[i]) / r0,
                "best_tokens_per_s": best(&rates[i]),
                "best_ratio": best(&rates[i]) / best0,
                "runs": rates[i],
            })
        })
        .collect();
    serde_json::Value::Array(modes)
}

fn main() {
    let tokens: u32 = env_or("KCM_BENCH_TOKENS", 32);
    let runs: usize = env_or("KCM_BENCH_RUNS", 3);
    let threads: u32 = env_or("KCM_BENCH_THREADS", 2);
    let long: usize = env_or("KCM_BENCH_LONG", 8192);
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("tiny-llama-larger.gguf");
    let cfg = tiny_llama::TinyLlamaConfig::larger();
    tiny_llama::write_model(&model, &cfg).expect("write model");

    let short = measure(&model, 2048, 4096, tokens, runs, threads);
    let modes_json = report(&short, 4096, tokens, runs, threads);
    let long_json = if long > 2 {
        let ctx = (2 * long).next_power_of_two();
        let m = measure(&model, long, ctx, tokens, runs, threads);
        let modes = report(&m, ctx, tokens, runs, threads);
        serde_json::json!({ "ctx": ctx, "prompt_tokens": m.prompt_len, "modes": modes })
    } else {
        serde_json::Value::Null
    };
    if let Some(path) = std::env::var_os("KCM_BENCH_JSON") {
        let doc = serde_json::json!({
            "threads": threads,
            "prompt_tokens": short.prompt_len,
            "tokens": tokens,
            "runs": runs,
            "modes": modes_json,
            "long": long_json,
        });
        let doc = format!("{doc}\n");
        std::fs::write(&path, doc).expect("write KCM_BENCH_JSON");
    }
}
