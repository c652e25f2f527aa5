//! `gguf-reader TRACE --export FILE.safetensors` read back by the PyPI `safetensors`
//! package with numpy (the Python ecosystem's own reader, not ours): a tiny LLaMA traced
//! with a q8_0 cache and `--logits`, in both storages. Every traced tensor and logits row
//! is in the file under `step{S}/layer{L}/{role}` (`step{S}/logits`), with ggml's `ne`
//! reversed as its shape, and its values equal the Rust reader's `TraceFile::f32` bit for
//! bit (with `--export-raw`: its logical bytes, F16 as float16, q8_0 as raw blocks); the
//! metadata carries the run and the per-tensor table; the version-1 and version-2 traces
//! of the same run export the same tensors. Bad requests fail in one line and leave no
//! file behind.

use std::path::Path;
use std::process::Command;

use gguf_io::GgmlType;
use test_support::gguf_py::run_python_ok;
use trace_format::TraceFile;

use crate::storage::{args, both, tiny_hd32};

const READER: &str = env!("CARGO_BIN_EXE_gguf-reader");

/// Load with safetensors.numpy; for each entry of the export's own table, in order, write
/// the array's bytes to `<dir>/<i>.bin`; print one JSON line per entry (name, dtype,
/// shape) and a last line with the metadata keys and the values kind.
const LOAD: &str = r#"
import sys, json, os
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file
path, out = sys.argv[1], sys.argv[2]
arrays = load_file(path)
with safe_open(path, framework="np") as f:
    meta = f.metadata()
table = json.loads(meta["kqv_trace.export.tensors"])
assert sorted(e["name"] for e in table) == sorted(arrays), "table and tensors differ"
for i, e in enumerate(table):
    a = arrays[e["name"]]
    with open(os.path.join(out, f"{i}.bin"), "wb") as f:
        f.write(np.ascontiguousarray(a).tobytes())
    print(json.dumps({"name": e["name"], "dtype": str(a.dtype), "shape": list(a.shape),
                      "type": e["type"], "ne": e["ne"], "step": e["step"], "layer": e["layer"],
                      "role": e["role"]}))
print(json.dumps({"keys": sorted(meta), "values": meta["kqv_trace.export.values"],
                  "arch": json.loads(meta["kqv_trace.run.architecture"])}))
"#;

/// numpy's np.load of the .npz at argv[2] against safetensors' load of argv[1]: the same
/// names, shapes, dtypes and values (bit for bit), and the same metadata.
const NPZ_SAME: &str = r#"
import sys, json
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file
st = load_file(sys.argv[1])
with safe_open(sys.argv[1], framework="np") as f:
    st_meta = f.metadata()
z = np.load(sys.argv[2])
meta = json.loads(bytes(z["__metadata__"]).decode())
names = [k for k in z.files if k != "__metadata__"]
assert sorted(names) == sorted(st), (sorted(names)[:5], sorted(st)[:5])
for k in names:
    a, b = z[k], st[k]
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape, (k, a.dtype, b.dtype, a.shape, b.shape)
    assert a.tobytes() == b.tobytes(), k
assert meta == st_meta, sorted(set(meta) ^ set(st_meta))
print(len(names), "arrays equal")
"#;

fn reader(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(READER).args(args).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Export `trace` (raw or not) and check what Python reads against the Rust reader.
fn check(trace_path: &Path, raw: bool, dir: &Path) -> Vec<(String, Vec<u8>)> {
    let label = format!(
        "{}{}",
        trace_path.file_stem().unwrap().to_string_lossy(),
        if raw { "-raw" } else { "" }
    );
    let dest = dir.join(format!("{label}.safetensors"));
    let mut a = vec![
        trace_path.to_str().unwrap(),
        "--export",
        dest.to_str().unwrap(),
    ];
    if raw {
        a.push("--export-raw");
    }
    let (code, out, err) = reader(&a);
    assert_eq!(code, 0, "{err}");
    let t = TraceFile::open(trace_path).unwrap();
    let n = t.tensors.len() + t.logits.len() + t.nodes.len();
    assert!(out.contains(&format!("{n} tensors")), "{out}");
    let dump = dir.join(format!("{label}-dump"));
    std::fs::create_dir_all(&dump).unwrap();
    let printed = run_python_ok(LOAD, [dest.as_os_str(), dump.as_os_str()]);
    let lines: Vec<serde_json::Value> = printed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), n + 1, "{printed}");
    let last = &lines[n];
    assert_eq!(last["values"], if raw { "raw" } else { "f32" });
    assert_eq!(last["arch"], "llama");
    let keys: Vec<&str> = last["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    for k in ["kqv_trace.format_version", "kqv_trace.run.n_layer"] {
        assert!(keys.contains(&k), "{k} missing from {keys:?}");
    }
    let mut got = Vec::new();
    let mut roles = std::collections::BTreeSet::new();
    let mut node_names: std::collections::HashMap<String, usize> = Default::default();
    for (i, tt) in t
        .tensors
        .iter()
        .chain(&t.logits)
        .chain(&t.nodes)
        .enumerate()
    {
        let e = &lines[i];
        let name = e["name"].as_str().unwrap().to_owned();
        let is_logits = i >= t.tensors.len() && i < t.tensors.len() + t.logits.len();
        let expected_name = if tt.meta.role == trace_format::Role::Node {
            // `step{S}/{ggml name}`, `#k` for occurrence k >= 1 (from 0) of a name in a step.
            let base = format!("step{}/{}", tt.meta.step, tt.meta.ggml_name);
            let k = node_names.entry(base.clone()).or_insert(0);
            *k += 1;
            if *k == 1 {
                base
            } else {
                format!("{base}#{}", *k - 1)
            }
        } else if is_logits {
            format!("step{}/logits", tt.meta.step)
        } else {
            format!(
                "step{}/layer{}/{}",
                tt.meta.step,
                tt.meta.layer,
                tt.meta.role.name()
            )
        };
        assert_eq!(name, expected_name, "tensor {i}");
        roles.insert(tt.meta.role.name());
        let ne = tt.meta.layout.ne;
        let rev: Vec<u64> = ne.iter().rev().copied().collect();
        let shape: Vec<u64> = e["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let bytes = std::fs::read(dump.join(format!("{i}.bin"))).unwrap();
        let ty = tt.meta.ty();
        if !raw || ty == GgmlType::F32 {
            assert_eq!(shape, rev, "{name}");
            assert_eq!(e["dtype"], "float32", "{name}");
            let values: Vec<u8> = t
                .f32(tt)
                .unwrap()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            assert!(values == bytes, "{name}: values differ");
        } else {
            let logical = t.data(tt);
            assert!(logical.as_ref() == bytes.as_slice(), "{name}: bytes differ");
            if ty == GgmlType::F16 {
                assert_eq!(e["dtype"], "float16", "{name}");
                assert_eq!(shape, rev, "{name}");
            } else {
                assert_eq!(e["dtype"], "uint8", "{name}");
                assert_eq!(&shape[..3], &rev[..3], "{name}");
                assert_eq!(shape[3] * ne[1] * ne[2] * ne[3], bytes.len() as u64);
            }
        }
        assert_eq!(e["type"], ty.name(), "{name}");
        got.push((name, bytes));
    }
    // The attention group's six inputs, its output and the logits are all there.
    for r in ["q", "k", "v", "mask", "kqv_out"] {
        assert!(roles.iter().any(|x| *x == r), "{r} not exported: {roles:?}");
    }
    assert!(!t.logits.is_empty());
    assert!(roles.contains("node"), "no node exported: {roles:?}");
    got
}

#[test]
fn export_reads_back_with_pypi_safetensors_in_both_storages() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = tiny_hd32(d);
    let (full, delta) = both(
        d,
        "q8",
        &args(&model)
            .cache("q8_0", "q8_0")
            .flash(true)
            .arg("--logits")
            // Nodes too: Qcur-<l> repeats in a step, cache_k views are q8_0 blocks.
            .args(["--tensor-filter", "Qcur|ffn_out|cache_k"])
            .build(),
    );
    // The cache is q8_0 (raw export: blocks) and the mask F16 (raw export: float16).
    let types: std::collections::BTreeSet<GgmlType> = TraceFile::open(&delta)
        .unwrap()
        .tensors
        .iter()
        .map(|t| t.meta.ty())
        .collect();
    assert!(
        types.contains(&GgmlType::Q8_0) && types.contains(&GgmlType::F16),
        "{types:?}"
    );
    let a = check(&full, false, d);
    let b = check(&delta, false, d);
    assert!(a == b, "version 1 and version 2 export different tensors");
    let raw = check(&delta, true, d);
    assert_eq!(raw.len(), a.len());
    // The .npz export, read by numpy's own np.load: the same arrays as the safetensors
    // export (checked above against the Rust reader), and the same metadata.
    let st = d.join("same.safetensors");
    let npz = d.join("same.npz");
    for dest in [&st, &npz] {
        let (code, out, err) =
            reader(&[delta.to_str().unwrap(), "--export", dest.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains(&format!("{} tensors", a.len())), "{out}");
    }
    let out = run_python_ok(NPZ_SAME, [st.to_str().unwrap(), npz.to_str().unwrap()]);
    assert_eq!(out.trim(), format!("{} arrays equal", a.len()));
    eprintln!(
        "{} tensors exported from each storage, values and raw",
        a.len()
    );
}

#[test]
fn bad_export_requests_fail_in_one_line_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = tiny_hd32(d);
    let (_, delta) = both(d, "t", &args(&model).build());
    let t = delta.to_str().unwrap();
    // Not a .safetensors name: refused before anything is written.
    let npy = d.join("x.npy");
    let (code, _, err) = reader(&[t, "--export", npy.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("must end in .safetensors or .npz"), "{err}");
    assert!(!npy.exists());
    // Raw blocks are a safetensors thing.
    let npz = d.join("x.npz");
    let (code, _, err) = reader(&[t, "--export", npz.to_str().unwrap(), "--export-raw"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("--export-raw writes .safetensors only"),
        "{err}"
    );
    assert!(!npz.exists());
    // --export-raw alone is a usage error.
    let (code, _, err) = reader(&[t, "--export-raw"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--export-raw needs --export"), "{err}");
    // A directory that does not exist: one line, nothing written.
    let missing = d.join("no/such/dir/x.safetensors");
    let (code, _, err) = reader(&[t, "--export", missing.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    // A model (not a trace): one line, and an existing file at the destination survives.
    let dest = d.join("keep.safetensors");
    std::fs::write(&dest, b"precious").unwrap();
    let (code, _, err) = reader(&[model.to_str().unwrap(), "--export", dest.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(std::fs::read(&dest).unwrap(), b"precious");
}
