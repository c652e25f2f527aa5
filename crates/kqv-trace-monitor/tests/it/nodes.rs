//! `--tensor-filter` (issue 19): every node of the tiny LLaMA traced with `.`, through the
//! real vendored llama.cpp, and each saved node checked against an independent read of
//! the same node made while it was live: a tap (`ggml_trace::capture::fault::set_tap`,
//! test-only) that sees each node right after it ran, before the capture reads it, and
//! reads it with ggml's own element accessor (`ggml_get_f32_nd`, which follows the
//! node's strides itself) or, for a quantized node, its rows' raw blocks at the node's
//! strides. The saved trace is read back (`TraceFile::nodes`) in both storages; the
//! layout, type, layer (the name's `-<layer>` suffix), step and graph order must agree,
//! the graph orders of a step must be exactly 0..n (every node, in order), and the
//! attention groups of the same trace must still verify.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use attn_verify::check_in_trace;
use ggml_trace::capture::{fault, CaptureConfig, NodeFilter};
use ggml_trace::session::{self, RunOptions};
use ggml_trace::sys;
use gguf_io::GgmlType;
use kcm_cli::capture_args::{Options, SaveTarget};
use kcm_cli::sink::MonitorSink;
use test_support::storage::KvStorage;
use test_support::LlamaArgs;
use trace_format::{Role, TraceFile};

/// What the tap read of one node.
#[derive(Clone, Debug)]
struct Read {
    name: String,
    ty: u32,
    ne: [u64; 4],
    nb: [u64; 4],
    /// F32/F16/BF16/I32 nodes: every element as f32 (ggml_get_f32_nd), logical order.
    values: Option<Vec<f32>>,
    /// Quantized nodes: the raw blocks of every row, rows in logical order.
    blocks: Option<Vec<u8>>,
    /// The node carries GGML_TENSOR_FLAG_COMPUTE (the graph computes it).
    computed: bool,
}

/// An independent read of a live, computed node (host memory: the CPU backend).
///
/// # Safety
/// `t` must point to a live, computed ggml tensor in a host buffer.
unsafe fn read_node(t: *const sys::ggml_tensor) -> Read {
    // SAFETY: the caller's contract.
    let tr = unsafe { &*t };
    // SAFETY: a ggml tensor's name is NUL-terminated within its array.
    let name = unsafe { CStr::from_ptr(tr.name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    let ne = tr.ne.map(|x| x as u64);
    let nb = tr.nb.map(|x| x as u64);
    let ty = tr.type_;
    let mut read = Read {
        name,
        ty,
        ne,
        nb,
        values: None,
        blocks: None,
        computed: tr.flags & (sys::GGML_TENSOR_FLAG_COMPUTE as i32) != 0,
    };
    // SAFETY: a type id of a live tensor.
    if unsafe { sys::ggml_is_quantized(ty) } {
        // SAFETY: as above.
        let row = unsafe { sys::ggml_row_size(ty, tr.ne[0]) };
        let mut out = Vec::new();
        for i3 in 0..ne[3] {
            for i2 in 0..ne[2] {
                for i1 in 0..ne[1] {
                    let off = (i1 * nb[1] + i2 * nb[2] + i3 * nb[3]) as usize;
                    // SAFETY: the row lies inside the tensor's span in host memory.
                    let bytes =
                        unsafe { std::slice::from_raw_parts((tr.data as *const u8).add(off), row) };
                    out.extend_from_slice(bytes);
                }
            }
        }
        read.blocks = Some(out);
    } else if matches!(
        ty,
        sys::GGML_TYPE_F32 | sys::GGML_TYPE_F16 | sys::GGML_TYPE_BF16 | sys::GGML_TYPE_I32
    ) {
        let mut out = Vec::with_capacity(ne.iter().product::<u64>() as usize);
        for i3 in 0..ne[3] as i32 {
            for i2 in 0..ne[2] as i32 {
                for i1 in 0..ne[1] as i32 {
                    for i0 in 0..ne[0] as i32 {
                        // SAFETY: indices within ne of a live host tensor.
                        out.push(unsafe { sys::ggml_get_f32_nd(t, i0, i1, i2, i3) });
                    }
                }
            }
        }
        read.values = Some(out);
    }
    read
}

/// Trace `model` with `--tensor-filter .` in-process (the tap is per thread), saving to
/// `save`; returns what the tap read, by (step, graph order).
fn trace_all(
    model: &Path,
    extra: &[&str],
    save: &Path,
    storage: KvStorage,
) -> HashMap<(u32, u32), Read> {
    let llama_args = LlamaArgs::new(model, "The quick brown fox jumps over a lazy dog")
        .n(3)
        .ubatch(16)
        .threads(2)
        .greedy()
        .args(extra.iter().copied())
        .build();
    let opts = Options {
        save: Some(SaveTarget::Path(save.to_path_buf())),
        kv_storage: storage,
        quiet: true,
        tensor_filter: vec![".".into()],
        llama_args: llama_args.clone(),
        ..Options::default()
    };
    let mut sink = MonitorSink::new(
        &opts,
        Box::new(io::sink()),
        Arc::new(AtomicBool::new(false)),
    )
    .unwrap();
    let seen: Rc<RefCell<HashMap<(u32, u32), Read>>> = Rc::default();
    let tap_seen = Rc::clone(&seen);
    fault::set_tap(Some(Box::new(move |t, step, order| {
        // SAFETY: the tap runs inside the eval callback's data call: the node is live,
        // computed, and (CPU backend) in host memory.
        let r = unsafe { read_node(t) };
        tap_seen.borrow_mut().insert((step, order), r);
    })));
    let run_opts = RunOptions {
        capture: CaptureConfig {
            from_step: 0,
            layer: None,
            trace_sources: true,
            keep: true,
            logits: false,
            kv_audit: ggml_trace::capture::DEFAULT_KV_AUDIT,
            nodes: Some(Arc::new(NodeFilter::new(&["."]).unwrap())),
        },
        prefill_only: false,
        verbose: false,
        eval_callback: true,
    };
    let result = session::run(&llama_args, run_opts, &mut sink);
    fault::set_tap(None);
    let (info, outcome) = result.unwrap();
    sink.finish(&info, &outcome).unwrap();
    Rc::try_unwrap(seen).unwrap().into_inner()
}

fn f32s(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    if ty == GgmlType::I32 {
        return bytes
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as f32)
            .collect();
    }
    gguf_io::quant::dequantize_to_vec(ty, bytes, n).unwrap()
}

/// Every node saved equals the tap's read; orders are 0..n per step; layers and kinds
/// agree; the attention groups verify; returns the number of nodes checked.
fn check(t: &TraceFile, reads: &HashMap<(u32, u32), Read>, label: &str) -> usize {
    assert!(!t.nodes.is_empty(), "{label}: no nodes");
    let mut per_step: HashMap<u32, Vec<u32>> = HashMap::new();
    let mut quantized = 0;
    for n in &t.nodes {
        let m = &n.meta;
        assert_eq!(m.role, Role::Node);
        let order = n
            .graph_order
            .unwrap_or_else(|| panic!("{label}: {} unordered", n.name));
        per_step.entry(m.step).or_default().push(order);
        let r = reads
            .get(&(m.step, order))
            .unwrap_or_else(|| panic!("{label}: no tap read at step {} order {order}", m.step));
        assert_eq!(
            m.ggml_name, r.name,
            "{label}: step {} order {order}",
            m.step
        );
        assert_eq!(m.layout.ty.0, r.ty, "{label}: {}", n.name);
        assert_eq!(m.layout.ne, r.ne, "{label}: {}", n.name);
        assert_eq!(m.layout.nb, r.nb, "{label}: {}", n.name);
        assert_eq!(m.layer, trace_format::node_layer(&r.name));
        assert!(
            r.computed,
            "{label}: {} is not computed by the graph",
            n.name
        );
        let data = t.data(n);
        match (&r.values, &r.blocks) {
            (Some(v), _) => {
                let got = f32s(m.layout.ty, &data, v.len());
                let same = got.iter().zip(v).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same && got.len() == v.len(), "{label}: {} differs", n.name);
            }
            (_, Some(b)) => {
                quantized += 1;
                assert_eq!(&data[..], &b[..], "{label}: {} blocks differ", n.name);
            }
            _ => panic!(
                "{label}: {} of type {} not read by the tap",
                n.name, m.layout.ty
            ),
        }
    }
    for (step, orders) in &per_step {
        assert_eq!(
            orders.first(),
            Some(&0),
            "{label}: step {step}: graph orders"
        );
        assert!(
            orders.windows(2).all(|w| w[0] < w[1]),
            "{label}: step {step}: graph orders {orders:?}"
        );
    }
    // llama.cpp builds three input-embedding branches (token ids, vectors, a mix) with
    // ggml_build_forward_select and computes the one the batch needs; the nodes of the
    // others stay in the graph without GGML_TENSOR_FLAG_COMPUTE, never run and hold stale
    // memory. They are not traced: the mixed branch's DUP (the graph's only one) is absent.
    assert!(
        !t.nodes.iter().any(|n| n.meta.op == "DUP"),
        "{label}: a node of an unselected branch was traced"
    );
    // Layers from the names: each layer's ffn_out, none for the output.
    let find = |name: &str, step: u32| {
        t.nodes
            .iter()
            .find(|n| n.meta.ggml_name == name && n.meta.step == step)
            .unwrap_or_else(|| panic!("{label}: no {name} at step {step}"))
    };
    assert_eq!(find("ffn_out-1", 0).meta.layer, 1);
    assert_eq!(find("result_output", 3).meta.layer, -1);
    // The node kqv_out-<l> is the attention record's kqv_out, read a second time.
    for step in 0..t.steps.len() as u32 {
        for layer in 0..2 {
            let att = t.find(Role::KqvOut, layer, step).unwrap();
            let node = find(&format!("kqv_out-{layer}"), step);
            assert_eq!(
                t.data(att),
                t.data(node),
                "{label}: kqv_out-{layer} step {step}"
            );
            assert_eq!(att.graph_order, node.graph_order);
        }
    }
    // The attention groups of the same trace still verify.
    for &(step, layer) in t.groups().keys() {
        let c = check_in_trace(t, step, layer)
            .unwrap()
            .into_result()
            .unwrap_or_else(|m| panic!("{label}: step {step} layer {layer} misses {:?}", m.0));
        assert!(c.pass, "{label}: step {step} layer {layer}: {c:?}");
    }
    if label.contains("q8_0") {
        assert!(quantized > 0, "{label}: no quantized node kept");
    }
    eprintln!(
        "{label}: {} nodes in {} steps ({quantized} quantized) equal the independent read; \
         {} attention groups verify",
        t.nodes.len(),
        per_step.len(),
        t.groups().len()
    );
    t.nodes.len()
}

#[test]
fn every_node_traced_equals_an_independent_read_and_attention_still_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = dir.path().join("tiny.gguf");
    tiny_llama::write_model(&tiny, &tiny_llama::TinyLlamaConfig::default()).unwrap();
    let head32 = tiny_llama::write_with_head_dim(dir.path(), 32).unwrap();
    let cases: [(&str, &Path, &[&str], KvStorage); 4] = [
        ("fa on, delta", &tiny, &["-fa", "on"], KvStorage::Delta),
        ("fa on, full", &tiny, &["-fa", "on"], KvStorage::Full),
        ("fa off, delta", &tiny, &["-fa", "off"], KvStorage::Delta),
        (
            "q8_0 cache, fa on",
            &head32,
            &["-fa", "on", "-ctk", "q8_0", "-ctv", "q8_0"],
            KvStorage::Delta,
        ),
    ];
    for (label, model, extra, storage) in cases {
        let save = dir
            .path()
            .join(format!("{}.gguf", label.replace([' ', ','], "_")));
        let reads = trace_all(model, extra, &save, storage);
        let t = TraceFile::open(&save).unwrap();
        assert_eq!(t.format_version, storage.format_version());
        // The patterns are recorded with the run.
        assert_eq!(t.run.tensor_filter, ["."], "{label}");
        let n = check(&t, &reads, label);
        // Every node the scheduler stopped at was saved (all of them, with `.`).
        assert_eq!(
            n,
            reads.len(),
            "{label}: saved {n} of {} nodes read",
            reads.len()
        );
    }
}
