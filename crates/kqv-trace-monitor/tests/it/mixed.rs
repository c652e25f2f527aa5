//! The mixed KV cache end to end (`--mixed-kv-cache`, vendor/patches/0001-0004) on the
//! generated tiny LLaMA: a hot window smaller than the prompt, so chunks of tokens move
//! to the quantized cold store during the prompt and during generation; every traced
//! (step, layer) holds the six inputs of the mixed node and verifies against the f64
//! recomputation; the KV buffers' size comes from ggml's buffer sizes; unsupported setups
//! fail at start with a clear message. On gemma-3-270m (sliding-window layers) at about
//! 2,000 tokens, the full-attention layers are mixed and every group verifies, with the
//! window layers' cache F16 or quantized (`--mixed-swa-type q4_0`); the KV bytes of F16,
//! mixed and mixed + quantized window layers are exact; `--mixed-swa-type` is refused in one
//! line where it cannot apply.

use std::path::{Path, PathBuf};
use std::process::Command;
use test_support::storage::KvStorage;
use test_support::LlamaArgs;

use attn_verify::verify_group;
use ggml_trace::capture::{CaptureConfig, CaptureError, CaptureSink, CapturedAttention};
use ggml_trace::session::{self, RunOptions};
use gguf_io::GgmlType;
use trace_format::MIXED_ATTN_OP;
use trace_format::{Role, TraceFile};

const BIN: &str = env!("CARGO_BIN_EXE_kqv-trace-monitor");
/// 130 tokens (nine ubatches of 16): longer than the hot store (window + 2 chunks = 80).
const PROMPT: &str = "The quick brown fox jumps over a lazy dog. The quick brown fox jumps over a lazy dog. The quick brown fox jumps over a lazy dog.";
const WINDOW: u32 = 16;
/// LLAMA_MIXED_KV_CHUNK in the patched llama.h.
const CHUNK: u32 = 32;
const N_GEN: usize = 40;

/// head_dim 32: quantized rows need whole 32-value blocks.
fn model(dir: &Path) -> (PathBuf, tiny_llama::TinyLlamaConfig) {
    let path = dir.join("tiny-hd32.gguf");
    let cfg = tiny_llama::TinyLlamaConfig {
        head_dim: 32,
        n_embd: 128,
        ..Default::default()
    };
    tiny_llama::write_model(&path, &cfg).unwrap();
    (path, cfg)
}

fn base_args(model: &Path) -> Vec<String> {
    LlamaArgs::new(model, PROMPT)
        .n(N_GEN as u32)
        .ubatch(16)
        .threads(2)
        .greedy()
        .build()
}

fn trace(model: &Path, out: &Path, extra: &[&str]) -> TraceFile {
    crate::common::trace_with(base_args(model), out, extra)
}

/// The run traced in both storages (full, delta).
fn traces(model: &Path, out: &Path, extra: &[&str]) -> Vec<(KvStorage, TraceFile)> {
    crate::common::trace_both(base_args(model), out, extra)
}

fn mixed_args() -> [&'static str; 5] {
    mixed_args_with("q4_0")
}

fn mixed_args_with(cold: &'static str) -> [&'static str; 5] {
    [
        "--mixed-kv-cache",
        "--mixed-hot-window",
        "16",
        "--mixed-cold-type",
        cold,
    ]
}

#[test]
fn chunks_move_during_prompt_and_generation_and_every_group_verifies() {
    if ggml_trace::skip_without_mixed_kv(
        "chunks_move_during_prompt_and_generation_and_every_group_verifies",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (m, cfg) = model(dir.path());
    for (storage, t) in traces(&m, &dir.path().join("mixed.gguf"), &mixed_args()) {
        eprintln!("storage {}", storage.name());
        assert!(t.run.mixed_kv_cache);
        assert!(!t.run.kv_rotation, "the mixed cache does not rotate");
        let n_prompt = t.run.prompt_tokens.len();
        assert!(
            n_prompt > (WINDOW + 2 * CHUNK) as usize,
            "{n_prompt} prompt tokens"
        );
        let n_prompt_steps = n_prompt.div_ceil(16);
        assert_eq!(t.steps.len(), n_prompt_steps + N_GEN, "steps");
        assert_eq!(t.groups().len(), t.steps.len() * cfg.n_layer);

        let hd = cfg.head_dim as u64;
        let hkv = cfg.n_head_kv as u64;
        let mut cold_rows = Vec::new();
        for (i, step) in t.steps.iter().enumerate() {
            let s = step.step;
            for layer in 0..cfg.n_layer as i32 {
                let a = t.attn(s, layer).unwrap();
                assert_eq!(a.op, MIXED_ATTN_OP);
                let get = |r| {
                    t.find(r, layer, s)
                        .unwrap_or_else(|| panic!("step {s} layer {layer}: no {r}"))
                };
                let (q, k, v, kq, vq, mask) = (
                    get(Role::Q),
                    get(Role::K),
                    get(Role::V),
                    get(Role::KQuant),
                    get(Role::VQuant),
                    get(Role::Mask),
                );
                let n_tok = step.positions.len() as u64;
                assert_eq!(q.meta.layout.ne, [hd, n_tok, cfg.n_head as u64, 1]);
                assert_eq!(k.meta.layout.ty, GgmlType::F16);
                assert_eq!(v.meta.layout.ty, GgmlType::F16);
                assert_eq!(kq.meta.layout.ty, GgmlType::Q4_0);
                assert_eq!(vq.meta.layout.ty, GgmlType::Q4_0);
                // permuted views: [hd, n, hkv] over memory ordered [hd, hkv, n]
                for x in [k, v, kq, vq] {
                    assert_eq!(x.meta.layout.ne[0], hd);
                    assert_eq!(x.meta.layout.ne[2], hkv);
                    if x.meta.layout.ne[1] > 1 {
                        assert!(x.meta.layout.is_permuted(), "{:?}", x.meta.layout);
                    }
                }
                assert!(
                    kq.meta.view_of.starts_with("cache_k_cold_l"),
                    "{}",
                    kq.meta.view_of
                );
                let (n_hot, n_cold) = (k.meta.layout.ne[1], kq.meta.layout.ne[1]);
                assert_eq!(vq.meta.layout.ne[1], n_cold);
                assert_eq!(
                    mask.meta.layout.ne[0],
                    n_cold + n_hot,
                    "mask covers cold then hot"
                );
                // every position seen so far is in exactly one store: count unmasked cells of
                // the step's last token (causal: it sees every earlier token and itself)
                let mvals = t.f32(mask).unwrap();
                let last = (n_tok - 1) as usize * (n_cold + n_hot) as usize;
                let visible = mvals[last..last + (n_cold + n_hot) as usize]
                    .iter()
                    .filter(|x| x.is_finite())
                    .count();
                let last_pos = *step.positions.last().unwrap() as usize;
                assert_eq!(visible, last_pos + 1, "step {s} layer {layer}");
                if layer == 0 {
                    cold_rows.push((i, n_cold));
                }
            }
        }
        // chunks moved during the prompt and during generation, in whole chunks
        let cold_at = |i: usize| cold_rows[i].1;
        assert_eq!(cold_at(0), 0);
        assert!(
            cold_at(n_prompt_steps - 1) > 0,
            "no chunk moved during the prompt"
        );
        assert!(
            cold_at(t.steps.len() - 1) > cold_at(n_prompt_steps),
            "no chunk moved during generation: {cold_rows:?}"
        );
        assert!(cold_rows.iter().all(|&(_, c)| c % u64::from(CHUNK) == 0));

        let mut worst = 0.0f64;
        for &(step, layer) in t.groups().keys() {
            let v = verify_group(&t, step, layer)
                .unwrap()
                .into_result()
                .unwrap_or_else(|m| panic!("step {step} layer {layer} misses {:?}", m.0));
            assert!(v.cosine > 0.999, "{v:?}");
            worst = worst.max(v.nmse);
        }
        eprintln!(
        "mixed q4_0 window {WINDOW}: {} groups verify, worst NMSE {worst:.3e}; cold rows per step {:?}",
        t.groups().len(),
        cold_rows.iter().map(|&(_, c)| c).collect::<Vec<_>>()
    );
        assert!(worst <= 1e-6, "worst NMSE {worst:e}");
    }
}

/// kqv_out of the mixed run against a plain F16 cache with flash attention, per layer, over
/// the steps whose tokens are the same in both runs (all prompt steps, then generated
/// tokens until greedy sampling picks a different token). The steps before the first chunk
/// moves differ only by flash attention's own F16 rounding.
#[test]
fn mixed_versus_f16_cache_per_layer() {
    if ggml_trace::skip_without_mixed_kv("mixed_versus_f16_cache_per_layer") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (m, cfg) = model(dir.path());
    let f16 = trace(&m, &dir.path().join("f16.gguf"), &["-fa", "on"]);
    let n_prompt_steps = f16.run.prompt_tokens.len().div_ceil(16);
    for (cold, min_cosine) in [("q4_0", 0.98), ("q8_0", 0.9999)] {
        let mixed = trace(
            &m,
            &dir.path().join(format!("mixed-{cold}.gguf")),
            &mixed_args_with(cold),
        );
        per_layer_table(&mixed, &f16, cfg.n_layer, n_prompt_steps, cold, min_cosine);
    }
}

fn per_layer_table(
    mixed: &TraceFile,
    f16: &TraceFile,
    n_layer: usize,
    n_prompt_steps: usize,
    cold: &str,
    min_cosine: f64,
) {
    eprintln!("cold {cold}, window {WINDOW}: layer | steps | steps with cold rows | worst NMSE | mean NMSE | min cosine | worst NMSE without cold rows");
    for layer in 0..n_layer as i32 {
        let (mut n, mut n_cold_steps, mut worst, mut sum, mut min_cos, mut worst_hot) =
            (0usize, 0usize, 0f64, 0f64, 1f64, 0f64);
        for (sm, sf) in mixed.steps.iter().zip(&f16.steps) {
            if sm.tokens != sf.tokens {
                break; // generation diverged: later steps see different tokens
            }
            let a = mixed.find(Role::KqvOut, layer, sm.step).unwrap();
            let b = f16.find(Role::KqvOut, layer, sf.step).unwrap();
            let (va, vb) = (mixed.f32(a).unwrap(), f16.f32(b).unwrap());
            assert_eq!(va.len(), vb.len());
            let nn = vb.len() as f64;
            let mean = vb.iter().map(|&x| f64::from(x)).sum::<f64>() / nn;
            let var = vb
                .iter()
                .map(|&x| (f64::from(x) - mean).powi(2))
                .sum::<f64>()
                / nn;
            let mse = va
                .iter()
                .zip(&vb)
                .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
                .sum::<f64>()
                / nn;
            let dot: f64 = va
                .iter()
                .zip(&vb)
                .map(|(&x, &y)| f64::from(x) * f64::from(y))
                .sum();
            let na: f64 = va.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
            let nb: f64 = vb.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
            let nmse = mse / var;
            let cos = dot / (na * nb);
            let n_cold = mixed
                .find(Role::KQuant, layer, sm.step)
                .unwrap()
                .meta
                .layout
                .ne[1];
            if n_cold > 0 {
                n_cold_steps += 1;
            } else {
                worst_hot = worst_hot.max(nmse);
            }
            n += 1;
            worst = worst.max(nmse);
            sum += nmse;
            min_cos = min_cos.min(cos);
        }
        eprintln!(
            "{layer} | {n} | {n_cold_steps} | {worst:.3e} | {:.3e} | {min_cos:.6} | {worst_hot:.3e}",
            sum / n.max(1) as f64
        );
        assert!(n >= n_prompt_steps, "the prompt steps differ ({n} steps)");
        assert!(n_cold_steps > 0);
        // no cold rows yet: the same F16 numbers, up to flash attention's F16 accumulation
        assert!(worst_hot <= 2e-6, "layer {layer}: {worst_hot:e}");
        assert!(
            min_cos > min_cosine,
            "{cold} layer {layer}: cosine {min_cos}"
        );
    }
}

struct Nothing;

impl CaptureSink for Nothing {
    fn on_attention(&mut self, _att: CapturedAttention) -> Result<(), CaptureError> {
        Ok(())
    }
}

/// Runs llama.cpp through the session (no tracing) and returns the KV buffer bytes.
fn kv_bytes(args: &[String]) -> u64 {
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
        prefill_only: true,
        verbose: false,
    };
    let (info, _) = session::run(args, opts, &mut Nothing).unwrap();
    info.kv_buffer_bytes
}

#[test]
fn kv_buffers_hold_the_window_plus_the_quantized_rest() {
    if ggml_trace::skip_without_mixed_kv("kv_buffers_hold_the_window_plus_the_quantized_rest") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (m, cfg) = model(dir.path());
    let n_ctx: u64 = 1024;
    let ctx = ["-c", "1024"];
    let mut plain = base_args(&m);
    plain.extend(["-fa", "on"].iter().chain(&ctx).map(|s| s.to_string()));
    let mut mixed = base_args(&m);
    mixed.extend(mixed_args().iter().chain(&ctx).map(|s| s.to_string()));
    let (b_plain, b_mixed) = (kv_bytes(&plain), kv_bytes(&mixed));

    let (n_layer, n_kv) = (cfg.n_layer as u64, (cfg.n_head_kv * cfg.head_dim) as u64);
    let f16_row = 2 * n_kv;
    let q4_row = GgmlType::Q4_0.bytes_for(n_kv).unwrap();
    let hot = u64::from(WINDOW + 2 * CHUNK);
    let cold = n_ctx - u64::from(WINDOW);
    let expect_plain = 2 * n_layer * n_ctx * f16_row;
    let expect_mixed = 2 * n_layer * (hot * f16_row + cold * q4_row);
    eprintln!(
        "KV bytes at n_ctx {n_ctx}: plain F16 {b_plain} (expected {expect_plain}), mixed q4_0 window {WINDOW} {b_mixed} (expected {expect_mixed}), ratio {:.4}",
        b_mixed as f64 / b_plain as f64
    );
    // ggml pads each tensor to the buffer's alignment (at most 64 bytes per tensor here)
    let slack = 4 * n_layer * 64;
    assert!(b_plain >= expect_plain && b_plain <= expect_plain + slack);
    assert!(b_mixed >= expect_mixed && b_mixed <= expect_mixed + slack);
    assert!((b_mixed as f64) < 0.4 * b_plain as f64);
}

fn expect_failure(args: &[String], needle: &str) {
    let o = Command::new(BIN).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{args:?} succeeded");
    assert!(
        err.contains(needle),
        "{args:?}: stderr lacks {needle:?}:\n{err}"
    );
}

#[test]
fn unsupported_setups_fail_at_start_with_a_clear_message() {
    if ggml_trace::skip_without_mixed_kv("unsupported_setups_fail_at_start_with_a_clear_message") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (m, _) = model(dir.path());
    let with = |extra: &[&str]| {
        let mut a = base_args(&m);
        a.extend(mixed_args().iter().chain(extra).map(|s| s.to_string()));
        a.push("-v".into());
        a
    };
    expect_failure(
        &with(&["-ctk", "q8_0"]),
        "mixed KV cache: the hot store is F16",
    );
    expect_failure(&with(&["-np", "2"]), "mixed KV cache: only one sequence");
    let mut bad_type = base_args(&m);
    bad_type.extend(["--mixed-kv-cache", "--mixed-cold-type", "q2_K"].map(String::from));
    expect_failure(&bad_type, "--mixed-cold-type");
    // a head size that is not a multiple of the block size (tiny default: 16)
    let small = dir.path().join("tiny-hd16.gguf");
    tiny_llama::write_model(&small, &tiny_llama::TinyLlamaConfig::default()).unwrap();
    let mut a = base_args(&small);
    a.extend(mixed_args().iter().map(|s| s.to_string()));
    a.push("-v".into());
    expect_failure(&a, "is not a multiple of the q4_0 block size");
}

/// gemma-3-270m at `-c 4096 -ub 32` (the kv_quality bench's setup), KV bytes as llama.cpp
/// accounts them (`llama_memory_buffer_size`), exact: F16; the mixed cache (window 256,
/// cold q4_0) on the three full-attention layers, the 15 window layers F16; and the same
/// with the window layers' cache q4_0 / q8_0 (`--mixed-swa-type`). Each layer holds one KV
/// head of 256 values; a window layer's cache has 768 cells (512 + one ubatch of 32, padded
/// to 256); a full-attention layer's hot store 256 + 2 chunks of 32 cells, its cold store
/// 4096 - 256 rows.
#[test]
fn gemma3_kv_bytes_with_the_window_layers_quantized() {
    if ggml_trace::skip_without_mixed_kv("gemma3_kv_bytes_with_the_window_layers_quantized") {
        return;
    }
    let model =
        model_fetch::gemma3_270m(&model_fetch::default_cache_dir()).expect("fetch gemma-3-270m");
    let args = |extra: &[&str]| {
        LlamaArgs::new(&model, "The quick brown fox")
            .ctx(4096)
            .ubatch(32)
            .threads(2)
            .greedy()
            .flash(true)
            .args(extra.iter().copied())
            .build()
    };
    let f16 = kv_bytes(&args(&[]));
    let mixed = kv_bytes(&args(&["--mixed-kv-cache"]));
    let swa_q4 = kv_bytes(&args(&["--mixed-kv-cache", "--mixed-swa-type", "q4_0"]));
    let swa_q8 = kv_bytes(&args(&["--mixed-kv-cache", "--mixed-swa-type", "q8_0"]));

    // K and V of one cell of one layer (one KV head of 256 values).
    let cell = |t: GgmlType| 2 * t.bytes_for(256).unwrap();
    let (full, window) = (3u64, 15u64);
    let (n_ctx, swa_cells, hot, cold) = (4096u64, 768u64, 256 + 2 * u64::from(CHUNK), 4096 - 256);
    let mixed_full = full * (hot * cell(GgmlType::F16) + cold * cell(GgmlType::Q4_0));
    let expect = [
        full * n_ctx * cell(GgmlType::F16) + window * swa_cells * cell(GgmlType::F16),
        mixed_full + window * swa_cells * cell(GgmlType::F16),
        mixed_full + window * swa_cells * cell(GgmlType::Q4_0),
        mixed_full + window * swa_cells * cell(GgmlType::Q8_0),
    ];
    let got = [f16, mixed, swa_q4, swa_q8];
    eprintln!(
        "gemma-3-270m KV bytes at -c 4096: F16 {f16}, mixed {mixed} ({:.4}), mixed + SWA q4_0 {swa_q4} ({:.4}), mixed + SWA q8_0 {swa_q8} ({:.4})",
        mixed as f64 / f16 as f64,
        swa_q4 as f64 / f16 as f64,
        swa_q8 as f64 / f16 as f64
    );
    assert_eq!(got, expect);
    // The figures docs/performance-kv-caches.md and the issue quote.
    assert_eq!(got, [24_379_392, 16_097_280, 7_618_560, 10_567_680]);
    assert!((swa_q4 as f64) <= 0.4 * f16 as f64);
}

/// `--mixed-swa-type` where it cannot apply: one line, exit 2, before any decode.
#[test]
fn mixed_swa_type_is_refused_where_it_cannot_apply() {
    if ggml_trace::skip_without_mixed_kv("mixed_swa_type_is_refused_where_it_cannot_apply") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (m, _) = model(dir.path());
    let refused = |extra: &[&str], env: Option<&str>, needle: &str| {
        let mut a = base_args(&m);
        a.extend(extra.iter().map(|s| s.to_string()));
        let mut cmd = Command::new(BIN);
        cmd.args(&a).env_remove("LLAMA_ARG_MIXED_SWA_TYPE");
        if let Some(v) = env {
            cmd.env("LLAMA_ARG_MIXED_SWA_TYPE", v);
        }
        let o = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{extra:?}: one line: {err}"
        );
        assert!(err.contains(needle), "{extra:?}: {needle:?} not in {err}");
        assert!(o.stdout.is_empty(), "{extra:?}: nothing on stdout");
    };
    // Quantized window layers need flash attention (a quantized V).
    refused(
        &["--mixed-kv-cache", "--mixed-swa-type", "q4_0", "-fa", "off"],
        None,
        "--mixed-swa-type q4_0 quantizes the sliding-window layers' V cache, which llama.cpp attends to with flash attention only",
    );
    // Only with the mixed KV cache, also from the environment.
    refused(
        &["--mixed-swa-type", "q8_0"],
        None,
        "--mixed-swa-type q8_0 sets the sliding-window layers' cache of the mixed KV cache: add --mixed-kv-cache",
    );
    refused(
        &[],
        Some("q4_0"),
        "--mixed-swa-type q4_0 sets the sliding-window layers' cache of the mixed KV cache",
    );
    // The tiny LLaMA has no sliding-window layers.
    refused(
        &[
            "--mixed-kv-cache",
            "--mixed-hot-window",
            "16",
            "--mixed-swa-type",
            "q4_0",
        ],
        None,
        "--mixed-swa-type q4_0: architecture 'llama' has no sliding-window layers",
    );
    // Not a type it takes: llama.cpp's parser names the option.
    let mut bad = base_args(&m);
    bad.extend(["--mixed-kv-cache", "--mixed-swa-type", "q2_K"].map(String::from));
    let o = Command::new(BIN).args(&bad).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("invalid --mixed-swa-type: q2_K"));
}

/// gemma-3-270m (iSWA: layers 5, 11 and 17 attend to everything, the other 15 to a
/// 512-token window) with `--mixed-kv-cache` (window 256, cold q4_0) at about 2,000
/// tokens: the three full-attention layers run the mixed node over their cold and hot
/// stores, the window layers keep llama.cpp's cache and flash attention; every token is in
/// exactly one store; every group verifies live (`--verify`), from the file (each within
/// its documented bound) and with `gguf-reader --verify-attention`.
#[test]
fn gemma3_at_2k_tokens_mixes_its_full_attention_layers_and_every_group_verifies() {
    if ggml_trace::skip_without_mixed_kv(
        "gemma3_at_2k_tokens_mixes_its_full_attention_layers_and_every_group_verifies",
    ) {
        return;
    }
    gemma3_mixed_2k(None);
}

/// The same with the window layers' cache quantized (`--mixed-swa-type q4_0`): their K and
/// V are q4_0 (rotated by llama.cpp, as a plain q4_0 cache), the trace records the type
/// (`kqv_trace.run.mixed_swa_type`), and every group still verifies.
#[test]
fn gemma3_at_2k_tokens_with_q4_0_window_layers_every_group_verifies() {
    if ggml_trace::skip_without_mixed_kv(
        "gemma3_at_2k_tokens_with_q4_0_window_layers_every_group_verifies",
    ) {
        return;
    }
    gemma3_mixed_2k(Some(GgmlType::Q4_0));
}

/// gemma-3-270m with the mixed KV cache at about 2,000 tokens, the window layers' cache
/// at `-ctk`/`-ctv` (F16) or at `swa` (`--mixed-swa-type`): see the tests above.
fn gemma3_mixed_2k(swa: Option<GgmlType>) {
    const FULL: [i32; 3] = [5, 11, 17];
    let model =
        model_fetch::gemma3_270m(&model_fetch::default_cache_dir()).expect("fetch gemma-3-270m");
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let out = dir.path().join("gemma-mixed-2k.gguf");
    let mut args = LlamaArgs::new(&model, &crate::long_context::docs_prompt())
        .n(16)
        .threads(2)
        .greedy()
        .args(["--mixed-kv-cache", "--verify", "--quiet", "--save-gguf"])
        .arg(out.to_str().unwrap());
    if let Some(t) = swa {
        args = args.args(["--mixed-swa-type", t.name()]);
    }
    let args = args.build();
    let started = std::time::Instant::now();
    let o = Command::new(BIN).args(&args).output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&o.stderr)
    );
    let t = TraceFile::open(&out).unwrap();
    assert!(t.run.mixed_kv_cache);
    assert_eq!(
        t.run.mixed_swa_type,
        swa.map(|t| t.name().to_string()).unwrap_or_default()
    );
    let n_layer = t.run.n_layer as i32;
    assert_eq!(n_layer, 18);
    let last = t.steps.last().unwrap().clone();
    let last_pos = *last.positions.last().unwrap() as u64;
    assert!(
        last_pos >= 1500,
        "about 2,000 tokens: last position {last_pos}"
    );
    let n = t.groups().len();
    assert_eq!(n, t.steps.len() * n_layer as usize);
    assert!(
        stdout.contains(&format!(
            "verify: verified {n} of {n} (step, layer) groups: 0 failed, 0 missing inputs"
        )),
        "{stdout}"
    );
    for layer in 0..n_layer {
        let a = t.attn(last.step, layer).unwrap();
        if FULL.contains(&layer) {
            assert_eq!(a.op, MIXED_ATTN_OP, "layer {layer}");
            let (kq, k, mask) = (
                t.find(Role::KQuant, layer, last.step).unwrap(),
                t.find(Role::K, layer, last.step).unwrap(),
                t.find(Role::Mask, layer, last.step).unwrap(),
            );
            assert_eq!(kq.meta.layout.ty, GgmlType::Q4_0);
            let (n_cold, n_hot) = (kq.meta.layout.ne[1], k.meta.layout.ne[1]);
            assert!(
                n_cold > 1000 && n_cold % u64::from(CHUNK) == 0,
                "layer {layer}: {n_cold} cold rows"
            );
            assert!(
                n_hot <= 256 + 2 * u64::from(CHUNK),
                "layer {layer}: {n_hot} hot cells"
            );
            let m = t.f32(mask).unwrap();
            let visible = m[..(n_cold + n_hot) as usize]
                .iter()
                .filter(|x| x.is_finite())
                .count();
            assert_eq!(
                visible as u64,
                last_pos + 1,
                "layer {layer}: every position once"
            );
        } else {
            assert_eq!(a.op, "FLASH_ATTN_EXT", "layer {layer}");
            assert!(
                t.find(Role::KQuant, layer, last.step).is_none(),
                "layer {layer}"
            );
            // The window layers' cache: F16 (-ctk/-ctv) or --mixed-swa-type's.
            let want = swa.unwrap_or(GgmlType::F16);
            for role in [Role::K, Role::V] {
                let x = t.find(role, layer, last.step).unwrap();
                assert_eq!(x.meta.layout.ty, want, "layer {layer} {role:?}");
            }
        }
    }
    let mut worst = (0f64, 0f64);
    for &(step, layer) in t.groups().keys() {
        let c = attn_verify::check_in_trace(&t, step, layer)
            .unwrap()
            .into_result()
            .unwrap_or_else(|m| panic!("step {step} layer {layer} misses {:?}", m.0));
        assert!(
            c.pass && c.findings.is_empty(),
            "step {step} layer {layer}: NMSE {:e} (bound {:e}): {:#?}",
            c.verification.nmse,
            c.bound,
            c.findings
        );
        let w = if FULL.contains(&layer) {
            &mut worst.0
        } else {
            &mut worst.1
        };
        *w = w.max(c.verification.nmse);
    }
    drop(t);
    let v = Command::new(test_support::workspace_bin("gguf-reader", "gguf-reader"))
        .arg(&out)
        .arg("--verify-attention")
        .output()
        .unwrap();
    assert!(
        v.status.success(),
        "gguf-reader --verify-attention: {:?}\n{}{}",
        v.status,
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    eprintln!(
        "gemma-3-270m mixed q4_0 window 256, window layers {}: {n} groups to position {last_pos} verify; worst NMSE mixed layers {:.3e}, window layers {:.3e} ({:.0} s)",
        swa.map_or("F16", |t| t.name()),
        worst.0,
        worst.1,
        started.elapsed().as_secs_f64()
    );
}

/// The seed's bug, on the cold store: its permuted view `[D, n_cold, H_kv]` lies in memory
/// as `[D, H_kv, n_cold]`; reading those bytes as if contiguous in `ne` order scrambles
/// the cold cells across heads, and the verification catches it.
#[test]
fn a_planted_cold_store_layout_bug_fails_the_check() {
    if ggml_trace::skip_without_mixed_kv("a_planted_cold_store_layout_bug_fails_the_check") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (m, _) = model(dir.path());
    let path = dir.path().join("mixed.gguf");
    for (storage, t) in traces(&m, &path, &mixed_args()) {
        let path = test_support::storage::path_for(&path, storage);
        let (step, kq) = t
            .steps
            .iter()
            .find_map(|s| {
                let k = t.find(Role::KQuant, 0, s.step)?;
                (k.meta.layout.ne[1] >= 2).then_some((s.step, k))
            })
            .expect("a step with cold rows");
        let [d, n, h, _] = kq.meta.layout.ne.map(|x| x as usize);
        assert!(h >= 2);
        let row = kq.meta.layout.ty.bytes_for(d as u64).unwrap() as usize;
        let logical = t.data(kq).to_vec();
        // memory as ggml held it: the heads of one cell adjacent
        let mut memory = vec![0u8; logical.len()];
        for j in 0..h {
            for c in 0..n {
                let src = (j * n + c) * row;
                let dst = (c * h + j) * row;
                memory[dst..dst + row].copy_from_slice(&logical[src..src + row]);
            }
        }
        assert_ne!(memory, logical);
        // Every tensor whole (the version-2 trace materialized), patched in place.
        let bytes = trace_format::materialize::full_bytes(&path).unwrap();
        let file = gguf_io::GgufFile::from_bytes(bytes.clone()).unwrap();
        let info = &file.tensors()[kq.index];
        let start = (file.header().data_offset + info.offset) as usize;
        let mut planted = bytes;
        planted[start..start + memory.len()].copy_from_slice(&memory);
        let bad = TraceFile::from_gguf(gguf_io::GgufFile::from_bytes(planted).unwrap()).unwrap();
        let good = verify_group(&t, step, 0).unwrap().into_result().unwrap();
        let caught = verify_group(&bad, step, 0).unwrap().into_result().unwrap();
        eprintln!(
            "cold layout: good NMSE {:.3e}, planted {:.3e}",
            good.nmse, caught.nmse
        );
        assert!(good.nmse <= 1e-6, "{good:?}");
        assert!(caught.nmse > 1e-3, "the planted bug must fail: {caught:?}");
    }
}

/// Issue 21 (the mixed node's kernel: KV rows in tiles of 32, and at decode, with at most 64
/// (KV head, query row) items and from 128 KV cells on, the KV range cut into chunks of a fixed
/// length, 64 cells, merged in chunk order by the last thread): a hot window of 40 (hot
/// segments of 40 to 104 cells: whole and partial tiles), cold q8_0 and q4_0, run with 1 and 3
/// threads (tiny-llama has 2 KV heads: every decode step from 128 cells on is split, in chunks
/// that are not whole tiles of the segments). Every group verifies against the f64
/// recomputation in both runs; where a group's six inputs are the same in both runs, the
/// outputs (`kqv_out`) are bit-identical, split or not: the chunking depends on the shapes
/// only, never on the thread count.
#[test]
fn mixed_node_output_does_not_depend_on_the_thread_count_and_verifies() {
    if ggml_trace::skip_without_mixed_kv(
        "mixed_node_output_does_not_depend_on_the_thread_count_and_verifies",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (m, cfg) = model(dir.path());
    for cold in ["q8_0", "q4_0"] {
        let mut outs = Vec::new();
        for threads in [1u32, 3] {
            let args = LlamaArgs::new(&m, PROMPT)
                .n(N_GEN as u32)
                .ubatch(16)
                .threads(threads)
                .greedy()
                .build();
            let out = dir.path().join(format!("mixed-{cold}-t{threads}.gguf"));
            let extra = [
                "--mixed-kv-cache",
                "--mixed-hot-window",
                "40",
                "--mixed-cold-type",
                cold,
            ];
            let t = crate::common::trace_with(args, &out, &extra);
            assert!(t.run.mixed_kv_cache);
            let mut hot_sizes = std::collections::BTreeSet::new();
            let mut worst = 0.0f64;
            let mut attn = Vec::new();
            for &(step, layer) in t.groups().keys() {
                let k = t.find(Role::K, layer, step).unwrap();
                hot_sizes.insert(k.meta.layout.ne[1]);
                let v = verify_group(&t, step, layer)
                    .unwrap()
                    .into_result()
                    .unwrap_or_else(|m| {
                        panic!(
                            "{cold} -t {threads} step {step} layer {layer} misses {:?}",
                            m.0
                        )
                    });
                worst = worst.max(v.nmse);
                let vals = |r| t.f32(t.find(r, layer, step).unwrap()).unwrap();
                let inputs: Vec<Vec<f32>> = [
                    Role::Q,
                    Role::K,
                    Role::V,
                    Role::KQuant,
                    Role::VQuant,
                    Role::Mask,
                ]
                .into_iter()
                .map(vals)
                .collect();
                attn.push(((step, layer), inputs, vals(Role::KqvOut)));
            }
            eprintln!(
                "{cold} -t {threads}: {} groups verify, worst NMSE {worst:.3e}, hot sizes {hot_sizes:?}",
                t.groups().len()
            );
            assert!(worst <= 1e-6, "worst NMSE {worst:e}");
            assert_eq!(t.groups().len(), t.steps.len() * cfg.n_layer);
            // whole and partial tiles of 32 in the hot segment, and several tiles
            assert!(
                hot_sizes.iter().any(|&n| n > 64 && n % 32 != 0),
                "{hot_sizes:?}"
            );
            outs.push(attn);
        }
        assert_eq!(outs[0].len(), outs[1].len());
        let bits = |a: &[f32], b: &[f32]| {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
        };
        let mut compared = 0;
        let mut split_seen = 0;
        for ((g1, in1, o1), (g2, in2, o2)) in outs[0].iter().zip(&outs[1]) {
            assert_eq!(g1, g2);
            if !in1.iter().zip(in2).all(|(a, b)| bits(a, b)) {
                continue;
            }
            compared += 1;
            let n_q = in1[0].len() / (cfg.n_head * cfg.head_dim);
            let n_kv = in1[1].len() / (cfg.n_head_kv * cfg.head_dim)
                + in1[3].len() / (cfg.n_head_kv * cfg.head_dim);
            if n_q * cfg.n_head_kv <= 64 && n_kv >= 128 {
                split_seen += 1;
            }
            assert!(
                bits(o1, o2),
                "{cold}: step/layer {g1:?} (n_q {n_q}, n_kv {n_kv}): -t 1 and -t 3 differ"
            );
        }
        eprintln!(
            "{cold}: {compared} of {} groups with the same inputs at -t 1 and -t 3 ({split_seen} split)",
            outs[0].len()
        );
        assert!(split_seen > 0, "no split decode step with the same inputs");
        assert!(
            compared >= cfg.n_layer,
            "only {compared} groups with the same inputs"
        );
    }
}
