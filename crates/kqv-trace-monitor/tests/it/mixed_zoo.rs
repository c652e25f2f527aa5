//! The mixed KV cache (`--mixed-kv-cache`) over the tiny-model zoo (`tiny_llama::zoo`).
//!
//! Every architecture is either accepted or refused, as [`refusal`] says:
//! - accepted: traced twice on the same prompt, greedy, with the same ubatches: with the
//!   plain F16 cache (`-fa off`, llama.cpp's F32 softmax path) and with `--mixed-kv-cache`
//!   and a hot window larger than the context (so no row ever reaches the cold store and
//!   the mixed node computes exactly the normal attention). The `kqv_out` of every
//!   (step, layer) of the two traces agree, NMSE <= [`MAX_NMSE`] computed here in f64
//!   from the two traces' tensors, and `gguf-reader --verify-attention` verifies the
//!   mixed trace;
//! - refused: exit 2 (the usage-error status), before any step, with exactly one line on
//!   stderr that names the model's architecture and the reason, and no trace written.

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
    const ISWA: &str = "it does not use llama.cpp's plain unified KV cache (sliding-window or \
                        chunked attention";
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
        | Arch::Falcon => None,
        Arch::Gemma2 | Arch::Gemma3 | Arch::Gemma4 | Arch::GptOss | Arch::Llama4 => Some(ISWA),
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
        mixed_args(model),
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
