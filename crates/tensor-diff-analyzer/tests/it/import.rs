//! `--reference REF.safetensors --map MAP.toml` (issue 19): references recorded outside
//! llama.cpp. The tiny LLaMA is traced with every node; numpy (through the trace's Python
//! reader, python/kqv_trace.py) rewrites its tensors in the layouts a transformers model's
//! forward hooks give (batch first; Q and K rows in Hugging Face's head-dimension order,
//! which llama.cpp's converter interleaves), under transformers' module names, with the
//! steps' tokens as metadata; the map is the one python/record_reference.py writes for
//! llama-family models. Through that map the reference must equal the trace exactly,
//! offline and live (the reference's tokens replayed, its nodes traced without
//! --tensor-filter); one perturbed tensor must fail, named as the first divergence. The
//! `gguf-reader --export` file of the trace round-trips through a map the same way. Bad
//! maps and files: one line, exit 2.

use std::path::{Path, PathBuf};

use serde_json::Value;
use test_support::gguf_py;

use crate::cli::{analyze, code, text};

/// numpy: the trace at argv[2] in transformers' layouts and names, to argv[3]; argv[4]:
/// the name of a tensor to move by 0.05 (or "-").
const HF_LAYOUT: &str = r#"
import json, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
import kqv_trace
from safetensors.numpy import save_file

t = kqv_trace.open(sys.argv[2])
out, perturb = sys.argv[3], sys.argv[4]
n_head, n_head_kv = int(sys.argv[5]), int(sys.argv[6])
first = {}
for info in t.tensors:
    key = (info.role, info.step, info.ggml_name if info.role == "node" else info.layer)
    first.setdefault(key, info)

def node(step, name):
    return t.array(first[("node", step, name)]).astype(np.float32)

def hf_rows(x, heads):
    # llama.cpp's rows of a head: [D/2, 2]; transformers': [2, D/2].
    T, width = x.shape[-2], x.shape[-1]
    d = width // heads
    return x.reshape(1, T, heads, d // 2, 2).transpose(0, 1, 2, 4, 3).reshape(1, T, width)

def seq(x):
    return x.reshape(1, x.shape[-2], x.shape[-1])

n_layer = int(t.metadata()["kqv_trace.run.n_layer"])
tensors = {}
for s in t.steps:
    S = s.step
    for L in range(n_layer):
        p = "step%d/model.layers.%d." % (S, L)
        tensors[p + "input_layernorm:output"] = seq(node(S, "attn_norm-%d" % L))
        tensors[p + "self_attn.q_proj:output"] = hf_rows(seq(node(S, "Qcur-%d" % L)), n_head)
        tensors[p + "self_attn.k_proj:output"] = hf_rows(seq(node(S, "Kcur-%d" % L)), n_head_kv)
        tensors[p + "self_attn.v_proj:output"] = seq(node(S, "Vcur-%d" % L))
        tensors[p + "self_attn.o_proj:input"] = seq(t.array(first[("kqv_out", S, L)]))
        tensors[p + "post_attention_layernorm:output"] = seq(node(S, "ffn_norm-%d" % L))
        tensors[p + "mlp:output"] = seq(node(S, "ffn_out-%d" % L))
        tensors["step%d/model.layers.%d:output" % (S, L)] = seq(node(S, "l_out-%d" % L))
if perturb != "-":
    tensors[perturb] = tensors[perturb] + np.float32(0.05)
steps = [{"step": s.step, "tokens": [int(x) for x in s.tokens],
          "positions": [int(x) for x in s.positions]} for s in t.steps]
meta = {"kcm.steps": json.dumps(steps), "kcm.prompt_tokens": json.dumps(steps[0]["tokens"]),
        "kcm.source": "numpy, in transformers' layouts"}
save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, out, metadata=meta)
print(len(tensors))
"#;

/// numpy: the export at argv[1] with argv[3] moved by 0.05, to argv[2].
const PERTURB: &str = r#"
import sys
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
with safe_open(sys.argv[1], "np") as f:
    meta = f.metadata()
    d = {k: f.get_tensor(k) for k in f.keys()}
d[sys.argv[3]] = d[sys.argv[3]] + np.float32(0.05)
save_file(d, sys.argv[2], metadata=meta)
"#;

fn python_dir() -> PathBuf {
    gguf_py::workspace_root().join("python")
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn llama(model: &Path) -> Vec<String> {
    [
        "-m",
        &s(model),
        "-p",
        "Hello world",
        "-n",
        "2",
        "-t",
        "2",
        "--temp",
        "0",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect()
}

fn json(o: &std::process::Output) -> Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", text(&o.stdout), text(&o.stderr)))
}

fn tensors(doc: &Value) -> &Vec<Value> {
    doc["tensors"].as_array().expect("tensors")
}

#[test]
fn a_transformers_layout_reference_compares_through_the_scripts_map() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = tiny_llama::TinyLlamaConfig::default();
    let model = d.join("tiny.gguf");
    tiny_llama::write_model(&model, &cfg).unwrap();
    let trace = d.join("trace.gguf");
    let mut args = llama(&model);
    args.extend(["--tensor-filter", ".", "--save-gguf", &s(&trace)].map(String::from));
    crate::first_divergence::run_monitor(args);

    let (heads, kv) = (cfg.n_head.to_string(), cfg.n_head_kv.to_string());
    let hf = d.join("hf.safetensors");
    let n: usize = gguf_py::run_python_ok(
        HF_LAYOUT,
        [
            s(&python_dir()),
            s(&trace),
            s(&hf),
            "-".into(),
            heads.clone(),
            kv.clone(),
        ],
    )
    .trim()
    .parse()
    .unwrap();
    // 3 steps (the prompt, 2 tokens) x 2 layers x 8 tensors.
    assert_eq!(n, 48);
    let map = d.join("map.toml");
    let o = std::process::Command::new(gguf_py::python())
        .arg(python_dir().join("record_reference.py"))
        .args(["--write-map-only", "--n-layer", "2", "--n-head", &heads])
        .args(["--n-head-kv", &kv, "--head-dim", &cfg.head_dim.to_string()])
        .args(["--map-out", &s(&map)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));

    // Offline: every mapped tensor compared, equal to the bit.
    let offline = |reference: &Path, own: &[&str]| {
        let mut a = vec![
            "--reference".to_string(),
            s(reference),
            "--map".into(),
            s(&map),
        ];
        a.extend(["--current".into(), s(&trace), "--json".into()]);
        a.extend(own.iter().map(|x| x.to_string()));
        analyze(&a, &[])
    };
    let o = offline(&hf, &[]);
    assert_eq!(code(&o), 0, "{}\n{}", text(&o.stderr), text(&o.stdout));
    let doc = json(&o);
    let t = tensors(&doc);
    assert_eq!(t.len(), 48, "{doc}");
    for c in t {
        assert_eq!(c["within"], true, "{c}");
        assert_eq!(c["metrics"]["max_abs"], 0.0, "{c}");
    }
    assert!(t
        .iter()
        .any(|c| c["ggml_name"] == "Qcur-1" && c["step"] == 2));
    assert_eq!(t.iter().filter(|c| c["role"] == "kqv_out").count(), 6);
    assert!(doc["first_divergence"].is_null());

    // The transform is what makes Q equal: without it Q and K differ (and only they).
    let plain = d.join("plain.toml");
    let text_map = std::fs::read_to_string(&map).unwrap();
    let without: String = text_map
        .lines()
        .filter(|l| !l.starts_with("transform"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&plain, without).unwrap();
    let mut a = vec!["--reference".to_string(), s(&hf), "--map".into(), s(&plain)];
    a.extend(["--current".into(), s(&trace), "--json".into()]);
    let o = analyze(&a, &[]);
    assert_eq!(code(&o), 1, "{}", text(&o.stderr));
    let doc = json(&o);
    for c in tensors(&doc) {
        let name = c["ggml_name"].as_str().unwrap();
        let qk = name.starts_with("Qcur-") || name.starts_with("Kcur-");
        assert_eq!(c["within"], !qk, "{c}");
    }

    // One tensor moved: exit 1, the first divergence names it.
    let bad = d.join("bad.safetensors");
    gguf_py::run_python_ok(
        HF_LAYOUT,
        [
            s(&python_dir()),
            s(&trace),
            s(&bad),
            "step1/model.layers.1.mlp:output".into(),
            heads,
            kv,
        ],
    );
    let o = offline(&bad, &[]);
    assert_eq!(code(&o), 1, "{}", text(&o.stderr));
    let doc = json(&o);
    let fd = &doc["first_divergence"];
    assert_eq!(fd["ggml_name"], "ffn_out-1", "{fd}");
    assert_eq!(fd["step"], 1, "{fd}");
    let out: Vec<&Value> = tensors(&doc)
        .iter()
        .filter(|c| c["within"] == false)
        .collect();
    // ffn_out-1 of step 1, and nothing else: the reference moved only there.
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0]["ggml_name"], "ffn_out-1");

    // Live: the reference's tokens replayed, the mapped nodes traced without
    // --tensor-filter; the same computation, so exact again.
    let mut a = llama(&model);
    a.extend(["--reference", &s(&hf), "--map", &s(&map), "--json"].map(String::from));
    let o = analyze(&a, &[]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let doc = json(&o);
    let t = tensors(&doc);
    assert_eq!(t.len(), 48, "{doc}");
    for c in t {
        assert_eq!(c["metrics"]["max_abs"], 0.0, "{c}");
    }
    let mut a = llama(&model);
    a.extend(["--reference", &s(&bad), "--map", &s(&map)].map(String::from));
    let o = analyze(&a, &[]);
    assert_eq!(code(&o), 1, "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(
        out.contains("First divergence: step 1, layer 1: ffn_out-1"),
        "{out}"
    );
}

#[test]
fn a_gguf_reader_export_round_trips_as_a_reference() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = d.join("tiny.gguf");
    tiny_llama::write_model(&model, &tiny_llama::TinyLlamaConfig::default()).unwrap();
    let trace = d.join("trace.gguf");
    let mut args = llama(&model);
    args.extend(["--tensor-filter", ".", "--save-gguf", &s(&trace)].map(String::from));
    let t = crate::first_divergence::run_monitor(args);
    let export = d.join("export.safetensors");
    gguf_reader::export::export(&t, &export, false).unwrap();
    let map = d.join("map.toml");
    std::fs::write(
        &map,
        "format = 1\n\n[[tensor]]\nreference = \"step{S}/layer{L}/kqv_out\"\nrole = \"kqv_out\"\n\n\
         [[tensor]]\nreference = \"step{S}/{N}\"\nnode = \"{N}\"\n",
    )
    .unwrap();
    let run = |reference: &Path| {
        let a: Vec<String> = ["--reference", &s(reference), "--map", &s(&map)]
            .into_iter()
            .chain(["--current", &s(&trace), "--json"])
            .map(String::from)
            .collect();
        analyze(&a, &[])
    };
    let o = run(&export);
    assert_eq!(code(&o), 0, "{}\n{}", text(&o.stderr), text(&o.stdout));
    let doc = json(&o);
    let n_kqv = t
        .tensors
        .iter()
        .filter(|x| x.meta.role == trace_format::Role::KqvOut)
        .count();
    let n_nodes = t
        .nodes
        .iter()
        .filter(|x| gguf_io::quant::can_dequantize(x.meta.layout.ty))
        .count();
    assert_eq!(
        tensors(&doc).len(),
        n_kqv + n_nodes,
        "every node and kqv_out"
    );
    for c in tensors(&doc) {
        assert_eq!(c["metrics"]["max_abs"], 0.0, "{c}");
    }
    // The other attention tensors the export holds (q, k, v, mask, attn) are not mapped:
    // said in a note, not compared.
    assert!(
        doc["notes"].to_string().contains("match no --map entry"),
        "{}",
        doc["notes"]
    );

    // Qcur-1's third occurrence (the roped Q) moved in the export: exit 1, named.
    let bad = d.join("bad.safetensors");
    gguf_py::run_python_ok(PERTURB, [s(&export), s(&bad), "step0/Qcur-1#2".into()]);
    let o = run(&bad);
    assert_eq!(code(&o), 1, "{}", text(&o.stderr));
    let doc = json(&o);
    let out: Vec<&Value> = tensors(&doc)
        .iter()
        .filter(|c| c["within"] == false)
        .collect();
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0]["ggml_name"], "Qcur-1#2", "{}", out[0]);
    assert_eq!(out[0]["step"], 0);
}

#[test]
fn bad_maps_and_files_are_one_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let trace = d.join("t.gguf");
    std::fs::write(&trace, b"unused").unwrap();
    let good_ref = d.join("r.safetensors");
    gguf_py::run_python_ok(
        "import sys, numpy as np\nfrom safetensors.numpy import save_file\n\
         save_file({'step0/layers.0.out': np.zeros((1, 3, 8), np.float32)}, sys.argv[1])",
        [s(&good_ref)],
    );
    let cases: Vec<(&str, String, &str)> = vec![
        ("not toml", "format = = 1".into(), "--map"),
        ("unknown key", "format = 1\n[[tensor]]\nreference = \"a\"\nrole = \"kqv_out\"\nflip = true\n".into(), "unknown field"),
        ("format 2", "format = 2\n[[tensor]]\nreference = \"a\"\nnode = \"x\"\n".into(), "format 2"),
        ("no entries", "format = 1\n".into(), "no [[tensor]] entries"),
        ("role q", "format = 1\n[[tensor]]\nreference = \"s{S}/{L}\"\nrole = \"q\"\n".into(), "cannot be mapped"),
        ("both", "format = 1\n[[tensor]]\nreference = \"s{S}/{L}\"\nrole = \"kqv_out\"\nnode = \"x\"\n".into(), "exactly one"),
        ("bad permute", "format = 1\n[[tensor]]\nreference = \"step{S}/layers.{L}.out\"\nnode = \"x-{L}\"\npermute = [0, 0, 1]\n".into(), "not a permutation"),
        ("no match", "format = 1\n[[tensor]]\nreference = \"other{S}\"\nnode = \"x\"\n".into(), "no tensor matches"),
        ("wrong axes", "format = 1\n[[tensor]]\nreference = \"step{S}/layers.{L}.out\"\nnode = \"x-{L}\"\npermute = [1, 0]\n".into(), "is for 2 axes"),
        ("bad reshape", "format = 1\n[[tensor]]\nreference = \"step{S}/layers.{L}.out\"\nnode = \"x-{L}\"\nreshape = [5, -1]\n".into(), "cannot be reshaped"),
    ];
    for (what, body, needle) in cases {
        let map = d.join("m.toml");
        std::fs::write(&map, body).unwrap();
        let a: Vec<String> = [
            "--reference",
            &s(&good_ref),
            "--map",
            &s(&map),
            "--current",
            &s(&trace),
        ]
        .map(String::from)
        .to_vec();
        let o = analyze(&a, &[]);
        let err = text(&o.stderr);
        assert_eq!(code(&o), 2, "{what}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{what}: {err}");
        assert!(err.contains(needle), "{what}: {err}");
    }
    // A truncated reference file, a missing one, and a safetensors file without a map.
    let map = d.join("m.toml");
    std::fs::write(
        &map,
        "format = 1\n[[tensor]]\nreference = \"step{S}/{N}\"\nnode = \"{N}\"\n",
    )
    .unwrap();
    let bytes = std::fs::read(&good_ref).unwrap();
    let cut = d.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 5]).unwrap();
    for (r, needle) in [
        (s(&cut), "not a valid safetensors file"),
        (s(&d.join("missing.safetensors")), "missing.safetensors"),
    ] {
        let a: Vec<String> = [
            "--reference",
            &r,
            "--map",
            &s(&map),
            "--current",
            &s(&trace),
        ]
        .map(String::from)
        .to_vec();
        let o = analyze(&a, &[]);
        let err = text(&o.stderr);
        assert_eq!(code(&o), 2, "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{err}");
    }
    let a: Vec<String> = ["--reference", &s(&good_ref), "--current", &s(&trace)]
        .map(String::from)
        .to_vec();
    let o = analyze(&a, &[]);
    assert_eq!(code(&o), 2);
    assert!(
        text(&o.stderr).contains("needs --map"),
        "{}",
        text(&o.stderr)
    );
}
