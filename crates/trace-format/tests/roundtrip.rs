//! A trace written by `TraceWriter` reads back identically through `TraceFile`.

use gguf_io::{quant, GgmlType};
use trace_format::layout::differing_ranges;
use trace_format::{
    tensor_name, AttnParams, AttnRecord, KvStorage, Role, RunMeta, StepMeta, TensorLayout,
    TensorMeta, TraceFile, TraceWriter,
};

fn meta(role: Role, layer: i32, step: u32, name: &str, ty: GgmlType, ne: [u64; 4]) -> TensorMeta {
    let mut layout = TensorLayout::contiguous(ty, ne).unwrap();
    if role == Role::K {
        // Record a permuted view's strides, as captured.
        layout.nb = [layout.nb[0], layout.nb[2], layout.nb[1], layout.nb[3]];
    }
    TensorMeta {
        role,
        layer,
        step,
        ggml_name: name.into(),
        op: "VIEW".into(),
        layout,
        view_of: if role == Role::K {
            "cache_k_l0".into()
        } else {
            String::new()
        },
    }
}

#[test]
fn write_then_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.gguf");
    let mut w = TraceWriter::new().unwrap();
    let mut expected = Vec::new();
    for step in 0..2u32 {
        w.add_step(StepMeta {
            step,
            positions: if step == 0 { vec![0, 1, 2] } else { vec![3] },
            tokens: if step == 0 {
                vec![1, 72, 101]
            } else {
                vec![108]
            },
        });
        for layer in 0..2 {
            for (role, name, ty, ne) in [
                (
                    Role::KqvOut,
                    format!("kqv_out-{layer}"),
                    GgmlType::F32,
                    [64, 3, 1, 1],
                ),
                (
                    Role::Q,
                    format!("Qcur-{layer} (view) (permuted)"),
                    GgmlType::F32,
                    [16, 3, 4, 1],
                ),
                (
                    Role::K,
                    format!("cache_k_l{layer} (view) (permuted)"),
                    GgmlType::Q8_0,
                    [32, 256, 2, 1],
                ),
                (
                    Role::Mask,
                    "attn_inp_kq_mask".to_owned(),
                    GgmlType::F16,
                    [256, 3, 1, 1],
                ),
            ] {
                let m = meta(role, layer, step, &name, ty, ne);
                let n = m.layout.n_elements() as usize;
                let vals: Vec<f32> = (0..n)
                    .map(|i| (i as f32 * 0.37 + layer as f32).sin())
                    .collect();
                let bytes = quant::quantize(ty, &vals).unwrap();
                w.add_tensor(m.clone(), &bytes, false).unwrap();
                expected.push((m, bytes));
            }
            w.add_attn(AttnRecord {
                step,
                layer,
                op: "FLASH_ATTN_EXT".into(),
                params: AttnParams {
                    scale: 0.25,
                    max_bias: 0.0,
                    softcap: 0.0,
                },
                backend: "CPU".into(),
                n_threads: 2 + layer as u32,
            });
        }
    }
    let run = RunMeta {
        description: "test".into(),
        architecture: "llama".into(),
        n_layer: 2,
        cache_type_k: "q8_0".into(),
        flash_attn: "on".into(),
        prompt_tokens: vec![1, 72, 101],
        target_layer: -1,
        trace_sources: true,
        complete: true,
        ..Default::default()
    };
    w.finish_to_path(&run, &path).unwrap();

    let t = TraceFile::open(&path).unwrap();
    assert!(!t.from_names_only);
    assert!(t.unknown.is_empty());
    assert_eq!(t.run, run);
    assert_eq!(t.steps.len(), 2);
    assert_eq!(t.steps[0].positions, [0, 1, 2]);
    assert_eq!(t.steps[1].tokens, [108]);
    assert_eq!(t.tensors.len(), expected.len());
    for (tt, (m, bytes)) in t.tensors.iter().zip(&expected) {
        assert_eq!(&tt.meta, m);
        assert_eq!(t.data(tt), &bytes[..]);
    }
    assert_eq!(t.attn.len(), 4);
    assert_eq!(t.attn(1, 1).unwrap().params.scale, 0.25);
    assert_eq!(t.attn(1, 1).unwrap().backend, "CPU");
    assert_eq!(t.attn(1, 1).unwrap().n_threads, 3);
    assert_eq!(t.groups().len(), 4);
    let k = t.find(Role::K, 1, 1).unwrap();
    assert_eq!(k.name, "src1_cache_k_l1(view)(permuted)_step_1");
    assert!(k.meta.layout.is_permuted());
    // Two layers' masks share a ggml name; their GGUF names differ.
    assert_eq!(
        t.find(Role::Mask, 0, 0).unwrap().name,
        "src3_attn_inp_kq_mask@l0_step_0"
    );
    assert_eq!(
        t.find(Role::Mask, 1, 0).unwrap().name,
        "src3_attn_inp_kq_mask@l1_step_0"
    );
    assert_eq!(
        t.find(Role::KqvOut, 0, 1).unwrap().name,
        "kqv_out_kqv_out-0_step_1"
    );
    // The seed keys are there.
    let m = t.gguf().metadata();
    assert_eq!(m.get_i64("kqv_trace.total_steps"), Some(2));
    assert_eq!(m.get_i64("kqv_trace.tensor_count"), Some(16));
    assert_eq!(m.get_i64("kqv_trace.target_layer"), Some(-1));
    assert_eq!(m.get_bool("kqv_trace.trace_sources"), Some(true));
}

#[test]
fn names_fit_ggml_and_keep_the_step() {
    let long = "x".repeat(200);
    let m = meta(Role::V, 7, 123456, &long, GgmlType::F32, [4, 1, 1, 1]);
    let n = tensor_name(&m, false);
    assert!(n.len() <= 63, "{n}");
    assert!(n.starts_with("src2_x"));
    assert!(n.ends_with("_step_123456"));
    let m = meta(
        Role::KQuant,
        3,
        1,
        "cache_k_quant_l3",
        GgmlType::Q4_0,
        [32, 1, 1, 1],
    );
    assert_eq!(tensor_name(&m, true), "src3_cache_k_quant_l3_step_1");
    let m = meta(Role::Kq, 12, 0, "kq-12", GgmlType::F32, [4, 1, 1, 1]);
    assert_eq!(tensor_name(&m, false), "kq_kq-12_step_0");
    // "-1" inside "-12" does not count as layer 1.
    let m = meta(Role::Kq, 1, 0, "kq-12", GgmlType::F32, [4, 1, 1, 1]);
    assert_eq!(tensor_name(&m, false), "kq_kq-12@l1_step_0");
}

#[test]
fn interrupted_trace_is_marked_and_a_model_is_not_a_trace() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.gguf");
    let w = TraceWriter::new().unwrap();
    let run = RunMeta {
        complete: false,
        ..Default::default()
    };
    w.finish_to_path(&run, &path).unwrap();
    let t = TraceFile::open(&path).unwrap();
    assert!(!t.run.complete);
    assert!(t.tensors.is_empty());

    let model = dir.path().join("m.gguf");
    gguf_io::write_file(&model, &gguf_io::HeaderSpec::default(), |_| Ok(())).unwrap();
    assert!(matches!(
        TraceFile::open(&model),
        Err(trace_format::TraceError::NotATrace)
    ));
}

/// Tensors added as revisions (changes only in the spool) read back whole and exact:
/// two interleaved (layer, role) streams, revisions with no change, one cell, many
/// cells; a revision that names the wrong predecessor, one whose size changed and a
/// plain tensor in between all fall back to spooling everything. The spool holds less
/// than the trace.
#[test]
fn revisions_spool_changes_and_read_back_whole() {
    for storage in [KvStorage::Full, KvStorage::Delta] {
        revisions_round_trip(storage);
    }
}

/// Version 2 stores a tensor whose changes cost more than it (20 one-byte ranges of a
/// 320-byte view: 16 bytes of metadata each) whole, so its spool holds more than half.
fn revisions_round_trip(storage: KvStorage) {
    use trace_format::Revision;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.gguf");
    let mut w = TraceWriter::with_storage(storage).unwrap();
    let mut expected = Vec::new();
    let mut seed = 0x0123_4567_89ab_cdefu64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut ids = 0u64;
    // Per layer: the current bytes and the id the writer last saw for them.
    let mut state: Vec<(Vec<u8>, Option<u64>)> = vec![(Vec::new(), None); 2];
    for step in 0..8u32 {
        w.add_step(StepMeta {
            step,
            positions: vec![step as i32],
            tokens: vec![1],
        });
        for layer in 0..2i32 {
            let cells = if step == 5 && layer == 1 { 12 } else { 10 };
            let m = meta(
                Role::V,
                layer,
                step,
                &format!("cache_v_l{layer} (view)"),
                GgmlType::F16,
                [16, cells, 1, 1],
            );
            let n = m.layout.n_bytes().unwrap() as usize;
            let (cur, last) = &mut state[layer as usize];
            let before = cur.clone();
            if cur.len() != n {
                *cur = (0..n).map(|_| next() as u8).collect();
            } else {
                match step % 3 {
                    0 => {}
                    1 => cur[(step as usize * 32) % n] ^= 0x5a,
                    _ => {
                        for _ in 0..20 {
                            let i = next() as usize % n;
                            cur[i] = cur[i].wrapping_add(3);
                        }
                    }
                }
            }
            ids += 1;
            let since = match (step, layer) {
                // A revision claiming a predecessor the writer never saw.
                (3, 0) => Some((9999, differing_ranges(&before, cur, 1))),
                _ if before.len() == cur.len() => {
                    last.map(|l| (l, differing_ranges(&before, cur, 1)))
                }
                _ => None,
            };
            let rev = Revision { id: ids, since };
            if step == 6 && layer == 0 {
                // A plain tensor breaks the chain: the next revision is spooled whole.
                w.add_tensor(m.clone(), cur, false).unwrap();
                *last = None;
            } else {
                w.add_tensor_revision(m.clone(), cur, false, Some(&rev))
                    .unwrap();
                *last = Some(ids);
            }
            expected.push((m, cur.clone()));
        }
    }
    let share = match storage {
        KvStorage::Full => 2,
        KvStorage::Delta => 1,
    };
    assert!(
        w.spooled_bytes() < w.trace_bytes() / share,
        "{storage:?}: {} of {}",
        w.spooled_bytes(),
        w.trace_bytes()
    );
    let run = RunMeta {
        description: "revisions".into(),
        architecture: "llama".into(),
        n_layer: 2,
        flash_attn: "on".into(),
        prompt_tokens: vec![1],
        target_layer: -1,
        trace_sources: true,
        complete: true,
        ..Default::default()
    };
    w.finish_to_path(&run, &path).unwrap();
    let t = TraceFile::open(&path).unwrap();
    assert_eq!(t.format_version, storage.format_version());
    assert_eq!(t.tensors.len(), expected.len());
    for (tt, (m, bytes)) in t.tensors.iter().zip(&expected) {
        assert_eq!(&tt.meta, m);
        assert_eq!(t.data(tt), &bytes[..], "{}", tt.name);
    }
    // Read again in reverse (no cache to help): the same bytes.
    for (tt, (_, bytes)) in t.tensors.iter().zip(&expected).rev() {
        assert_eq!(t.data(tt), &bytes[..], "{} (reverse)", tt.name);
    }
    if storage == KvStorage::Delta {
        let deltas = (0..t.tensors.len())
            .filter(|&i| t.stored(i) != trace_format::Stored::Whole)
            .count();
        assert!(deltas >= 6, "{deltas} deltas");
    }
}

/// Per-layer rotation (`kqv_trace.run.rotated_k` / `rotated_v`): written, read back and
/// answered per layer; a file without the keys falls back to `kv_rotation` and the cache
/// types; a record its tensors contradict is refused.
#[test]
fn per_layer_rotation_reads_back_and_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    // Layer 0: K rotated, V not; layer 1: V rotated, so it has kqv_out_unrotated.
    let write = |name: &str, run: &RunMeta, unrotated_layer: Option<i32>| {
        let path = dir.path().join(name);
        let mut w = TraceWriter::new().unwrap();
        w.add_step(StepMeta {
            step: 0,
            positions: vec![0],
            tokens: vec![1],
        });
        for layer in 0..2 {
            let mut roles = vec![(Role::KqvOut, format!("kqv_out-{layer}"))];
            if unrotated_layer == Some(layer) {
                roles.push((Role::KqvOutUnrotated, format!("node_{layer}")));
            }
            for (role, name) in roles {
                let m = meta(role, layer, 0, &name, GgmlType::F32, [64, 1, 1, 1]);
                w.add_tensor(m, &[0u8; 256], false).unwrap();
            }
        }
        w.finish_to_path(run, &path).unwrap();
        path
    };
    let run = RunMeta {
        n_layer: 2,
        cache_type_k: "q8_0".into(),
        cache_type_v: "q8_0".into(),
        kv_rotation: true,
        rotated_k_layers: vec![Some(true), Some(false)],
        rotated_v_layers: vec![Some(false), Some(true)],
        target_layer: -1,
        trace_sources: false,
        complete: true,
        ..Default::default()
    };
    let t = TraceFile::open(write("rot.gguf", &run, Some(1))).unwrap();
    assert_eq!(t.run, run);
    assert!(t.run.rotation_recorded());
    assert!(t.run.rotated_k() && t.run.rotated_v());
    assert!(t.run.rotated_k_at(0) && !t.run.rotated_k_at(1));
    assert!(!t.run.rotated_v_at(0) && t.run.rotated_v_at(1));
    let m = t.gguf().metadata();
    assert_eq!(
        m.get(trace_format::keys::RUN_ROTATED_V),
        Some(&gguf_io::Value::from(vec![0i8, 1]))
    );

    // An older trace: no per-layer keys, every layer as kv_rotation and the cache types.
    let old = RunMeta {
        rotated_k_layers: Vec::new(),
        rotated_v_layers: Vec::new(),
        ..run.clone()
    };
    let path = write("old.gguf", &old, Some(0));
    let t = TraceFile::open(&path).unwrap();
    assert!(!t.run.rotation_recorded());
    assert!(t.run.rotated_k_at(1) && t.run.rotated_v_at(0));
    assert!(t
        .gguf()
        .metadata()
        .get(trace_format::keys::RUN_ROTATED_K)
        .is_none());

    // Contradictions: kqv_out_unrotated in a layer whose V was not rotated; a rotated V
    // layer without one; kv_rotation false while a layer is rotated; a wrong length.
    let refused = |name: &str, run: &RunMeta, unrotated: Option<i32>, needle: &str| {
        let e = TraceFile::open(write(name, run, unrotated))
            .err()
            .unwrap_or_else(|| panic!("{name} opened"))
            .to_string();
        assert!(e.contains(needle), "{name}: {e}");
    };
    refused("u0.gguf", &run, Some(0), "kqv_trace.run.rotated_v");
    refused("none.gguf", &run, None, "no kqv_out_unrotated beside it");
    let flag_off = RunMeta {
        kv_rotation: false,
        ..run.clone()
    };
    refused("off.gguf", &flag_off, Some(1), "kqv_trace.run.kv_rotation");
    let short = RunMeta {
        rotated_k_layers: vec![Some(true)],
        ..run.clone()
    };
    refused("short.gguf", &short, Some(1), "1 entries for 2 layers");
}

/// Graph nodes (role `node`, `--tensor-filter`) read back apart from the attention
/// tensors, in table order, with their graph order, names made unique by occurrence, a
/// quantized node kept as blocks; a trace without `kqv_trace.tensor.graph_order` (older
/// writers) reads with no order; a node of a layer below -1 is refused.
#[test]
fn nodes_and_graph_order_round_trip() {
    for storage in [KvStorage::Full, KvStorage::Delta] {
        let mut w = TraceWriter::with_storage(storage).unwrap();
        w.add_step(StepMeta {
            step: 0,
            positions: vec![0, 1],
            tokens: vec![1, 2],
        });
        let f32_bytes = |n: usize, by: f32| -> Vec<u8> {
            (0..n).flat_map(|i| (i as f32 + by).to_le_bytes()).collect()
        };
        let node = |name: &str, ty: GgmlType, ne: [u64; 4]| TensorMeta {
            role: Role::Node,
            layer: trace_format::node_layer(name),
            ..meta(Role::Node, 0, 0, name, ty, ne)
        };
        let q8: Vec<f32> = (0..64).map(|i| (i as f32 - 30.0) / 7.0).collect();
        let q8 = quant::quantize(GgmlType::Q8_0, &q8).unwrap();
        // Two nodes of one name (ggml names repeat), a quantized one, one of no layer.
        let nodes = [
            (
                node("Qcur-0", GgmlType::F32, [8, 2, 1, 1]),
                f32_bytes(16, 0.0),
                3,
            ),
            (
                node("Qcur-0", GgmlType::F32, [4, 2, 2, 1]),
                f32_bytes(16, 0.5),
                4,
            ),
            (
                node("cache_k_l1 (view)", GgmlType::Q8_0, [32, 2, 1, 1]),
                q8,
                7,
            ),
            (
                node("result_norm", GgmlType::F32, [8, 2, 1, 1]),
                f32_bytes(16, 1.0),
                9,
            ),
        ];
        let kqv = meta(Role::KqvOut, 0, 0, "kqv_out-0", GgmlType::F32, [8, 2, 1, 1]);
        w.add_tensor_ordered(kqv, &f32_bytes(16, 2.0), false, None, Some(5))
            .unwrap();
        for (m, b, o) in &nodes {
            w.add_tensor_ordered(m.clone(), b, false, None, Some(*o))
                .unwrap();
        }
        let run = RunMeta {
            n_layer: 2,
            target_layer: -1,
            trace_sources: true,
            complete: true,
            ..Default::default()
        };
        let bytes = w.finish(&run, Vec::new()).unwrap();
        let t = TraceFile::from_gguf(gguf_io::GgufFile::from_bytes(bytes).unwrap()).unwrap();
        assert_eq!(t.tensors.len(), 1, "{storage:?}: attention tensors apart");
        assert_eq!(t.tensors[0].graph_order, Some(5));
        assert_eq!(t.nodes.len(), 4);
        let names: Vec<&str> = t.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "node_Qcur-0_step_0",
                "node_Qcur-0#1_step_0",
                "node_cache_k_l1(view)_step_0",
                "node_result_norm_step_0"
            ]
        );
        assert_eq!(trace_format::read::node_occurrences(&t.nodes), [0, 1, 0, 0]);
        for (n, (m, b, o)) in t.nodes.iter().zip(&nodes) {
            assert_eq!(&n.meta, m);
            assert_eq!(n.graph_order, Some(*o));
            assert_eq!(&t.data(n)[..], &b[..], "{storage:?} {}", n.name);
        }
        assert_eq!(t.nodes[2].meta.layer, 1);
        assert_eq!(t.nodes[3].meta.layer, -1);
    }

    // An older writer's trace: no graph order key, no order.
    let mut w = TraceWriter::new().unwrap();
    w.add_step(StepMeta {
        step: 0,
        positions: vec![0],
        tokens: vec![1],
    });
    let kqv = meta(Role::KqvOut, 0, 0, "kqv_out-0", GgmlType::F32, [8, 1, 1, 1]);
    w.add_tensor(kqv, &[0u8; 32], false).unwrap();
    let run = RunMeta {
        n_layer: 1,
        target_layer: -1,
        trace_sources: true,
        complete: true,
        ..Default::default()
    };
    let bytes = w.finish(&run, Vec::new()).unwrap();
    let g = gguf_io::GgufFile::from_bytes(bytes).unwrap();
    assert!(!g
        .metadata()
        .contains(trace_format::keys::TENSOR_GRAPH_ORDER));
    let t = TraceFile::from_gguf(g).unwrap();
    assert_eq!(t.tensors[0].graph_order, None);
    assert!(t.nodes.is_empty());

    // A node of a layer below -1.
    let mut w = TraceWriter::new().unwrap();
    w.add_step(StepMeta {
        step: 0,
        positions: vec![0],
        tokens: vec![1],
    });
    let mut m = meta(Role::Node, 0, 0, "ffn_out-1", GgmlType::F32, [8, 1, 1, 1]);
    m.layer = -2;
    w.add_tensor_ordered(m, &[0u8; 32], false, None, Some(0))
        .unwrap();
    let bytes = w.finish(&run, Vec::new()).unwrap();
    let e = TraceFile::from_gguf(gguf_io::GgufFile::from_bytes(bytes).unwrap())
        .err()
        .expect("refused");
    assert!(e.to_string().contains("ffn_out-1"), "{e}");
}
