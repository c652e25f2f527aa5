//! The pure-Python trace module (`python/kqv_trace.py`, on gguf-py and numpy) against the
//! Rust reader on the same files: for runs traced with `--kv-storage full` and the default
//! delta storage (tiny LLaMA with flash attention on and `--logits`, off (V transposed), a
//! q8_0 cache, Gemma 3 over more tokens than its sliding-window cache has cells (the ring
//! wraps) and the mixed KV cache), every tensor's logical bytes from the module equal
//! `TraceFile::data`'s, its dequantized values equal `TraceFile::f32` bit for bit, its
//! metadata (role, layer, step, type, ne, nb, how it is stored) is the Rust reader's, and
//! version 1 and version 2 of the same run give identical arrays. Hostile version-2 files
//! (test_support::hostile's storage lies and a few more) each raise `ValueError`, and a
//! synthetic chain of 1,500 deltas reads (no recursion limit), each step in order costing
//! one delta.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use gguf_io::{Array, GgmlType, Metadata};
use test_support::gguf_py::run_python_ok;
use test_support::hostile::{self, Editable, Expect};
use test_support::LlamaArgs;
use tiny_llama::zoo::Arch;
use trace_format::{
    keys, synth, Revision, Role, RunMeta, Stored, TensorLayout, TensorMeta, TraceFile, TraceWriter,
};

use crate::storage::{args, both, tiny, tiny_hd32, PROMPT};

fn module_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../python")
}

/// Dump a trace with the module into `sys.argv[3]`: per tensor `<index>.bytes` (its logical
/// bytes) and `<index>.f32` (its values dequantized, as little-endian f32), per logits row
/// `logits-<step>.f32`; one JSON line per tensor and a last JSON line with the run on
/// stdout. Checks the module's own consistency on the way: raw arrays hold the logical
/// bytes, shapes are ne reversed, `find`/`tensor` agree with the table, `stream` and a
/// fresh reader read backwards give the same bytes, and reading in table order costs at
/// most one delta per tensor.
const DUMP: &str = r#"
import sys, json, os
sys.path.insert(0, sys.argv[1])
import numpy as np, kqv_trace
from gguf.constants import GGMLQuantizationType as Q
t = kqv_trace.open(sys.argv[2]); out = sys.argv[3]
seen = {}
for ti in t.tensors:
    raw = t.data(ti.index)
    assert raw.dtype == np.uint8 and raw.ndim == 1 and raw.size == ti.n_bytes, ti
    a = t.array(ti.index)
    r = t.array(ti.index, dequantize=False)
    assert a.shape == ti.shape == tuple(reversed(ti.ne)), (ti, a.shape)
    assert r.tobytes() == raw.tobytes(), ti.name
    if ti.type == Q.F32: assert a.dtype == np.float32
    elif ti.type == Q.F16: assert a.dtype == np.float16
    else: assert a.dtype == np.float32 and r.dtype == np.uint8, (ti, a.dtype, r.dtype)
    first = t.find(ti.role, ti.layer, ti.step)
    if first.index == ti.index:
        assert np.array_equal(t.tensor(ti.role, ti.layer, ti.step), a, equal_nan=True), ti.name
    seen[ti.index] = raw.tobytes()
    with open(os.path.join(out, f"{ti.index}.bytes"), "wb") as f: f.write(raw.tobytes())
    with open(os.path.join(out, f"{ti.index}.f32"), "wb") as f:
        f.write(np.ascontiguousarray(a, dtype="<f4").tobytes())
    if ti.role == "logits":
        l = t.logits(ti.step)
        assert l.shape == (ti.ne[0],) and l.dtype == np.float32
        with open(os.path.join(out, f"logits-{ti.step}.f32"), "wb") as f: f.write(l.astype("<f4").tobytes())
    print(json.dumps(dict(index=ti.index, name=ti.name, role=ti.role, layer=ti.layer, step=ti.step,
        type=ti.type.name.lower(), ne=list(ti.ne), nb=list(ti.nb), stored=ti.stored, base=ti.base,
        n_ranges=ti.n_ranges, ggml_name=ti.ggml_name, op=ti.op, view_of=ti.view_of,
        graph_order=ti.graph_order)))
n_read = len(t.tensors)
assert t.deltas_applied <= n_read, (t.deltas_applied, n_read)
# A fresh reader backwards (each read from the nearest tensor stored whole), then streams.
u = kqv_trace.open(sys.argv[2])
for ti in reversed(u.tensors):
    assert u.data(ti.index).tobytes() == seen[ti.index], ("backwards", ti.name)
v = kqv_trace.open(sys.argv[2])
for role, layer in sorted({(ti.role, ti.layer) for ti in v.tensors}):
    steps = []
    for ti, a in v.stream(role, layer, dequantize=False):
        assert (ti.role, ti.layer) == (role, layer)
        assert a.tobytes() == seen[ti.index], ("stream", ti.name)
        steps.append(ti.step)
    assert steps == sorted(steps), (role, layer, steps)
print(json.dumps(dict(run=dict(format_version=t.format_version, complete=t.complete,
    n_steps=len(t.steps), sampled=t.sampled, positions=[p for s in t.steps for p in s.positions],
    n_layer=t.run.get("n_layer"), architecture=t.run.get("architecture"),
    flash_attn=t.run.get("flash_attn"), cache_type_k=t.run.get("cache_type_k"),
    cache_type_v=t.run.get("cache_type_v"), mixed_kv_cache=t.run.get("mixed_kv_cache", False),
    deltas_applied=t.deltas_applied))))
"#;

fn stored_name(s: Stored) -> (&'static str, i64, u64) {
    match s {
        Stored::Whole => ("whole", -1, 0),
        Stored::Delta {
            base, n_ranges: 0, ..
        } => ("same", base as i64, 0),
        Stored::Delta { base, n_ranges, .. } => ("delta", base as i64, n_ranges as u64),
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Dump `trace` with the module into `dir` and check every tensor against the Rust
/// reader. Returns the module's manifest lines (without how each is stored).
fn compare(label: &str, trace: &Path, dir: &Path) -> Vec<serde_json::Value> {
    std::fs::create_dir_all(dir).unwrap();
    let out = run_python_ok(
        DUMP,
        [module_dir().as_os_str(), trace.as_os_str(), dir.as_os_str()],
    );
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{label}: {e}: {l}")))
        .collect();
    let (run, tensors) = lines.split_last().expect("a run line");
    let run = &run["run"];
    let t = TraceFile::open(trace).unwrap();
    let all: Vec<_> = t.tensors.iter().chain(&t.logits).chain(&t.nodes).collect();
    assert_eq!(tensors.len(), all.len(), "{label}: tensor count");
    assert_eq!(tensors.len(), t.gguf().tensors().len(), "{label}");
    let by_index: BTreeMap<usize, _> = all.iter().map(|tt| (tt.index, *tt)).collect();
    let mut manifest = Vec::new();
    for m in tensors {
        let i = m["index"].as_u64().unwrap() as usize;
        let tt = by_index[&i];
        let l = &tt.meta.layout;
        let what = format!("{label}: #{i} {}", tt.name);
        assert_eq!(m["name"], tt.name.as_str(), "{what}");
        assert_eq!(m["role"], tt.meta.role.name(), "{what}");
        assert_eq!(m["layer"], tt.meta.layer, "{what}");
        assert_eq!(m["step"], tt.meta.step, "{what}");
        assert_eq!(m["type"], l.ty.name(), "{what}");
        assert_eq!(m["ne"], serde_json::json!(l.ne), "{what}");
        assert_eq!(m["nb"], serde_json::json!(l.nb), "{what}");
        assert_eq!(m["ggml_name"], tt.meta.ggml_name.as_str(), "{what}");
        assert_eq!(m["op"], tt.meta.op.as_str(), "{what}");
        assert_eq!(m["view_of"], tt.meta.view_of.as_str(), "{what}");
        let order = tt.graph_order.map_or(-1, i64::from);
        assert_eq!(m["graph_order"], order, "{what}");
        let (kind, base, n_ranges) = stored_name(t.stored(i));
        assert_eq!(m["stored"], kind, "{what}");
        assert_eq!(m["base"], base, "{what}");
        assert_eq!(m["n_ranges"], n_ranges, "{what}");
        let bytes = std::fs::read(dir.join(format!("{i}.bytes"))).unwrap();
        assert!(
            bytes == *t.data(tt),
            "{what}: the module's bytes are not TraceFile::data's"
        );
        let f = std::fs::read(dir.join(format!("{i}.f32"))).unwrap();
        let want = f32_bytes(&t.f32(tt).unwrap());
        assert!(
            f == want,
            "{what}: the module's values are not TraceFile::f32's"
        );
        let mut m = m.clone();
        for k in ["stored", "base", "n_ranges"] {
            m.as_object_mut().unwrap().remove(k);
        }
        manifest.push(m);
    }
    for lt in &t.logits {
        let f = std::fs::read(dir.join(format!("logits-{}.f32", lt.meta.step))).unwrap();
        assert!(
            f == f32_bytes(&t.f32(lt).unwrap()),
            "{label}: logits of step {}",
            lt.meta.step
        );
    }
    assert_eq!(run["format_version"], t.format_version, "{label}");
    assert_eq!(run["n_steps"], t.steps.len(), "{label}");
    assert_eq!(run["sampled"], serde_json::json!(t.sampled), "{label}");
    let positions: Vec<i32> = t.steps.iter().flat_map(|s| s.positions.clone()).collect();
    assert_eq!(run["positions"], serde_json::json!(positions), "{label}");
    assert_eq!(run["n_layer"], t.run.n_layer, "{label}");
    assert_eq!(run["architecture"], t.run.architecture.as_str(), "{label}");
    assert_eq!(run["flash_attn"], t.run.flash_attn.as_str(), "{label}");
    assert_eq!(run["mixed_kv_cache"], t.run.mixed_kv_cache, "{label}");
    assert_eq!(run["cache_type_k"], t.run.cache_type_k.as_str(), "{label}");
    assert_eq!(run["cache_type_v"], t.run.cache_type_v.as_str(), "{label}");
    eprintln!(
        "{label}: {} tensors match, {} deltas applied reading them in order",
        tensors.len(),
        run["deltas_applied"]
    );
    manifest
}

/// The run traced both ways, each file dumped by the module and checked against the Rust
/// reader; version 1 and version 2 give the same tensors, bytes and values.
fn check(dir: &Path, label: &str, a: Vec<String>) -> TraceFile {
    let (full, delta) = both(dir, label, &a);
    let d1 = dir.join(format!("{label}-py-full"));
    let d2 = dir.join(format!("{label}-py-delta"));
    let m1 = compare(&format!("{label} full"), &full, &d1);
    let m2 = compare(&format!("{label} delta"), &delta, &d2);
    assert_eq!(m1, m2, "{label}: the two storages list other tensors");
    let mut files: Vec<_> = std::fs::read_dir(&d1)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    files.sort();
    assert!(!files.is_empty());
    for f in &files {
        assert!(
            std::fs::read(d1.join(f)).unwrap() == std::fs::read(d2.join(f)).unwrap(),
            "{label}: {f:?} differs between version 1 and version 2"
        );
    }
    let v2 = TraceFile::open(&delta).unwrap();
    assert_eq!(v2.format_version, 2);
    let n = v2.gguf().tensors().len();
    assert!(
        (0..n).any(|i| matches!(v2.stored(i), Stored::Delta { n_ranges: 1.., .. })),
        "{label}: no delta with changes to rebuild"
    );
    v2
}

#[test]
fn the_module_reads_llama_traces_as_the_rust_reader_does() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let t = check(
        dir.path(),
        "fa-on",
        args(&model).flash(true).arg("--logits").build(),
    );
    assert!(!t.logits.is_empty(), "--logits wrote no logits");
    // With --tensor-filter nodes (Qcur-<l> repeats in a step): listed with their graph order.
    let t = check(
        dir.path(),
        "fa-off",
        args(&model)
            .flash(false)
            .args(["--tensor-filter", "Qcur|ffn_out"])
            .build(),
    );
    assert!(t.nodes.len() > t.steps.len(), "no nodes traced");
    let (k, v) = (
        t.find(Role::K, 0, 0).unwrap(),
        t.find(Role::V, 0, 0).unwrap(),
    );
    assert_eq!(
        v.meta.layout.ne[0], k.meta.layout.ne[1],
        "V is not transposed (cells first) without flash attention"
    );
    let hd32 = tiny_hd32(dir.path());
    let t = check(
        dir.path(),
        "q8_0",
        args(&hd32).flash(true).cache("q8_0", "q8_0").build(),
    );
    assert_eq!(
        t.find(Role::K, 0, 0).unwrap().meta.layout.ty,
        GgmlType::Q8_0
    );
}

/// Gemma 3's sliding-window layers keep a cache of 256 cells (a window of 16 plus a
/// ubatch, padded): over more positions than that the ring wraps and old cells are
/// overwritten.
#[test]
fn the_module_reads_gemma3_with_a_wrapped_window_and_the_mixed_cache() {
    if ggml_trace::skip_without_mixed_kv(
        "the_module_reads_gemma3_with_a_wrapped_window_and_the_mixed_cache",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let gemma = tiny_llama::zoo::write_zoo_model(dir.path(), Arch::Gemma3).unwrap();
    let prompt = PROMPT.repeat(8);
    let a = LlamaArgs::new(&gemma, &prompt)
        .n(6)
        .ubatch(16)
        .threads(2)
        .greedy()
        .flash(true)
        .build();
    let t = check(dir.path(), "gemma3-wrap", a);
    let last = t.steps.iter().flat_map(|s| &s.positions).max().copied();
    let last = last.unwrap_or(0) as u64;
    assert!(last > 300, "the window does not wrap: last position {last}");
    // A sliding-window layer's K view at the last step has fewer cells than positions
    // were written: the ring has wrapped (and its deltas overwrite old cells).
    let last_step = t.steps.len() as u32 - 1;
    let swa_cells = (0..t.run.n_layer as i32)
        .filter_map(|l| t.find(Role::K, l, last_step))
        .map(|x| x.meta.layout.ne[1])
        .min()
        .unwrap();
    assert!(
        swa_cells <= 256 && swa_cells < last + 1,
        "{swa_cells} cells, {last}"
    );

    let model = tiny_hd32(dir.path());
    let prompt = PROMPT.repeat(2);
    let a = LlamaArgs::new(&model, &prompt)
        .n(12)
        .ubatch(16)
        .threads(2)
        .greedy()
        .args([
            "--mixed-kv-cache",
            "--mixed-hot-window",
            "16",
            "--mixed-cold-type",
            "q4_0",
        ])
        .build();
    let t = check(dir.path(), "mixed", a);
    assert!(t.tensors.iter().any(|x| x.meta.role == Role::KQuant));
}

/// Open and read every tensor of each file; print per file `OK` or the exception's type
/// and message (one line each).
const OPEN_ALL: &str = r#"
import sys
sys.path.insert(0, sys.argv[1])
import kqv_trace
for p in sys.argv[2:]:
    try:
        t = kqv_trace.open(p)
        for ti in t.tensors:
            t.array(ti.index)
        print("OK")
    except Exception as e:
        print(type(e).__name__ + "\t" + str(e).replace("\n", "\\n"))
"#;

fn without(e: &Editable, key: &str) -> Editable {
    let mut e = e.clone();
    let mut m = Metadata::new();
    for (k, v) in e.metadata.iter().filter(|(k, _)| *k != key) {
        m.set(k, v.clone());
    }
    e.metadata = m;
    e
}

#[test]
fn the_module_refuses_hostile_version_2_files_with_value_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let (_, delta) = both(dir.path(), "honest", &args(&model).flash(true).build());
    let bytes = std::fs::read(&delta).unwrap();
    let mut cases: Vec<(String, Vec<u8>, Expect)> = hostile::delta_cases(&bytes)
        .unwrap()
        .into_iter()
        .map(|c| (c.name.to_string(), c.bytes, c.expect))
        .collect();
    assert_eq!(cases[0].2, Expect::Success);

    // More lies about the storage keys.
    let e = Editable::from_bytes(&bytes).unwrap();
    let bases = e.i64s(keys::TENSOR_BASE);
    let counts = e.i64s(keys::TENSOR_N_RANGES);
    let d = (0..bases.len()).find(|&i| counts[i] > 0).unwrap();
    let r = 2 * counts[..d].iter().sum::<i64>() as usize;
    let whole = (0..bases.len()).find(|&i| bases[i] == -1).unwrap();
    let mut more: Vec<(&str, Editable)> = vec![
        ("missing_base", without(&e, keys::TENSOR_BASE)),
        ("missing_ranges", without(&e, keys::TENSOR_RANGES)),
    ];
    let mut x = e.clone();
    x.metadata
        .set(keys::TENSOR_BASE, Array::U32(vec![0; bases.len()]));
    more.push(("base_not_int32", x));
    let mut x = e.clone();
    x.metadata.set(keys::TENSOR_BASE, Array::I32(vec![-1; 3]));
    more.push(("base_short", x));
    let mut x = e.clone();
    x.set_int(keys::TENSOR_N_RANGES, d, counts[d] + 1);
    more.push(("n_ranges_too_many", x));
    let mut x = e.clone();
    x.set_int(keys::TENSOR_RANGES, r + 1, 0);
    more.push(("range_empty", x));
    let mut x = e.clone();
    x.set_int(keys::TENSOR_RANGES, r, i64::MAX);
    more.push(("range_offset_huge", x));
    let mut x = e.clone();
    x.set_int(keys::TENSOR_TYPE, whole, 999);
    more.push(("type_unknown", x));
    let mut x = e.clone();
    x.set_int(keys::TENSOR_NE, 4 * whole, 0);
    more.push(("ne_zero", x));
    let mut x = e.clone();
    x.metadata.set(keys::FORMAT_VERSION, 3u32);
    more.push(("format_version_3", x));
    let mut x = e.clone();
    x.set_int(keys::TENSOR_BASE, d, d as i64);
    more.push(("base_itself", x));
    for (name, x) in more {
        cases.push((name.to_string(), x.to_bytes().unwrap(), Expect::Refuse));
    }
    let mut cut = bytes.clone();
    cut.truncate(bytes.len() - 100);
    cases.push(("truncated".into(), cut, Expect::Refuse));

    let mut paths = Vec::new();
    for (name, b, _) in &cases {
        let p = dir.path().join(format!("{name}.gguf"));
        std::fs::write(&p, b).unwrap();
        paths.push(p);
    }
    let mut argv = vec![module_dir().into_os_string()];
    argv.extend(paths.iter().map(|p| p.clone().into_os_string()));
    let out = run_python_ok(OPEN_ALL, argv);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), cases.len(), "{out}");
    for ((name, _, expect), (line, p)) in cases.iter().zip(lines.iter().zip(&paths)) {
        // The Rust reader refuses each lie too (the module follows it).
        let rust = TraceFile::open(p);
        match expect {
            Expect::Success => {
                assert_eq!(*line, "OK", "{name}");
                assert!(rust.is_ok(), "{name}");
            }
            _ => {
                assert!(
                    line.starts_with("ValueError\t") && line.len() > 20,
                    "{name}: not a ValueError: {line}"
                );
                assert!(rust.is_err(), "{name}: the Rust reader accepts it");
                eprintln!("{name}: {line}");
            }
        }
    }
}

/// A version-2 trace of one K stream over 1,500 steps, each step three bytes in two
/// ranges changed against the step before: a chain of 1,499 deltas.
#[test]
fn the_module_reads_a_chain_of_1500_deltas() {
    const STEPS: u32 = 1500;
    let dir = tempfile::tempdir().unwrap();
    let mut w = TraceWriter::new().unwrap();
    for s in synth::steps(STEPS, 1) {
        w.add_step(s);
    }
    let ne = [32, 8, 1, 1];
    let mut k: Vec<u8> = (0..512u32).map(|i| (i * 7) as u8).collect();
    let mut want = Vec::new();
    for s in 0..STEPS {
        let since = if s == 0 {
            None
        } else {
            let at = (s as usize * 6) % 250;
            k[at] = k[at].wrapping_add(1).wrapping_add(s as u8);
            k[at + 1] ^= 0x5a;
            k[at + 256] = !k[at + 256];
            Some((u64::from(s), vec![at..at + 2, at + 256..at + 257]))
        };
        let meta = TensorMeta {
            role: Role::K,
            layer: 0,
            step: s,
            ggml_name: "cache_k_l0 (view) (permuted)".into(),
            op: "PERMUTE".into(),
            layout: TensorLayout::contiguous(GgmlType::F16, ne).unwrap(),
            view_of: String::new(),
        };
        let rev = Revision {
            id: u64::from(s) + 1,
            since,
        };
        w.add_tensor_revision(meta, &k, false, Some(&rev)).unwrap();
        want.extend_from_slice(&k);
    }
    let run = RunMeta {
        n_layer: 1,
        target_layer: -1,
        trace_sources: true,
        complete: true,
        ..RunMeta::default()
    };
    let path = dir.path().join("chain.gguf");
    w.finish_to_path(&run, &path).unwrap();
    let t = TraceFile::open(&path).unwrap();
    assert_eq!(t.format_version, 2);
    assert_eq!(t.tensors.len(), STEPS as usize);
    for (i, tt) in t.tensors.iter().enumerate() {
        assert_eq!(t.stored(i) == Stored::Whole, i == 0, "#{i}");
        assert!(*t.data(tt) == want[512 * i..512 * (i + 1)], "Rust, #{i}");
    }
    let expected = dir.path().join("expected.bin");
    std::fs::write(&expected, &want).unwrap();

    let script = r#"
import sys
sys.path.insert(0, sys.argv[1])
import kqv_trace, numpy as np
want = open(sys.argv[3], "rb").read()
n = 1500
# The last step first, with nothing rebuilt yet: a chain of 1,499 deltas, no recursion.
t = kqv_trace.open(sys.argv[2])
assert t.data(n - 1).tobytes() == want[512 * (n - 1):], "last"
assert t.deltas_applied == n - 1, t.deltas_applied
# In order: one delta each.
t = kqv_trace.open(sys.argv[2])
for i, (ti, a) in enumerate(t.stream("k", 0)):
    assert ti.step == i and a.dtype == np.float16 and a.shape == (1, 1, 8, 32)
    assert a.tobytes() == want[512 * i:512 * (i + 1)], i
assert t.deltas_applied == n - 1, t.deltas_applied
print("read", n, "steps,", t.deltas_applied, "deltas applied")
"#;
    let out = run_python_ok(
        script,
        [
            module_dir().as_os_str(),
            path.as_os_str(),
            expected.as_os_str(),
        ],
    );
    assert!(out.contains("1499 deltas applied"), "{out}");
}
