//! Monitor overhead on real decoding: gemma-3-270m, -t 2, tokens/s of the generation
//! steps with (a) no eval callback, (b) the monitor's capture and statistics for all
//! layers, (c) the same plus `--save-gguf` (spooling), (d) the capture with the data
//! dropped, (e) every graph node traced and summarised (`--tensor-filter .`, issue 19),
//! (f) the same plus `--save-gguf`, (g) llama.cpp's own `common_debug_cb_eval` on every
//! node (`llama-eval-callback`'s printing, through common's log to stderr: run the bench
//! with `2>/dev/null`). Runs alternate so drift hits all alike; the median of each is
//! reported.
//!
//! `cargo bench -p kqv-trace-monitor --bench overhead` (KCM_BENCH_TOKENS, KCM_BENCH_RUNS
//! override the 32 tokens and 3 runs; with KCM_BENCH_JSON=FILE the medians and every run
//! are also written there as JSON, which `cargo xtask bench` reads).

use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;
use test_support::LlamaArgs;

use ggml_trace::capture::CaptureConfig;
use ggml_trace::session::{self, RunOptions};
use kcm_cli::capture_args::{Options, SaveTarget};
use kcm_cli::sink::MonitorSink;

use test_support::timed::{median, Timed};

fn main() {
    let tokens: u32 = std::env::var("KCM_BENCH_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let runs: usize = std::env::var("KCM_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let model = model_fetch::gemma3_270m(&model_fetch::default_cache_dir()).expect("gemma-3-270m");
    let dir = tempfile::tempdir().expect("tempdir");
    // KCM_BENCH_PROMPT_FILE: a long prompt (the per-step cost at long context).
    let prompt = match std::env::var_os("KCM_BENCH_PROMPT_FILE") {
        Some(p) => std::fs::read_to_string(&p).expect("KCM_BENCH_PROMPT_FILE"),
        None => "The capital of France is".to_string(),
    };
    let llama_args = LlamaArgs::new(&model, &prompt)
        .n(tokens)
        .threads(2)
        .greedy()
        .flash(true)
        .build();
    let modes = [
        "no callback",
        "monitor (all layers, stats)",
        "monitor + --save-gguf",
        "capture only (data dropped)",
        "--tensor-filter . (every node, stats)",
        "--tensor-filter . + --save-gguf",
        "llama.cpp common_debug_cb_eval",
    ];
    // KCM_BENCH_MODES=1,2 runs only those modes (for profiling one at a time).
    let only: Option<Vec<usize>> = std::env::var("KCM_BENCH_MODES")
        .ok()
        .map(|v| v.split(',').filter_map(|m| m.trim().parse().ok()).collect());
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    // Milliseconds per token inside the monitor's sink (statistics, lines, spooling).
    let mut sink_ms: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    for _ in 0..runs {
        for (m, (rate, sink_ms)) in rates.iter_mut().zip(sink_ms.iter_mut()).enumerate() {
            if only.as_ref().is_some_and(|o| !o.contains(&m)) {
                continue;
            }
            let save = dir.path().join("bench.gguf");
            let every_node = m == 4 || m == 5;
            let opts = Options {
                save: (m == 2 || m == 5).then(|| SaveTarget::Path(save.clone())),
                quiet: true,
                llama_args: llama_args.clone(),
                tensor_filter: if every_node {
                    vec![".".to_string()]
                } else {
                    Vec::new()
                },
                ..Options::default()
            };
            let inner = (m == 1 || m == 2 || every_node).then(|| {
                MonitorSink::new(
                    &opts,
                    Box::new(io::sink()),
                    Arc::new(AtomicBool::new(false)),
                )
                .expect("sink")
            });
            let mut timed = Timed::new(inner);
            let run_opts = RunOptions {
                capture: CaptureConfig {
                    from_step: 0,
                    layer: None,
                    trace_sources: true,
                    keep: true,
                    logits: false,
                    kv_audit: ggml_trace::capture::DEFAULT_KV_AUDIT,
                    nodes: opts.node_filter(),
                },
                prefill_only: false,
                // llama.cpp's callback prints through common's log: shown only verbose.
                verbose: m == 6,
                eval_callback: m > 0,
            };
            let (info, outcome) = if m == 6 {
                session::run_llama_debug(&llama_args, run_opts, &mut timed)
            } else {
                session::run(&llama_args, run_opts, &mut timed)
            }
            .expect("run");
            rate.push(timed.tokens_per_s(Instant::now()));
            if timed.inner.is_some() {
                sink_ms.push(timed.sink_ms_per_token());
            }
            if let Some(sink) = timed.inner.take() {
                sink.finish(&info, &outcome).expect("finish");
            }
        }
    }
    let base = if rates[0].is_empty() {
        f64::NAN
    } else {
        median(&rates[0])
    };
    println!("gemma-3-270m Q4_K_M, -t 2, -fa on, {tokens} generated tokens, median of {runs} runs");
    let mut json_modes = Vec::new();
    for (m, name) in modes.iter().enumerate() {
        if rates[m].is_empty() {
            continue;
        }
        let r = median(&rates[m]);
        let sink = (!sink_ms[m].is_empty()).then(|| median(&sink_ms[m]));
        json_modes.push(serde_json::json!({
            "mode": name,
            "tokens_per_s": r,
            "ratio": r / base,
            "runs": rates[m],
            "sink_ms_per_token": sink,
        }));
        let sink = sink.map_or(String::new(), |s| format!("   sink {s:.3} ms/token"));
        println!(
            "{name:<30} {r:8.2} tokens/s   ratio {:.3}{sink}   runs {:?}",
            r / base,
            rates[m]
                .iter()
                .map(|x| (x * 100.0).round() / 100.0)
                .collect::<Vec<_>>()
        );
    }
    if let Some(path) = std::env::var_os("KCM_BENCH_JSON") {
        let doc = serde_json::json!({
            "model": "gemma-3-270m Q4_K_M",
            "threads": 2,
            "flash_attn": "on",
            "tokens": tokens,
            "runs": runs,
            "modes": json_modes,
        });
        std::fs::write(&path, format!("{doc:#}\n")).expect("write KCM_BENCH_JSON");
    }
}
