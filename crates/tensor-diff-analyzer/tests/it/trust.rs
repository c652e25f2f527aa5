//! Issue 14: the analyzer's verdicts never rest on unchecked claims. Honest traces of the
//! tiny model (and synthetic ones for scale) are copied with gguf-io's writer with a key
//! changed, a tensor added, removed or relabelled, or the byte order flipped; every run
//! flag the tensors contradict and every duplicate is an input error (exit 2, one stderr
//! line), skipped tensors are counted, a big-endian copy compares identical, the plot
//! stays small and step matching stays linear.

use std::path::Path;

use gguf_io::{Array, ByteOrder, GgufFile, HeaderSpec, Metadata, TensorSpec, Value};
use trace_format::{
    keys, Role, RunMeta, StepMeta, TensorLayout, TensorMeta, TraceFile, TraceWriter,
};

use crate::cli::{code, f64_of, input_error, json, model, offline, reference, text};

/// One tensor of a trace being rewritten: its table entry, bytes (little-endian) and
/// per-tensor metadata.
#[derive(Clone)]
struct Entry {
    spec: TensorSpec,
    data: Vec<u8>,
    role: String,
    layer: i32,
    step: u32,
    ggml_name: String,
    op: String,
    nb: [u64; 4],
    view_of: String,
    /// `kqv_trace.tensor.graph_order` (optional: -1 when the source has none).
    graph_order: i32,
}

fn strings(m: &Metadata, k: &str) -> Vec<String> {
    match m.get(k) {
        Some(Value::Array(Array::String(v))) => v.clone(),
        v => panic!("{k}: {v:?}"),
    }
}

/// Copy `src` to `dst`: `edit` may change the metadata and the tensor list; the
/// per-tensor arrays are rebuilt from the entries; `order` is the copy's byte order.
fn rewrite(
    src: &Path,
    dst: &Path,
    order: ByteOrder,
    edit: impl FnOnce(&mut Metadata, &mut Vec<Entry>),
) {
    // Every tensor whole (a version-2 trace materialized): the per-tensor arrays are
    // rebuilt from the entries.
    let f = GgufFile::from_bytes(trace_format::materialize::full_bytes(src).unwrap()).unwrap();
    let mut spec = HeaderSpec::from_header(f.header());
    let m = &spec.metadata;
    let (roles, names, ops, views) = (
        strings(m, keys::TENSOR_ROLE),
        strings(m, keys::TENSOR_GGML_NAME),
        strings(m, keys::TENSOR_OP),
        strings(m, keys::TENSOR_VIEW_OF),
    );
    let Some(Value::Array(Array::I32(layers))) = m.get(keys::TENSOR_LAYER).cloned() else {
        panic!("layers")
    };
    let Some(Value::Array(Array::U32(steps))) = m.get(keys::TENSOR_STEP).cloned() else {
        panic!("steps")
    };
    let Some(Value::Array(Array::U64(nbs))) = m.get(keys::TENSOR_NB).cloned() else {
        panic!("nb")
    };
    let orders = match m.get(keys::TENSOR_GRAPH_ORDER).cloned() {
        Some(Value::Array(Array::I32(o))) => Some(o),
        None => None,
        v => panic!("graph_order: {v:?}"),
    };
    let mut entries: Vec<Entry> = f
        .tensors()
        .iter()
        .enumerate()
        .map(|(i, t)| Entry {
            spec: spec.tensors[i].clone(),
            data: gguf_io::to_little_endian(t.ty, f.header().byte_order, f.tensor_data(t))
                .into_owned(),
            role: roles[i].clone(),
            layer: layers[i],
            step: steps[i],
            ggml_name: names[i].clone(),
            op: ops[i].clone(),
            nb: nbs[4 * i..4 * i + 4].try_into().unwrap(),
            view_of: views[i].clone(),
            graph_order: orders.as_ref().map_or(-1, |o| o[i]),
        })
        .collect();
    edit(&mut spec.metadata, &mut entries);
    let m = &mut spec.metadata;
    m.set(
        keys::TENSOR_ROLE,
        entries.iter().map(|e| e.role.clone()).collect::<Vec<_>>(),
    );
    m.set(
        keys::TENSOR_LAYER,
        entries.iter().map(|e| e.layer).collect::<Vec<_>>(),
    );
    m.set(
        keys::TENSOR_STEP,
        entries.iter().map(|e| e.step).collect::<Vec<_>>(),
    );
    m.set(
        keys::TENSOR_GGML_NAME,
        entries
            .iter()
            .map(|e| e.ggml_name.clone())
            .collect::<Vec<_>>(),
    );
    m.set(
        keys::TENSOR_OP,
        entries.iter().map(|e| e.op.clone()).collect::<Vec<_>>(),
    );
    m.set(
        keys::TENSOR_NB,
        entries.iter().flat_map(|e| e.nb).collect::<Vec<_>>(),
    );
    m.set(
        keys::TENSOR_VIEW_OF,
        entries
            .iter()
            .map(|e| e.view_of.clone())
            .collect::<Vec<_>>(),
    );
    if orders.is_some() {
        m.set(
            keys::TENSOR_GRAPH_ORDER,
            entries.iter().map(|e| e.graph_order).collect::<Vec<_>>(),
        );
    }
    m.set(keys::TENSOR_COUNT, entries.len() as i32);
    spec.tensors = entries.iter().map(|e| e.spec.clone()).collect();
    spec.byte_order = order;
    gguf_io::write_file(dst, &spec, |w| {
        for e in &entries {
            // The swap is its own inverse: little-endian in, the file's order out.
            w.write_tensor(&gguf_io::to_little_endian(e.spec.ty, order, &e.data))?;
        }
        Ok(())
    })
    .unwrap();
}

fn edited(src: &Path, dst: &Path, edit: impl FnOnce(&mut Metadata, &mut Vec<Entry>)) {
    rewrite(src, dst, ByteOrder::Little, edit)
}

/// Every f32 of an entry moved by `by`.
fn shift_f32(e: &mut Entry, by: f32) {
    for c in e.data.chunks_exact_mut(4) {
        let v = f32::from_le_bytes(c.try_into().unwrap()) + by;
        c.copy_from_slice(&v.to_le_bytes());
    }
}

/// Exit 2 and one stderr line naming `key`, with the reference and with the current.
fn refused_both_ways(honest: &Path, bad: &Path, needles: &[&str]) -> String {
    let mut first = String::new();
    for (r, c, side) in [(honest, bad, "current"), (bad, honest, "reference")] {
        for own in [&[][..], &["--json"]] {
            let e = input_error(&offline(r, c, own));
            assert!(
                e.starts_with(&format!("tensor-diff-analyzer: {side} ")),
                "{e}"
            );
            for n in needles {
                assert!(e.contains(n), "{n:?} not in {e}");
            }
            first = e;
        }
    }
    first
}

#[test]
fn run_flags_the_tensors_contradict_are_input_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m = model(d, 16);
    let r = d.join("fa-on.gguf");
    let rt = reference(&m, &r, &["-fa", "on"]);
    let off = d.join("fa-off.gguf");
    reference(&m, &off, &["-fa", "off"]);
    let flip = |name: &str, key: &'static str, v: Value| {
        let p = d.join(name);
        edited(&r, &p, |m, _| m.set(key, v));
        p
    };

    // The case: v planted with a difference, and the mixed flag set so that v is
    // "not comparable". Without the flag: a failure (exit 1); with it: an input error,
    // where the analyzer used to skip v and say "all tensors within tolerance" (exit 0).
    let planted = d.join("planted-v.gguf");
    edited(&r, &planted, |_, es| {
        for e in es.iter_mut().filter(|e| e.role == "v") {
            let f16 = |x: f32| half_bits(x);
            for c in e.data.chunks_exact_mut(2) {
                c.copy_from_slice(&f16(0.5).to_le_bytes());
            }
        }
    });
    assert_eq!(code(&offline(&r, &planted, &[])), 1);
    let lying = d.join("planted-v-mixed.gguf");
    edited(&planted, &lying, |m, _| {
        m.set(keys::RUN_MIXED_KV_CACHE, true)
    });
    let e = refused_both_ways(&r, &lying, &["kqv_trace.run.mixed_kv_cache"]);
    assert!(e.contains("FLASH_ATTN_EXT"), "{e}");

    // Flash attention claimed off on a FLASH_ATTN_EXT trace, and on for a kq_soft_max one.
    let p = flip("fa-claimed-off.gguf", keys::RUN_FLASH_ATTN, "off".into());
    refused_both_ways(&r, &p, &["kqv_trace.run.flash_attn", "FLASH_ATTN_EXT"]);
    let p = d.join("fa-off-claimed-on.gguf");
    edited(&off, &p, |m, _| m.set(keys::RUN_FLASH_ATTN, "on"));
    let e = refused_both_ways(&r, &p, &["kqv_trace.run.flash_attn"]);
    assert!(e.contains("MUL_MAT") || e.contains("kq"), "{e}");
    // Rotation claimed for F16 caches, or a quantized cache type the K/V tensors are not:
    // in an older trace (no per-layer record) against the cache types, in a new one
    // against the per-layer record.
    let p = d.join("rot-old.gguf");
    edited(&r, &p, |m, _| {
        without_rotation_record(m);
        m.set(keys::RUN_KV_ROTATION, true)
    });
    refused_both_ways(&r, &p, &["kqv_trace.run.kv_rotation", "neither cache type"]);
    let p = flip("rot.gguf", keys::RUN_KV_ROTATION, true.into());
    refused_both_ways(
        &r,
        &p,
        &["kqv_trace.run.kv_rotation", "record no layer as rotated"],
    );
    let p = flip("ctk.gguf", keys::RUN_CACHE_TYPE_K, "q8_0".into());
    refused_both_ways(&r, &p, &["kqv_trace.run.cache_type_k", "f16"]);
    let p = d.join("ctv-rot.gguf");
    edited(&r, &p, |m, _| {
        m.set(keys::RUN_CACHE_TYPE_V, "q4_0");
        m.set(keys::RUN_KV_ROTATION, true);
    });
    refused_both_ways(&r, &p, &["kqv_trace.run.cache_type_v", "f16"]);
    // A target layer the tensors are not all of: it would silently drop layer 1.
    let p = flip("target.gguf", keys::TARGET_LAYER, Value::I32(0));
    refused_both_ways(&r, &p, &["kqv_trace.target_layer", "layer 1"]);
    // Head counts the Q and K tensors do not have (the head of a worst element rests on it).
    let p = flip("heads.gguf", keys::RUN_N_HEAD, Value::U32(8));
    refused_both_ways(&r, &p, &["kqv_trace.run.n_head", "4 heads"]);
    // A flag value no run writes, with a newline and an escape sequence: one line, escaped.
    let p = flip(
        "junk.gguf",
        keys::RUN_FLASH_ATTN,
        "yes\n\u{1b}[31mno".into(),
    );
    let e = refused_both_ways(&r, &p, &["kqv_trace.run.flash_attn"]);
    assert!(!e.contains('\u{1b}'), "{e}");
    // Honest flags pass: the file compared with itself is exact.
    let o = offline(&r, &r, &["--json"]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    assert_eq!(
        json(&o)["total_comparisons"].as_u64(),
        Some(rt.tensors.len() as u64)
    );
}

/// f32 -> IEEE half bits (the values used here are exact in f16).
fn half_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32 - 127 + 15;
    let man = ((b >> 13) & 0x3ff) as u16;
    assert!((1..31).contains(&exp), "{x} is not a normal f16");
    sign | ((exp as u16) << 10) | man
}

#[test]
fn rotation_is_read_from_kqv_out_unrotated() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // head_dim 64 and a q8_0 cache: llama.cpp rotates V, the trace holds kqv_out_unrotated.
    let m = model(d, 64);
    let f16 = d.join("f16.gguf");
    reference(&m, &f16, &["-fa", "on"]);
    let q8 = d.join("q8.gguf");
    let qt = reference(&m, &q8, &["-fa", "on", "-ctk", "q8_0", "-ctv", "q8_0"]);
    assert!(qt
        .tensors
        .iter()
        .any(|t| t.meta.role == Role::KqvOutUnrotated));
    let o = offline(&f16, &q8, &["--json"]);
    assert_eq!(code(&o), 1, "{}", text(&o.stderr));
    // Recorded per layer from the graph: Q/K and V rotated in both layers.
    assert!(qt.run.rotation_recorded());
    assert_eq!(qt.run.rotated_k_layers, [Some(true), Some(true)]);
    assert_eq!(qt.run.rotated_v_layers, [Some(true), Some(true)]);
    let j = json(&o);
    assert_eq!(j["rotation"]["current"]["source"], "recorded");
    assert_eq!(
        j["rotation"]["current"]["v_layers"],
        serde_json::json!([true, true])
    );
    assert_eq!(j["rotation"]["reference"]["k"], false);
    assert!(!text(&o.stdout).contains("inferred"));

    // An older trace (no per-layer record): the same comparison, rotation inferred from
    // kv_rotation and the cache types, and the output says so.
    let old = d.join("q8-old.gguf");
    edited(&q8, &old, |m, _| without_rotation_record(m));
    let oo = offline(&f16, &old, &["--json"]);
    assert_eq!(code(&oo), 1, "{}", text(&oo.stderr));
    let jo = json(&oo);
    assert_eq!(jo["rotation"]["current"]["source"], "inferred");
    assert_eq!(jo["tensors"], j["tensors"]);
    let notes = jo["notes"].to_string();
    assert!(
        notes.contains("rotation of the current run is inferred"),
        "{notes}"
    );

    // Rotation denied: the unrotated outputs say otherwise (older trace: kv_rotation; new:
    // the per-layer record).
    let p = d.join("q8-no-rot-old.gguf");
    edited(&old, &p, |m, _| m.set(keys::RUN_KV_ROTATION, false));
    refused_both_ways(
        &f16,
        &p,
        &["kqv_trace.run.kv_rotation", "kqv_out_unrotated"],
    );
    let p = d.join("q8-no-rot.gguf");
    edited(&q8, &p, |m, _| m.set(keys::RUN_ROTATED_V, vec![0i8, 0]));
    refused_both_ways(&f16, &p, &["kqv_trace.run.rotated_v", "kqv_out_unrotated"]);
    // Rotation claimed, the unrotated outputs removed: V was not rotated after all.
    let p = d.join("q8-no-unrot-old.gguf");
    edited(&old, &p, |_, es| {
        es.retain(|e| e.role != "kqv_out_unrotated")
    });
    refused_both_ways(
        &f16,
        &p,
        &["kqv_trace.run.kv_rotation", "kqv_out_unrotated"],
    );
    let p = d.join("q8-no-unrot.gguf");
    edited(&q8, &p, |_, es| {
        es.retain(|e| e.role != "kqv_out_unrotated")
    });
    refused_both_ways(
        &f16,
        &p,
        &["kqv_trace.run.rotated_v", "no kqv_out_unrotated beside it"],
    );
}

/// The trace as written before rotation was recorded per layer.
fn without_rotation_record(m: &mut Metadata) {
    let mut kept = Metadata::new();
    for (k, v) in m.iter() {
        if k != keys::RUN_ROTATED_K && k != keys::RUN_ROTATED_V {
            kept.set(k, v.clone());
        }
    }
    *m = kept;
}

#[test]
fn duplicated_tensors_are_input_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m = model(d, 16);
    let r = d.join("ref.gguf");
    reference(&m, &r, &[]);
    // A second kqv_out for (step 0, layer 0) with other values, named so a terminal would
    // take it as a command: refused, the name shown escaped.
    let p = d.join("dup.gguf");
    edited(&r, &p, |_, es| {
        let i = es
            .iter()
            .position(|e| e.role == "kqv_out" && e.step == 0 && e.layer == 0)
            .unwrap();
        let mut twin = es[i].clone();
        twin.spec.name = "evil\n\u{1b}[2Jkqv_out".into();
        shift_f32(&mut twin, 1.0);
        es.push(twin);
    });
    let e = refused_both_ways(&r, &p, &["kqv_out", "second", "step 0", "layer 0"]);
    assert!(e.contains("evil\\n\\u{1b}[2Jkqv_out"), "{e}");
    // Every tensor labelled (step 0, layer 0): duplicates, not "1 of 1 compared".
    let p = d.join("all-zero.gguf");
    edited(&r, &p, |_, es| {
        for e in es.iter_mut() {
            (e.step, e.layer) = (0, 0);
        }
    });
    refused_both_ways(&r, &p, &["kqv_out", "second"]);
}

#[test]
fn skipped_tensors_are_counted_and_kqv_out_must_be_compared() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m = model(d, 16);
    let on = d.join("on.gguf");
    let t_on = reference(&m, &on, &["-fa", "on"]);
    let off = d.join("off.gguf");
    let t_off = reference(&m, &off, &["-fa", "off"]);
    let count = |t: &TraceFile, f: &dyn Fn(&trace_format::TracedTensor) -> bool| {
        t.tensors.iter().filter(|x| f(x)).count()
    };

    // Flash attention on against off: attn and v on both sides, kq and kq_soft_max on
    // the off side are not comparable; counted in the summary and in --json.
    let o = offline(&on, &off, &["--json"]);
    let j = json(&o);
    let layout = |x: &trace_format::TracedTensor| {
        matches!(
            x.meta.role,
            Role::Attn | Role::V | Role::Kq | Role::KqSoftMax
        )
    };
    let nc = count(&t_on, &layout) + count(&t_off, &layout);
    assert!(nc > 0);
    assert_eq!(
        j["skipped"]["not_comparable"].as_u64(),
        Some(nc as u64),
        "{}",
        j["skipped"]
    );
    assert_eq!(j["skipped"]["total"].as_u64(), Some(nc as u64));
    assert_eq!(j["skipped"]["other_layer"], 0);
    assert_eq!(j["not_comparable"].as_array().unwrap().len(), nc);
    let n = j["total_comparisons"].as_u64().unwrap() as usize;
    assert_eq!(n + nc, t_on.tensors.len() + t_off.tensors.len() - n);
    let out = text(&offline(&on, &off, &[]).stdout);
    assert!(
        out.contains(&format!(
            "Compared {n}, skipped {nc} ({nc} not comparable)\n"
        )),
        "{out}"
    );

    // --layer 0: the other layer's tensors of both files are counted, not dropped unseen;
    // a tensor without a trace role is counted too.
    let extra = d.join("extra.gguf");
    edited(&on, &extra, |_, es| {
        let mut e = es[0].clone();
        e.spec.name = "someone_elses_tensor".into();
        e.role = "not_a_role".into();
        es.push(e);
    });
    let o = offline(&on, &extra, &["--layer", "0"]);
    let out = text(&o.stdout);
    assert_eq!(code(&o), 0, "{out}{}", text(&o.stderr));
    let l1 = count(&t_on, &|x| x.meta.layer == 1);
    let l0 = t_on.tensors.len() - l1;
    assert!(
        out.contains(&format!(
            "Compared {l0}, skipped {} ({} outside --layer 0, 1 without a trace role)\n",
            2 * l1 + 1,
            2 * l1
        )),
        "{out}"
    );
    let j = json(&offline(&on, &extra, &["--layer", "0", "--json"]));
    assert_eq!(j["skipped"]["other_layer"].as_u64(), Some(2 * l1 as u64));
    assert_eq!(j["skipped"]["no_role"], 1);
    assert_eq!(j["skipped"]["total"].as_u64(), Some(2 * l1 as u64 + 1));
    assert_eq!(j["exit_code"], 0);

    // No kqv_out at all: the intermediates agree, but that is no verdict on the output.
    let bare_a = d.join("no-kqv-a.gguf");
    let bare_b = d.join("no-kqv-b.gguf");
    for p in [&bare_a, &bare_b] {
        edited(&on, p, |_, es| es.retain(|e| e.role != "kqv_out"));
    }
    let e = input_error(&offline(&bare_a, &bare_b, &[]));
    assert!(
        e.contains("no kqv_out was compared: neither file holds a kqv_out"),
        "{e}"
    );
    let e = input_error(&offline(&bare_a, &bare_b, &["--json"]));
    assert!(e.contains("no kqv_out was compared"), "{e}");
    // One side without them: the reference's kqv_out have no counterpart.
    let per_side = count(&t_on, &|x| x.meta.role == Role::KqvOut);
    let e = input_error(&offline(&on, &bare_b, &[]));
    assert!(
        e.contains(&format!(
            "{per_side} reference and 0 current kqv_out have no counterpart"
        )),
        "{e}"
    );
}

#[test]
fn a_big_endian_copy_compares_identical() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m = model(d, 16);
    let r = d.join("le.gguf");
    let t = reference(&m, &r, &[]);
    let be = d.join("be.gguf");
    rewrite(&r, &be, ByteOrder::Big, |_, _| {});
    let bt = TraceFile::open(&be).unwrap();
    assert_eq!(bt.gguf().header().byte_order, ByteOrder::Big);
    // The copy really holds other bytes for the f32 and f16 tensors.
    let k = t.find(Role::KqvOut, 0, 0).unwrap();
    assert_ne!(t.data(k), bt.data(bt.find(Role::KqvOut, 0, 0).unwrap()));
    for (a, b) in [(&r, &be), (&be, &r), (&be, &be)] {
        let o = offline(a, b, &["--json"]);
        assert_eq!(code(&o), 0, "{}", text(&o.stdout));
        let j = json(&o);
        assert_eq!(
            j["total_comparisons"].as_u64(),
            Some(t.tensors.len() as u64)
        );
        assert_eq!(f64_of(&j["max_abs"]), 0.0, "{}", j["max_abs"]);
        for c in j["tensors"].as_array().unwrap() {
            assert_eq!(f64_of(&c["metrics"]["cosine"]), 1.0, "{c}");
        }
    }
    let out = text(&offline(&r, &be, &[]).stdout);
    let n = t.tensors.len();
    assert!(
        out.contains(&format!("Tensors within tolerance: {n}/{n} (100.0%)")),
        "{out}"
    );
    assert!(
        out.contains("Maximum absolute difference: 0.00e+00"),
        "{out}"
    );
}

/// A synthetic trace: `steps` steps of one token, `layers` layers, one 8-element kqv_out
/// per (step, layer); `bump` moves one tensor's values.
fn synthetic(path: &Path, steps: u32, layers: i32, bump: Option<(u32, i32)>) {
    let mut w = TraceWriter::new().unwrap();
    for s in 0..steps {
        w.add_step(StepMeta {
            step: s,
            positions: vec![s as i32],
            tokens: vec![1],
        });
        for l in 0..layers {
            let by = if bump == Some((s, l)) { 1.0 } else { 0.0 };
            let data: Vec<u8> = (0..8)
                .flat_map(|i| (((s as f32) * 0.001 + l as f32 + i as f32) + by).to_le_bytes())
                .collect();
            let meta = TensorMeta {
                role: Role::KqvOut,
                layer: l,
                step: s,
                ggml_name: format!("kqv_out-{l}"),
                op: "RESHAPE".into(),
                layout: TensorLayout::contiguous(gguf_io::GgmlType::F32, [8, 1, 1, 1]).unwrap(),
                view_of: String::new(),
            };
            w.add_tensor(meta, &data, false).unwrap();
        }
    }
    let run = RunMeta {
        architecture: "llama".into(),
        n_layer: layers as u32,
        n_head: 2,
        n_head_kv: 2,
        target_layer: -1,
        trace_sources: false,
        complete: true,
        ..Default::default()
    };
    w.finish_to_path(&run, path).unwrap();
}

#[test]
fn the_plot_of_a_long_run_is_binned_and_small() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (r, c) = (d.join("r.gguf"), d.join("c.gguf"));
    synthetic(&r, 2000, 18, None);
    synthetic(&c, 2000, 18, Some((1234, 7)));
    let svg = d.join("plot.svg");
    let o = offline(&r, &c, &["--plot", svg.to_str().unwrap()]);
    assert_eq!(code(&o), 1, "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(out.contains("Total comparisons: 36000\n"), "{out}");
    assert!(
        out.contains("First out of tolerance: step 1234, layer 7 (kqv_out)"),
        "{out}"
    );
    let s = std::fs::read_to_string(&svg).unwrap();
    assert!(s.starts_with("<svg"));
    eprintln!("plot of 2,000 steps x 18 layers: {} bytes", s.len());
    assert!(s.len() < 2 << 20, "{} bytes", s.len());
    // 2000 steps in at most 120 columns: bins of 17; the failing one still marked, once.
    assert!(
        s.contains("2000 steps binned by 17"),
        "{}",
        &s[..2000.min(s.len())]
    );
    assert_eq!(crate::plot::marked_cells(&s), 1, "one marked cell");
    // 18 layers x 120 columns at most: far fewer rectangles than 36,000 cells (plus the
    // colour bar's bands, the outlines and the legend).
    assert!(
        s.matches("<rect").count()
            < 120 * 18 + tensor_diff_analyzer::plot::BAR_BANDS as usize + 100,
        "{}",
        s.matches("<rect").count()
    );
}

/// Steps are matched by map (not a search per step): two synthetic traces of 10,000
/// steps x 4 layers pair every tensor with its counterpart. Timings are not asserted here
/// (no timed tests): `cargo run --release -p gguf-reader --example scale` measures the
/// offline diff at 5k/10k/20k groups (docs/performance.md).
#[test]
fn ten_thousand_steps_pair_every_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let steps = 10_000u32;
    let (r, c) = (dir.path().join("r.gguf"), dir.path().join("c.gguf"));
    synthetic(&r, steps, 4, None);
    synthetic(&c, steps, 4, None);
    let o = offline(&r, &c, &[]);
    assert_eq!(code(&o), 0, "{}", text(&o.stderr));
    let n = 4 * steps;
    assert!(
        text(&o.stdout).contains(&format!("Tensors within tolerance: {n}/{n} (100.0%)")),
        "{}",
        text(&o.stdout)
    );
}

/// An encoder-decoder trace (T5 from the zoo: encoder layers' K and V come straight from
/// `Kcur`/`Vcur` in F32, not from the F16 cache; cross-attention recorded as layers past
/// `n_layer`) compared with itself offline: every tensor identical, exit 0. The cache
/// types describe the cache, so only tensors read from it are held to them.
#[test]
fn an_encoder_decoder_trace_compares_with_itself() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_llama::zoo::write_zoo_model(dir.path(), tiny_llama::zoo::Arch::T5).unwrap();
    let r = dir.path().join("t5.gguf");
    let t = reference(&model, &r, &["-ub", "64"]);
    assert!(
        t.tensors
            .iter()
            .any(|x| x.meta.role == Role::K && x.meta.layout.ty == gguf_io::GgmlType::F32),
        "the trace has F32 (encoder) K tensors"
    );
    let o = offline(&r, &r, &[]);
    assert_eq!(code(&o), 0, "{}\n{}", text(&o.stdout), text(&o.stderr));
    assert!(
        text(&o.stdout).contains(&format!(
            "Tensors within tolerance: {n}/{n} (100.0%)",
            n = t.tensors.len()
        )),
        "{}",
        text(&o.stdout)
    );
}
