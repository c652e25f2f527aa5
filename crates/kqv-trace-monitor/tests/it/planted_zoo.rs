//! Planted parameter bugs on the zoo's models (issue 15): a trace of the architecture that
//! has the feature, one recorded value rewritten the way a buggy tracer would record it,
//! and the diagnosis must name that value and recover the true one: gemma2's softcap,
//! bloom's ALiBi max_bias, gpt-oss's sinks. (The scale, the mask, stale buffers and
//! layouts are planted on the tiny LLaMA in `planted`; one K cell in `long_context`.)

use std::path::{Path, PathBuf};
use std::process::Command;

use attn_verify::{check_in_trace, Checked, Outcome, Suspect};
use gguf_io::{Array, Value};
use test_support::LlamaArgs;
use tiny_llama::zoo::{write_zoo_model, Arch};
use trace_format::{keys, Role, TraceFile};

const BIN: &str = env!("CARGO_BIN_EXE_kqv-trace-monitor");

fn trace(arch: Arch, dir: &Path) -> PathBuf {
    let model = write_zoo_model(dir, arch).unwrap();
    let out = dir.join("good.gguf");
    let o = Command::new(BIN)
        .args(
            LlamaArgs::new(&model, "The quick brown fox jumps over a lazy dog")
                .n(3)
                .ubatch(16)
                .threads(2)
                .greedy()
                .flash(true)
                .arg("--quiet")
                .arg("--save-gguf")
                .arg(out.to_str().unwrap())
                .build(),
        )
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

/// A copy of the trace with the f32 attention record `key` of (step, layer) set to `to`.
fn plant_param(good: &Path, key: &'static str, step: u32, layer: i32, to: f32) -> (PathBuf, f32) {
    let t = TraceFile::open(good).unwrap();
    let i = t
        .attn
        .iter()
        .position(|a| a.step == step && a.layer == layer)
        .unwrap();
    let mut was = 0.0;
    let bytes = trace_format::materialize::full_bytes(good).unwrap();
    let planted = trace_format::synth::rewrite(&bytes, |spec, _| {
        let Some(Value::Array(Array::F32(v))) = spec.metadata.get(key) else {
            panic!("no {key}");
        };
        let mut v = v.clone();
        was = v[i];
        v[i] = to;
        spec.metadata.set(key, v);
    })
    .unwrap();
    let out = good.with_file_name(format!("planted-{key}.gguf"));
    std::fs::write(&out, planted).unwrap();
    (out, was)
}

/// Every group but (step, layer) passes; that one fails with exactly one finding.
fn only_failure(path: &Path, step: u32, layer: i32) -> Checked {
    let t = TraceFile::open(path).unwrap();
    let mut planted = None;
    for &(s, l) in t.groups().keys() {
        let Outcome::Checked(c) = check_in_trace(&t, s, l).unwrap() else {
            panic!("step {s} layer {l}: missing inputs")
        };
        if (s, l) == (step, layer) {
            assert!(!c.pass, "the planted value must fail: {c:?}");
            planted = Some(c);
        } else {
            assert!(c.pass, "step {s} layer {l} was not touched: {c:?}");
        }
    }
    let c = planted.unwrap();
    assert_eq!(c.findings.len(), 1, "{:#?}", c.findings);
    c
}

#[test]
fn a_wrong_softcap_is_named_and_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let good = trace(Arch::Gemma2, dir.path());
    let (path, was) = plant_param(&good, keys::ATTN_SOFTCAP, 4, 1, 30.0);
    assert!(was > 0.0 && was != 30.0, "gemma2 records a softcap: {was}");
    let c = only_failure(&path, 4, 1);
    let f = &c.findings[0];
    assert_eq!(f.suspect, Suspect::Softcap, "{f}");
    assert_eq!(f.tensor, keys::ATTN_SOFTCAP);
    assert!(
        f.what
            .starts_with("the recorded softcap 30 does not reproduce kqv_out"),
        "{f}"
    );
    let fitted: f64 = f
        .what
        .rsplit("softcap ")
        .next()
        .unwrap()
        .trim_end_matches(" does")
        .parse()
        .unwrap();
    assert!(
        (fitted / f64::from(was) - 1.0).abs() < 0.05,
        "recovered {fitted}, true {was}"
    );
}

#[test]
fn a_wrong_alibi_bias_is_named_and_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let good = trace(Arch::Bloom, dir.path());
    let (path, was) = plant_param(&good, keys::ATTN_MAX_BIAS, 4, 0, 2.0);
    assert_eq!(was, 8.0, "bloom's ALiBi max_bias");
    let c = only_failure(&path, 4, 0);
    let f = &c.findings[0];
    assert_eq!(f.suspect, Suspect::MaxBias, "{f}");
    assert_eq!(f.tensor, keys::ATTN_MAX_BIAS);
    let fitted: f64 = f
        .what
        .rsplit("max_bias ")
        .next()
        .unwrap()
        .trim_end_matches(" does")
        .parse()
        .unwrap();
    assert!((fitted - 8.0).abs() < 0.2, "recovered {fitted}");
}

#[test]
fn wrong_sinks_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let good = trace(Arch::GptOss, dir.path());
    let t = TraceFile::open(&good).unwrap();
    let (step, layer) = (4, 1);
    let i = t
        .find(Role::Sinks, layer, step)
        .expect("gpt-oss traces its sinks")
        .index;
    drop(t);
    // Every tensor whole (the version-2 trace materialized: there the sinks of a step
    // are the same bytes as the step before, stored once).
    let bytes = trace_format::materialize::full_bytes(&good).unwrap();
    let planted = trace_format::synth::rewrite(&bytes, |_, data| {
        let v: Vec<f32> = data[i]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) + 1.5)
            .collect();
        data[i] = bytemuck::cast_slice(&v).to_vec();
    })
    .unwrap();
    let path = dir.path().join("planted-sinks.gguf");
    std::fs::write(&path, planted).unwrap();
    let c = only_failure(&path, step, layer);
    let f = &c.findings[0];
    assert_eq!(f.suspect, Suspect::Tensor(Role::Sinks), "{f}");
    assert!(f.what.contains("what a wrong sink"), "{f}");
}
