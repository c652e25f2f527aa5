//! Planted bugs: a real trace of the generated tiny LLaMA (2 layers, 4 query heads over 2
//! KV heads, head_dim 16) is rewritten with gguf-io the way a buggy tracer or reader would
//! have produced it, one bug per test, and verification must fail for the planted
//! (step, layer) only, with the diagnosis naming the input that was corrupted, through the
//! library and through `gguf-reader --verify-attention` (exit 1).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use test_support::storage::KvStorage;
use test_support::LlamaArgs;

use attn_verify::{check_in_trace, Checked, Suspect};
use gguf_io::{Array, HeaderSpec, Value};
use trace_format::{keys, Role, TraceFile};

const BIN: &str = env!("CARGO_BIN_EXE_kqv-trace-monitor");
/// 43 prompt tokens in ubatches of 16 (steps 0, 1, 2), then 3 generated tokens (3, 4, 5).
const PROMPT: &str = "The quick brown fox jumps over a lazy dog";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A trace of the tiny model in the default storage (delta), made once per test binary
/// (`fa` = "on" or "off"). The bugs are planted into its version-1 bytes (materialized),
/// so every planted file is version 1 whatever the run wrote; the unplanted trace is
/// checked in both storages ([`good_trace_in`]).
fn good_trace(fa: &'static str) -> PathBuf {
    good_trace_in(fa, KvStorage::Delta)
}

/// [`good_trace`] written with `--kv-storage` `storage`.
fn good_trace_in(fa: &'static str, storage: KvStorage) -> PathBuf {
    static CELLS: [OnceLock<PathBuf>; 4] = [const { OnceLock::new() }; 4];
    let cell = &CELLS[usize::from(fa == "on") * 2 + usize::from(storage == KvStorage::Delta)];
    cell.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "planted-{}-{fa}-{}",
            std::process::id(),
            storage.name()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let model = dir.join("tiny.gguf");
        tiny_llama::write_model(&model, &tiny_llama::TinyLlamaConfig::default()).unwrap();
        let out = dir.join("good.gguf");
        let o = Command::new(BIN)
            .args(
                LlamaArgs::new(&model, PROMPT)
                    .n(3)
                    .ubatch(16)
                    .threads(2)
                    .greedy()
                    .arg("-fa")
                    .arg(fa)
                    .storage(storage)
                    .arg("--save-gguf")
                    .arg(out.to_str().unwrap())
                    .build(),
            )
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o.stderr));
        out
    })
    .clone()
}

/// Rewrite a trace with gguf-io: `edit` gets the header and every tensor's bytes.
fn plant(
    good: &Path,
    name: &str,
    edit: impl FnOnce(&TraceFile, &mut HeaderSpec, &mut Vec<Vec<u8>>),
) -> PathBuf {
    let trace = TraceFile::open(good).unwrap();
    // Every tensor whole (a version-2 trace materialized), so that edits see its bytes.
    let bytes = trace_format::materialize::full_bytes(good).unwrap();
    let planted =
        trace_format::synth::rewrite(&bytes, |spec, data| edit(&trace, spec, data)).unwrap();
    let out = good.with_file_name(format!("{name}.gguf"));
    std::fs::write(&out, planted).unwrap();
    out
}

fn index(t: &TraceFile, role: Role, step: u32, layer: i32) -> usize {
    t.find(role, layer, step).unwrap().index
}

/// Every group but (step, layer) passes; that one fails and is returned.
fn only_failure(path: &Path, step: u32, layer: i32) -> (TraceFile, Checked) {
    let t = TraceFile::open(path).unwrap();
    let mut planted = None;
    for &(s, l) in t.groups().keys() {
        let c = check_in_trace(&t, s, l).unwrap().into_result().unwrap();
        if (s, l) == (step, layer) {
            assert!(!c.pass, "the planted bug must fail: {c:?}");
            planted = Some(c);
        } else {
            assert!(c.pass, "step {s} layer {l} was not touched: {c:?}");
            assert!(c.findings.is_empty());
        }
    }
    (t, planted.expect("the planted group is in the trace"))
}

/// The diagnosis names exactly one input, `suspect`, and for a tensor its GGUF name.
fn assert_named(t: &TraceFile, c: &Checked, suspect: Suspect, step: u32, layer: i32) -> String {
    assert_eq!(
        c.findings.len(),
        1,
        "one input explains it: {:#?}",
        c.findings
    );
    let f = &c.findings[0];
    assert_eq!(f.suspect, suspect, "{f:?}");
    match suspect {
        Suspect::Tensor(role) => assert_eq!(f.tensor, t.find(role, layer, step).unwrap().name),
        Suspect::Scale => assert_eq!(f.tensor, keys::ATTN_SCALE),
        Suspect::Softcap => assert_eq!(f.tensor, keys::ATTN_SOFTCAP),
        Suspect::MaxBias => assert_eq!(f.tensor, keys::ATTN_MAX_BIAS),
    }
    f.to_string()
}

fn gguf_reader() -> PathBuf {
    test_support::workspace_bin("gguf-reader", "gguf-reader")
}

/// `gguf-reader TRACE --verify-attention`: exit 1, the planted group's row says FAIL and
/// the line under it names the suspect and its tensor.
fn reader_names(path: &Path, step: u32, layer: i32, suspect_line: &str) -> Output {
    let o = Command::new(gguf_reader())
        .args([path.to_str().unwrap(), "--verify-attention"])
        .output()
        .unwrap();
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}\n{}", text(&o.stderr));
    let lines: Vec<&str> = out.lines().collect();
    let row = lines
        .iter()
        .position(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.len() > 2 && w[0] == step.to_string() && w[1] == layer.to_string()
        })
        .unwrap_or_else(|| panic!("no row for step {step} layer {layer}:\n{out}"));
    assert!(lines[row].ends_with("FAIL"), "{}", lines[row]);
    assert_eq!(
        lines[row + 1].trim(),
        format!("suspect {suspect_line}"),
        "\n{out}"
    );
    assert_eq!(out.matches("FAIL").count(), 1, "{out}");
    assert!(
        out.contains("verified 11 of 12 (step, layer) groups: 1 failed"),
        "{out}"
    );
    o
}

#[test]
fn the_unplanted_trace_verifies_without_findings() {
    for fa in ["on", "off"] {
        for storage in test_support::storage::BOTH {
            let t = TraceFile::open(good_trace_in(fa, storage)).unwrap();
            assert_eq!(t.format_version, storage.format_version());
            assert_eq!(t.groups().len(), 12);
            for &(s, l) in t.groups().keys() {
                let c = check_in_trace(&t, s, l).unwrap().into_result().unwrap();
                assert!(
                    c.pass && c.findings.is_empty(),
                    "fa={fa} {}: {c:?}",
                    storage.name()
                );
            }
        }
    }
}

/// The seed's reader bug: the K cache view is [head_dim, n_kv, n_head_kv] over memory
/// ordered [head_dim, n_head_kv, n_kv]; reading that memory as if it were contiguous in
/// the order of its ne scrambles heads and cells.
#[test]
fn k_read_in_ne_order_is_named() {
    let (step, layer) = (1, 0);
    let path = plant(&good_trace("on"), "k-ne-order", |t, _, data| {
        let k = t.find(Role::K, layer, step).unwrap();
        let [d, n_kv, h, _] = k.meta.layout.ne.map(|x| x as usize);
        assert_eq!(
            k.meta.layout.memory_order(),
            [0, 2, 1, 3],
            "a permuted view"
        );
        let ts = 2; // f16
        let logical = &data[k.index];
        // Memory as ggml held it: [d, h, n_kv]; the buggy read takes it as [d, n_kv, h].
        let mut memory = vec![0u8; logical.len()];
        for j in 0..h {
            for c in 0..n_kv {
                let src = ((j * n_kv + c) * d) * ts;
                let dst = ((c * h + j) * d) * ts;
                memory[dst..dst + d * ts].copy_from_slice(&logical[src..src + d * ts]);
            }
        }
        assert_ne!(&memory, logical);
        data[k.index] = memory;
    });
    let (t, c) = only_failure(&path, step, layer);
    let line = assert_named(&t, &c, Suspect::Tensor(Role::K), step, layer);
    assert!(
        line.contains("read as if in ne order [head_dim, n_kv, n_head_kv]"),
        "{line}"
    );
    reader_names(&path, step, layer, &line);
}

#[test]
fn permuted_q_heads_are_named() {
    let (step, layer) = (2, 1);
    let path = plant(&good_trace("on"), "q-heads", |t, _, data| {
        let q = t.find(Role::Q, layer, step).unwrap();
        let [d, n_tok, h, _] = q.meta.layout.ne.map(|x| x as usize);
        let head = d * n_tok * 4; // f32 bytes of one head
        let old = data[q.index].clone();
        // Stored head j holds the real head j+1 (a rotation of the heads).
        for j in 0..h {
            let src = (j + 1) % h;
            data[q.index][j * head..(j + 1) * head]
                .copy_from_slice(&old[src * head..(src + 1) * head]);
        }
    });
    let (t, c) = only_failure(&path, step, layer);
    let line = assert_named(&t, &c, Suspect::Tensor(Role::Q), step, layer);
    // Output head h was computed from the real head h, now stored as head h-1.
    assert!(
        line.contains("heads permuted: output head h matches q head [3, 0, 1, 2][h]"),
        "{line}"
    );
    reader_names(&path, step, layer, &line);
}

/// V saved transposed: with flash attention (V is [Dv, n_kv, H]) and without it (the
/// traced V is the transposed view [n_kv, Dv, H], saved here untransposed).
#[test]
fn transposed_v_is_named() {
    for (fa, step, layer) in [("on", 4, 0), ("off", 1, 1)] {
        let path = plant(
            &good_trace(fa),
            &format!("v-transposed-{fa}"),
            |t, _, data| {
                let v = t.find(Role::V, layer, step).unwrap();
                let [a, b, h, _] = v.meta.layout.ne.map(|x| x as usize);
                let ts = 2;
                let old = data[v.index].clone();
                for j in 0..h {
                    for i1 in 0..b {
                        for i0 in 0..a {
                            let src = ((j * b + i1) * a + i0) * ts;
                            let dst = ((j * a + i0) * b + i1) * ts;
                            data[v.index][dst..dst + ts].copy_from_slice(&old[src..src + ts]);
                        }
                    }
                }
            },
        );
        let (t, c) = only_failure(&path, step, layer);
        let line = assert_named(&t, &c, Suspect::Tensor(Role::V), step, layer);
        assert!(line.contains("stored transposed"), "fa={fa}: {line}");
        reader_names(&path, step, layer, &line);
    }
}

/// The mask read one row late (row t gets row t+1; the last row keeps its own).
#[test]
fn mask_rows_shifted_by_one_are_named() {
    let (step, layer) = (1, 1);
    let path = plant(&good_trace("on"), "mask-shift", |t, _, data| {
        let m = t.find(Role::Mask, layer, step).unwrap();
        let [n_kv, rows, _, _] = m.meta.layout.ne.map(|x| x as usize);
        assert_eq!(rows, 16, "one row per token of the ubatch");
        let row = n_kv * 2;
        let old = data[m.index].clone();
        data[m.index][..(rows - 1) * row].copy_from_slice(&old[row..rows * row]);
    });
    let (t, c) = only_failure(&path, step, layer);
    let line = assert_named(&t, &c, Suspect::Tensor(Role::Mask), step, layer);
    assert!(line.contains("row t holds row t+1's mask"), "{line}");
    reader_names(&path, step, layer, &line);
}

/// A stale buffer: one input of a generated-token step holds the previous step's data.
#[test]
fn a_stale_buffer_is_named() {
    for (role, step, layer) in [(Role::K, 4, 1), (Role::V, 5, 0), (Role::Q, 4, 0)] {
        let path = plant(
            &good_trace("on"),
            &format!("stale-{}", role.name()),
            |t, _, data| {
                let now = index(t, role, step, layer);
                let before = index(t, role, step - 1, layer);
                assert_ne!(data[now], data[before]);
                data[now] = data[before].clone();
            },
        );
        let (t, c) = only_failure(&path, step, layer);
        let line = assert_named(&t, &c, Suspect::Tensor(role), step, layer);
        assert!(
            line.contains(&format!(
                "byte for byte the {} of step {}",
                role.name(),
                step - 1
            )),
            "{line}"
        );
        assert_eq!(
            c.findings[0].nmse_after, None,
            "stale data cannot be repaired"
        );
        reader_names(&path, step, layer, &line);
    }
}

/// The recorded op scale altered (0.25 = 1/sqrt(16) becomes 0.3).
#[test]
fn a_wrong_scale_is_named() {
    let (step, layer) = (2, 0);
    let path = plant(&good_trace("on"), "scale", |t, spec, _| {
        let i = t
            .attn
            .iter()
            .position(|a| a.step == step && a.layer == layer)
            .unwrap();
        let Some(Value::Array(Array::F32(scales))) = spec.metadata.get(keys::ATTN_SCALE) else {
            panic!("no scale array");
        };
        let mut scales = scales.clone();
        assert_eq!(scales[i], 0.25);
        scales[i] = 0.3;
        spec.metadata.set(keys::ATTN_SCALE, scales);
    });
    let (t, c) = only_failure(&path, step, layer);
    let line = assert_named(&t, &c, Suspect::Scale, step, layer);
    assert!(
        line.contains("the recorded op scale 0.3 does not reproduce kqv_out; scale 2.500000e-01 = 1/sqrt(16) does"),
        "{line}"
    );
    reader_names(&path, step, layer, &line);
}
