//! gguf-py (PyPI `gguf` 0.19, the reader llama.cpp's own Python tools use) reads the
//! tiny model with the same metadata, tensor names, shapes, types and values.

use test_support::gguf_py as support;

use gguf_io::{GgmlType, GgufFile};
use serde_json::Value as Json;
use tiny_llama::{write_model, TinyLlamaConfig, N_VOCAB};

const DUMP: &str = r#"
import json, sys, numpy as np
from gguf import GGUFReader
r = GGUFReader(sys.argv[1])
fields = {}
for f in r.fields.values():
    if f.name.startswith("GGUF."):
        continue
    v = f.contents()
    if isinstance(v, float):
        v = float(np.float32(v))
    elif isinstance(v, list) and v and isinstance(v[0], float):
        v = [float(np.float32(x)) for x in v]
    fields[f.name] = {"types": [t.name for t in f.types], "value": v}
tensors = []
for t in r.tensors:
    vals = np.asarray(t.data).astype(np.float64).reshape(-1)
    tensors.append({"name": t.name, "type": t.tensor_type.name, "shape": [int(x) for x in t.shape],
        "n_elements": int(t.n_elements), "sum": float(vals.sum()), "first": float(vals[0]),
        "last": float(vals[-1])})
print(json.dumps({"fields": fields, "tensors": tensors}))
"#;

fn check(cfg: &TinyLlamaConfig) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_model(&path, cfg).unwrap();
    let out = support::run_python_ok(DUMP, [&path]);
    let py: Json = serde_json::from_str(&out).expect("gguf-py dump is JSON");
    let fields = &py["fields"];

    let scalar = |k: &str, ty: &str| {
        let f = &fields[k];
        assert_eq!(f["types"], Json::from(vec![ty]), "{k}");
        f["value"].clone()
    };
    assert_eq!(scalar("general.architecture", "STRING"), "llama");
    assert_eq!(scalar("tokenizer.ggml.model", "STRING"), "llama");
    assert_eq!(
        scalar("llama.embedding_length", "UINT32"),
        cfg.n_embd as u64
    );
    assert_eq!(scalar("llama.block_count", "UINT32"), cfg.n_layer as u64);
    assert_eq!(
        scalar("llama.attention.head_count_kv", "UINT32"),
        cfg.n_head_kv as u64
    );
    assert_eq!(
        scalar("llama.rope.dimension_count", "UINT32"),
        cfg.head_dim as u64
    );
    let eps = scalar("llama.attention.layer_norm_rms_epsilon", "FLOAT32");
    assert_eq!(eps.as_f64().unwrap() as f32, cfg.rms_eps);
    assert_eq!(scalar("tokenizer.ggml.add_bos_token", "BOOL"), true);
    let tokens = &fields["tokenizer.ggml.tokens"];
    assert_eq!(tokens["types"], Json::from(vec!["ARRAY", "STRING"]));
    let tokens = tokens["value"].as_array().unwrap();
    assert_eq!(tokens.len(), N_VOCAB);
    assert_eq!(tokens[3 + 0x0A], "<0x0A>");
    assert_eq!(tokens[N_VOCAB - 1], "\u{2581}");
    let types = &fields["tokenizer.ggml.token_type"];
    assert_eq!(types["types"], Json::from(vec!["ARRAY", "INT32"]));
    assert_eq!(types["value"][3 + 0x41], 6);

    // Every key gguf-io wrote is there (gguf-py adds only its GGUF.* pseudo-fields).
    let ours = GgufFile::open(&path).unwrap();
    let keys: Vec<&str> = ours.metadata().iter().map(|(k, _)| k).collect();
    let py_keys: Vec<&str> = fields
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    let mut py_sorted = py_keys.clone();
    py_sorted.sort_unstable();
    assert_eq!(sorted, py_sorted);

    let py_tensors = py["tensors"].as_array().unwrap();
    assert_eq!(py_tensors.len(), ours.tensors().len());
    for (t, p) in ours.tensors().iter().zip(py_tensors) {
        assert_eq!(p["name"], t.name.as_str());
        let want_ty = if t.ty == GgmlType::F16 { "F16" } else { "F32" };
        assert_eq!(p["type"], want_ty, "{}", t.name);
        // gguf-py's `shape` is ggml ne order, like ours.
        let shape: Vec<u64> = p["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert_eq!(shape, t.dims, "{}", t.name);
        let values = ours.tensor_f32(t).unwrap();
        let sum: f64 = values.iter().map(|&x| f64::from(x)).sum();
        let py_sum = p["sum"].as_f64().unwrap();
        assert!(
            (sum - py_sum).abs() <= 1e-9 * (1.0 + sum.abs()),
            "{}: {sum} vs {py_sum}",
            t.name
        );
        // Exact f32 values (serde_json may miss the last f64 ulp of Python's repr).
        assert_eq!(p["first"].as_f64().unwrap() as f32, values[0]);
        assert_eq!(p["last"].as_f64().unwrap() as f32, values[values.len() - 1]);
    }
}

#[test]
fn gguf_py_reads_the_f32_model() {
    check(&TinyLlamaConfig::default());
}

#[test]
fn gguf_py_reads_the_f16_model_with_explicit_head_sizes() {
    check(&TinyLlamaConfig {
        weight_type: GgmlType::F16,
        n_embd: 48,
        head_dim: 8,
        tie_embeddings: true,
        ..TinyLlamaConfig::default()
    });
}
