//! A mixed-KV-cache run compared with an F16 flash-attention reference: the layout
//! difference is explained before any number, the cache tensors are listed as not
//! comparable (not as shape mismatches), q, attn and kqv_out are compared per layer; with
//! a hot window larger than the context the two runs agree to F16 accumulation error.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_tensor-diff-analyzer");
const MONITOR_ARGS: [&str; 12] = [
    "-n", "6", "-ub", "16", "-b", "16", "-t", "2", "--temp", "0", "-fa", "on",
];
const PROMPT: &str =
    "The quick brown fox jumps over a lazy dog. The quick brown fox jumps over a lazy dog.";

fn model(dir: &Path) -> PathBuf {
    tiny_llama::write_with_head_dim(dir, 32).unwrap()
}

/// Traces with the monitor's library (one llama.cpp run at a time: one test).
fn trace(model: &Path, out: &Path, extra: &[&str]) {
    let mut args: Vec<String> = ["-m", model.to_str().unwrap(), "-p", PROMPT]
        .iter()
        .chain(MONITOR_ARGS.iter())
        .chain(extra.iter())
        .map(|s| s.to_string())
        .collect();
    args.extend(["--save-gguf".into(), out.display().to_string()]);
    match kcm_cli::capture_args::parse(args).unwrap() {
        kcm_cli::capture_args::Command::Run(o) => kcm_cli::trace::run(&o).unwrap(),
        c => panic!("{c:?}"),
    }
}

/// The analyzer's verdict on two traces (both written delta, the default), checked to be
/// the same on their version-1 copies (test_support::storage::as_storage): every
/// comparison here runs for both storages.
fn analyze(reference: &Path, current: &Path, own: &[&str]) -> (Option<i32>, Value) {
    use test_support::storage::{as_storage, KvStorage};
    let (code, v) = analyze_as_is(reference, current, own);
    let (code1, v1) = analyze_as_is(
        &as_storage(reference, KvStorage::Full),
        &as_storage(current, KvStorage::Full),
        own,
    );
    assert_eq!(code1, code, "version 1: another exit code");
    assert_eq!(v1["tensors"], v["tensors"], "version 1 compares otherwise");
    (code, v)
}

fn analyze_as_is(reference: &Path, current: &Path, own: &[&str]) -> (Option<i32>, Value) {
    let o = Command::new(BIN)
        .arg("--reference")
        .arg(reference)
        .arg("--current")
        .arg(current)
        .arg("--json")
        .args(own)
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}", String::from_utf8_lossy(&o.stderr));
    });
    (o.status.code(), v)
}

fn roles(list: &Value) -> Vec<String> {
    let mut r: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["role"].as_str().unwrap().to_owned())
        .collect();
    r.sort();
    r.dedup();
    r
}

#[test]
fn mixed_run_against_an_f16_reference() {
    if ggml_trace::skip_without_mixed_kv("mixed_run_against_an_f16_reference") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m = model(d);
    let reference = d.join("f16.gguf");
    trace(&m, &reference, &[]);
    let small = d.join("mixed-w16.gguf");
    trace(
        &m,
        &small,
        &[
            "--mixed-kv-cache",
            "--mixed-hot-window",
            "16",
            "--mixed-cold-type",
            "q8_0",
        ],
    );

    // Window 16 < prompt: older tokens are in q8_0, so kqv_out differs by more than 1e-6.
    let (code, v) = analyze(&reference, &small, &[]);
    assert_eq!(code, Some(1), "{v:#}");
    let notes = v["notes"].to_string();
    assert!(notes.contains("KV cache layout differs"), "{notes}");
    assert!(!notes.contains("flash attention differs"), "{notes}");
    assert_eq!(v["shape_mismatches"], 0, "{v:#}");
    assert_eq!(
        roles(&v["not_comparable"]),
        ["k", "k_quant", "mask", "v", "v_quant"],
        "{:#}",
        v["not_comparable"]
    );
    assert_eq!(roles(&v["tensors"]), ["attn", "kqv_out", "q"]);
    assert!(v["unmatched"].as_array().unwrap().is_empty(), "{v:#}");
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2, "one row per layer: {layers:?}");
    for l in layers {
        let nmse = l["worst_nmse"].as_f64().unwrap();
        // q8_0 cold rows: a small but real difference.
        assert!(nmse > 1e-9 && nmse < 1e-2, "{l}");
    }
    // Worst elements are located on the right axes: attn (the mixed node's output, laid
    // out like flash attention's) has 4 heads and 32 dims.
    for t in v["tensors"].as_array().unwrap() {
        if t["role"] == "attn" || t["role"] == "kqv_out" {
            let w = &t["worst_abs"];
            assert!(w["head"].as_u64().unwrap() < 4, "{t}");
            assert!(w["dim"].as_u64().unwrap() < 32, "{t}");
        }
    }
    // Layer 0's q at step 0 comes from the embeddings only: identical.
    let q0 = v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["role"] == "q" && t["layer"] == 0 && t["step"] == 0)
        .expect("q of layer 0, step 0");
    assert_eq!(q0["metrics"]["max_abs"], 0.0, "{q0}");

    // A window larger than the context: no token ever goes cold, the mixed node computes
    // what flash attention computes, up to ggml's F16 accumulation of V (documented bound).
    let big = d.join("mixed-w1024.gguf");
    trace(
        &m,
        &big,
        &["--mixed-kv-cache", "--mixed-hot-window", "1024"],
    );
    let (_, v) = analyze(&reference, &big, &[]);
    let notes = v["notes"].to_string();
    assert!(notes.contains("KV cache layout differs"), "{notes}");
    for t in v["tensors"].as_array().unwrap() {
        if t["role"] == "kqv_out" {
            let nmse = t["metrics"]["nmse"].as_f64().unwrap();
            assert!(nmse < 1e-5, "{t}");
        }
    }
}

/// A sliding-window (iSWA) model: the mixed run's full-attention layer (1) runs the mixed
/// node, its window layer (0) flash attention like the reference's. The analyzer takes
/// the trace as one story (the mixed layers and flash attention), explains the layout
/// difference, and layer 0 at step 0 (its inputs come from the embeddings, its window
/// cache is llama.cpp's) is bit for bit the reference's.
#[test]
fn mixed_run_on_a_sliding_window_model_against_an_f16_reference() {
    if ggml_trace::skip_without_mixed_kv(
        "mixed_run_on_a_sliding_window_model_against_an_f16_reference",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m = tiny_llama::zoo::write_zoo_model(d, tiny_llama::zoo::Arch::Gemma3).unwrap();
    let reference = d.join("f16.gguf");
    trace(&m, &reference, &[]);
    let mixed = d.join("mixed-w16.gguf");
    trace(
        &m,
        &mixed,
        &["--mixed-kv-cache", "--mixed-hot-window", "16"],
    );
    let (code, v) = analyze(&reference, &mixed, &[]);
    assert_eq!(code, Some(1), "{v:#}");
    let notes = v["notes"].to_string();
    assert!(notes.contains("KV cache layout differs"), "{notes}");
    assert!(!notes.contains("flash attention differs"), "{notes}");
    assert_eq!(v["shape_mismatches"], 0, "{v:#}");
    assert_eq!(v["layers"].as_array().unwrap().len(), 2, "{v:#}");
    let k0 = v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["role"] == "kqv_out" && t["layer"] == 0 && t["step"] == 0)
        .expect("kqv_out of layer 0, step 0");
    assert_eq!(k0["metrics"]["max_abs"], 0.0, "{k0}");
}
