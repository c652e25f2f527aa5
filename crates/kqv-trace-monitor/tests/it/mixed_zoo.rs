//! The mixed KV cache (`--mixed-kv-cache`) over the tiny-model zoo (`tiny_llama::zoo`).
//!
//! Every architecture is either accepted or refused, as [`refusal`] says:
//! - accepted: traced twice on the same prompt, greedy, with the same ubatches: with the
//!   plain F16 cache (`-fa off`, llama.cpp's F32 softmax path) and with `--mixed-kv-cache`
//!   and a hot window larger than the context (so no row ever reaches the cold store and
//!   the mixed node computes exactly the normal attention). The `kqv_out` of every
//!   (step, layer) of the two traces agree, NMSE <= [`MAX_NMSE`] computed here in f64
//!   from the two traces' tensors, and `gguf-reader --verify-attention` verifies the
//!   mixed trace. On the sliding-window (iSWA) models only the full-attention layers
//!   ([`swa_layers`] says which are not) have the mixed node; the sliding-window layers
//!   keep llama.cpp's window cache and attention (both runs `-fa off` there);
//! - refused: exit 2 (the usage-error status), before any step, with exactly one line on
//!   stderr that names the model's architecture and the reason, and no trace written.
//!
//! On gemma2 and gemma3, [`iswa_chunks_migrate_through_ring_buffer_reuse`] runs a prompt
//! longer than both caches (a hot window of 16) and checks every token is in exactly one
//! store, every step, and that every group verifies.

use std::path::Path;
use std::process::Command;

use test_support::LlamaArgs;
use tiny_llama::zoo::{write_zoo_model, Arch};
use trace_format::{Role, MIXED_ATTN_OP};

const BIN: &str = env!("CARGO_BIN_EXE_kqv-trace-monitor");
/// 43 prompt tokens in ubatches of 16 (3 steps), then 3 generated tokens.
const PROMPT: &str = "The quick brown fox jumps over a lazy dog";
const N_GEN: u32 = 3;
const N_CTX: u32 = 256;
/// Hot window: larger than the context.
const WINDOW: u32 = 512;
/// The mixed node accumulates in F32 like llama.cpp's non-flash path; what remains is Q
/// rounded to F16 for the plain path's K·Q dot product (measured: at most 7.1e-7, qwen2).
/// Against `-fa on` (V accumulated in F16) the distance is up to ~1.9e-6.
const MAX_NMSE: f64 = 1e-6;

/// `None`: the mixed cache accepts the architecture; `Some(text)`: it refuses it with one
/// line holding `text`.
fn refusal(arch: Arch) -> Option<&'static str> {
    match arch {
        Arch::Llama
        | Arch::Qwen2
        | Arch::Qwen3
        | Arch::Phi3
        | Arch::Bloom
        | Arch::Mpt
        | Arch::StableLm
        | Arch::Olmo2
        | Arch::Granite
        | Arch::Deepseek2
        | Arch::Falcon
        | Arch::Gemma2
        | Arch::Gemma3
        | Arch::Gemma4 => None,
        Arch::GptOss => Some("attention sinks (attn_sinks)"),
        Arch::Llama4 => Some("chunked attention over 8192 tokens"),
        Arch::Lfm2 => Some(
            "it does not use llama.cpp's plain unified KV cache (recurrent or hybrid recurrent \
             layers)",
        ),
        Arch::Deepseek2Mla => Some("multi-head latent attention (MLA"),
        Arch::Grok => {
            Some("its softcap and output scale are explicit graph ops between kq and the softmax")
        }
        Arch::Bert => Some("non-causal attention (an encoder, embedding or diffusion model"),
        Arch::T5 => Some("an encoder-decoder model"),
    }
}

/// The sliding-window layers of the zoo's iSWA models (llama.cpp's `is_swa`: gemma2 and
/// gemma3 alternate, window layer first; gemma4 is `[true, false, true]`); every other
/// layer, and every layer of the other models, attends to the whole context.
fn swa_layers(arch: Arch) -> &'static [i32] {
    match arch {
        Arch::Gemma2 | Arch::Gemma3 => &[0],
        Arch::Gemma4 => &[0, 2],
        _ => &[],
    }
}

fn args(model: &Path) -> LlamaArgs {
    LlamaArgs::new(model, PROMPT)
        .n(N_GEN)
        .ctx(N_CTX)
        .ubatch(16)
        .threads(2)
        .greedy()
}

fn mixed_args(model: &Path) -> Vec<String> {
    args(model)
        .args(["--mixed-kv-cache", "--mixed-hot-window"])
        .arg(WINDOW.to_string())
        .build()
}

/// The mixed run of `arch`: its sliding-window layers (if any) take llama.cpp's softmax
/// path like the plain run's (`-fa off`; the mixed node does not depend on the flag).
fn mixed_args_for(arch: Arch, model: &Path) -> Vec<String> {
    let mut a = mixed_args(model);
    if !swa_layers(arch).is_empty() {
        a.extend(["-fa", "off"].map(String::from));
    }
    a
}

/// NMSE of `a` against `b` (mean squared difference over `b`'s variance), in f64.
fn nmse(a: &[f32], b: &[f32]) -> f64 {
    let n = b.len() as f64;
    let mean = b.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let var = b
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / n;
    let mse = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum::<f64>()
        / n;
    mse / var
}

/// The worst NMSE over the (step, layer) groups of the accepted `arch`.
fn accepted(dir: &Path, arch: Arch, model: &Path) -> f64 {
    let name = arch.name();
    let plain = crate::common::trace_with(
        args(model).flash(false).build(),
        &dir.join(format!("plain-{name}.gguf")),
        &[],
    );
    // The mixed trace in both storages (full, delta); the plain one is a reference only.
    let mut worst_of_both = 0f64;
    for (storage, mixed) in crate::common::trace_both(
        mixed_args_for(arch, model),
        &dir.join(format!("mixed-{name}.gguf")),
        &[],
    ) {
        let mixed_path =
            test_support::storage::path_for(&dir.join(format!("mixed-{name}.gguf")), storage);
        let name = format!("{name} ({})", storage.name());
        // the trace is self-consistent too (docs/workflows.md, 6)
        let v = Command::new(test_support::workspace_bin("gguf-reader", "gguf-reader"))
            .arg(&mixed_path)
            .arg("--verify-attention")
            .output()
            .unwrap();
        assert!(
            v.status.success(),
            "{name}: gguf-reader --verify-attention: {:?}\n{}{}",
            v.status,
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        );
        assert!(mixed.run.mixed_kv_cache, "{name}");
        assert!(!plain.run.mixed_kv_cache, "{name}");
        let n_prompt_steps = plain.run.prompt_tokens.len().div_ceil(16);
        assert_eq!(
            mixed.groups().len(),
            plain.groups().len(),
            "{name}: traced groups"
        );
        let layers: Vec<i32> = plain
            .groups()
            .keys()
            .filter(|(s, _)| *s == 0)
            .map(|&(_, l)| l)
            .collect();
        assert!(!layers.is_empty(), "{name}: no traced layer");
        let (mut worst, mut n_steps) = (0f64, 0usize);
        for (sm, sp) in mixed.steps.iter().zip(&plain.steps) {
            if sm.tokens != sp.tokens {
                break; // greedy generation diverged: later steps see other tokens
            }
            n_steps += 1;
            for &layer in &layers {
                let attn = mixed.attn(sm.step, layer).unwrap();
                if swa_layers(arch).contains(&layer) {
                    // llama.cpp's own window cache and attention
                    assert_ne!(
                        attn.op, MIXED_ATTN_OP,
                        "{name} step {} layer {layer}",
                        sm.step
                    );
                    assert!(mixed.find(Role::KQuant, layer, sm.step).is_none());
                } else {
                    assert_eq!(
                        attn.op, MIXED_ATTN_OP,
                        "{name} step {} layer {layer}",
                        sm.step
                    );
                    let cold = mixed.find(Role::KQuant, layer, sm.step).unwrap();
                    assert_eq!(
                        cold.meta.layout.ne[1], 0,
                        "{name}: no row reaches the cold store"
                    );
                }
                let a = mixed.find(Role::KqvOut, layer, sm.step).unwrap();
                let b = plain.find(Role::KqvOut, layer, sp.step).unwrap();
                let (va, vb) = (mixed.f32(a).unwrap(), plain.f32(b).unwrap());
                assert_eq!(va.len(), vb.len(), "{name} step {} layer {layer}", sm.step);
                let d = nmse(&va, &vb);
                assert!(
                    d <= MAX_NMSE,
                    "{name} step {} layer {layer}: kqv_out NMSE {d:e} against the plain F16 cache",
                    sm.step
                );
                worst = worst.max(d);
            }
        }
        assert!(
            n_steps >= n_prompt_steps,
            "{name}: the prompt steps differ ({n_steps} of {} steps agree)",
            plain.steps.len()
        );
        eprintln!(
            "{name}: {n_steps} of {} steps x {} layers, worst kqv_out NMSE {worst:.3e}",
            plain.steps.len(),
            layers.len()
        );
        worst_of_both = worst_of_both.max(worst);
    }
    worst_of_both
}

fn refused(dir: &Path, arch: Arch, model: &Path, text: &str) {
    let name = arch.name();
    let out = dir.join(format!("refused-{name}.gguf"));
    let o = Command::new(BIN)
        .args(mixed_args(model))
        .arg("--save-gguf")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{name}: {:?}\n{err}", o.status);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{name}: one line on stderr:\n{err}");
    let want = format!(
        "kqv-trace-monitor: --mixed-kv-cache cannot express the attention of architecture '{}': ",
        arch.gguf_arch()
    );
    assert!(lines[0].starts_with(&want), "{name}: {}", lines[0]);
    assert!(
        lines[0].contains(text),
        "{name}: {} lacks {text:?}",
        lines[0]
    );
    assert!(o.stdout.is_empty(), "{name}: stdout not empty");
    assert!(!out.exists(), "{name}: a trace was written");
}

#[test]
fn every_zoo_architecture_is_refused_or_equals_the_plain_cache() {
    if ggml_trace::skip_without_mixed_kv(
        "every_zoo_architecture_is_refused_or_equals_the_plain_cache",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut table = Vec::new();
    for arch in Arch::ALL {
        let model = write_zoo_model(dir.path(), arch).unwrap();
        match refusal(arch) {
            None => {
                let worst = accepted(dir.path(), arch, &model);
                table.push(format!("{}: accepted, worst NMSE {worst:.3e}", arch.name()));
            }
            Some(text) => {
                refused(dir.path(), arch, &model, text);
                table.push(format!("{}: refused", arch.name()));
            }
        }
    }
    eprintln!("{}", table.join("\n"));
}

/// `model` rewritten with one metadata key set to `value`.
fn with_key(model: &Path, out: &Path, key: &str, value: impl Into<gguf_io::Value>) {
    let f = gguf_io::GgufFile::from_bytes(std::fs::read(model).unwrap()).unwrap();
    let mut spec = gguf_io::HeaderSpec::from_header(f.header());
    spec.metadata.set(key, value);
    let mut w = gguf_io::GgufWriter::new(Vec::new(), &spec).unwrap();
    for t in f.tensors() {
        w.write_tensor(f.tensor_data(t)).unwrap();
    }
    std::fs::write(out, w.finish().unwrap()).unwrap();
}

/// The refusals the zoo does not reach as such, on zoo models with one key changed: the
/// gpt-oss model without its window (`n_swa` 0: the attention sinks are then the reason)
/// and a llama declared non-causal (`llama.attention.causal = false`).
#[test]
fn attention_sinks_and_non_causal_models_are_refused() {
    if ggml_trace::skip_without_mixed_kv("attention_sinks_and_non_causal_models_are_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let oss = write_zoo_model(dir.path(), Arch::GptOss).unwrap();
    let no_window = dir.path().join("gpt-oss-no-window.gguf");
    with_key(&oss, &no_window, "gpt-oss.attention.sliding_window", 0u32);
    refused(
        dir.path(),
        Arch::GptOss,
        &no_window,
        "attention sinks (attn_sinks)",
    );
    let llama = write_zoo_model(dir.path(), Arch::Llama).unwrap();
    let non_causal = dir.path().join("llama-non-causal.gguf");
    with_key(&llama, &non_causal, "llama.attention.causal", false);
    refused(
        dir.path(),
        Arch::Llama,
        &non_causal,
        "non-causal attention (an encoder, embedding or diffusion model",
    );
}

/// LLAMA_MIXED_KV_CHUNK in the patched llama.h.
const CHUNK: u64 = 32;

/// gemma2 and gemma3 (sliding window [`tiny_llama::zoo::SLIDING_WINDOW`] = 16 on layer 0,
/// full attention on layer 1) with a hot window of 16: the full-attention layer's hot store
/// has 16 + 2·32 = 80 cells and llama.cpp's SWA cache 256 (16 + one ubatch, padded to
/// 256), and the run (about 300 prompt tokens and 40 generated, in ubatches of 32) is
/// longer than both, so chunks move to the cold store during the prompt and during
/// generation, freed hot cells are reused, and the SWA cache wraps around. Every step:
/// the full-attention layer's mask shows each position up to the step's last token
/// exactly once (cold rows, then hot cells), the sliding-window layer's shows the last 16;
/// every group, mixed node and flash attention alike, verifies within its bound.
#[test]
fn iswa_chunks_migrate_through_ring_buffer_reuse() {
    if ggml_trace::skip_without_mixed_kv("iswa_chunks_migrate_through_ring_buffer_reuse") {
        return;
    }
    const N_GEN: u32 = 40;
    let dir = tempfile::tempdir().unwrap();
    let prompt = [PROMPT; 7].join(". ");
    for arch in [Arch::Gemma2, Arch::Gemma3] {
        let name = arch.name();
        let model = write_zoo_model(dir.path(), arch).unwrap();
        let out = dir.path().join(format!("iswa-{name}.gguf"));
        let t = crate::common::trace_with(
            LlamaArgs::new(&model, &prompt)
                .n(N_GEN)
                .ctx(512)
                .threads(2)
                .greedy()
                .args(["--mixed-kv-cache", "--mixed-hot-window", "16"])
                .build(),
            &out,
            &[],
        );
        assert!(t.run.mixed_kv_cache, "{name}");
        let n_prompt = t.run.prompt_tokens.len();
        let n_prompt_steps = n_prompt.div_ceil(CHUNK as usize);
        assert_eq!(t.steps.len(), n_prompt_steps + N_GEN as usize, "{name}");
        let last_pos = *t.steps.last().unwrap().positions.last().unwrap() as u64;
        assert!(last_pos >= 300, "{name}: last position {last_pos}");
        let (mut cold_rows, mut max_hot, mut max_swa) = (Vec::new(), 0u64, 0u64);
        for step in &t.steps {
            let s = step.step;
            let n_tok = step.positions.len();
            let pos = u64::from(*step.positions.last().unwrap() as u32);
            // the columns of the step's last token that the mask leaves visible
            let visible = |layer: i32| {
                let mask = t.find(Role::Mask, layer, s).unwrap();
                let n_cols = mask.meta.layout.ne[0] as usize;
                let m = t.f32(mask).unwrap();
                let row = &m[(n_tok - 1) * n_cols..n_tok * n_cols];
                row.iter().filter(|x| x.is_finite()).count() as u64
            };
            // layer 1: the mixed node over cold rows and hot cells
            assert_eq!(t.attn(s, 1).unwrap().op, MIXED_ATTN_OP, "{name} step {s}");
            let n_cold = t.find(Role::KQuant, 1, s).unwrap().meta.layout.ne[1];
            let n_hot = t.find(Role::K, 1, s).unwrap().meta.layout.ne[1];
            assert_eq!(n_cold % CHUNK, 0, "{name} step {s}: whole chunks");
            assert_eq!(visible(1), pos + 1, "{name} step {s}: every position once");
            cold_rows.push(n_cold);
            max_hot = max_hot.max(n_hot);
            // layer 0: llama.cpp's sliding-window cache, flash attention
            assert_eq!(
                t.attn(s, 0).unwrap().op,
                "FLASH_ATTN_EXT",
                "{name} step {s}"
            );
            assert!(t.find(Role::KQuant, 0, s).is_none(), "{name} step {s}");
            max_swa = max_swa.max(t.find(Role::K, 0, s).unwrap().meta.layout.ne[1]);
            assert_eq!(
                visible(0),
                (pos + 1).min(u64::from(tiny_llama::zoo::SLIDING_WINDOW)),
                "{name} step {s}: the window"
            );
        }
        // both caches hold fewer cells than the run has positions: cells were reused
        assert!(max_hot <= 16 + 2 * CHUNK, "{name}: hot cells {max_hot}");
        assert!(
            max_swa <= 256 && max_swa <= last_pos,
            "{name}: SWA cells {max_swa}"
        );
        assert!(
            cold_rows[0] == 0 && cold_rows[n_prompt_steps - 1] > 0,
            "{name}: {cold_rows:?}"
        );
        assert!(
            cold_rows.last().unwrap() > &cold_rows[n_prompt_steps - 1],
            "{name}: no chunk moved during generation: {cold_rows:?}"
        );
        let mut worst = (0f64, 0f64);
        for &(step, layer) in t.groups().keys() {
            let c = attn_verify::check_in_trace(&t, step, layer)
                .unwrap()
                .into_result()
                .unwrap_or_else(|m| panic!("{name} step {step} layer {layer} misses {:?}", m.0));
            assert!(
                c.pass && c.findings.is_empty(),
                "{name} step {step} layer {layer}: NMSE {:e} (bound {:e}): {:#?}",
                c.verification.nmse,
                c.bound,
                c.findings
            );
            let w = if layer == 1 {
                &mut worst.0
            } else {
                &mut worst.1
            };
            *w = w.max(c.verification.nmse);
        }
        eprintln!(
            "{name}: {} steps, last position {last_pos}, hot cells <= {max_hot}, SWA cells <= {max_swa}, \
             cold rows {cold_rows:?}; worst NMSE mixed {:.3e}, window layer {:.3e}",
            t.steps.len(),
            worst.0,
            worst.1
        );
    }
}
