//! Synthetic traces (attn_verify::synth) that verify, then rewritten to lie: what
//! verification does with sizes taken on trust, duplicates, intermediates that disagree,
//! and work over its budget. Nothing may panic, allocate from an unchecked claim, or run
//! unbounded.

use std::time::{Duration, Instant};

use attn_verify::synth::{honest_trace, Spec};
use attn_verify::{
    check, check_in_trace, check_in_trace_with, Group, Limits, Outcome, Suspect, VerifyError,
    FLASH_OP,
};
use gguf_io::{Array, GgmlType, GgufFile, HeaderSpec, Value};
use trace_format::synth::{rewrite, Shapes};
use trace_format::{keys, AttnParams, Role, TensorLayout, TensorMeta, TraceFile, Violation};

fn open(bytes: Vec<u8>) -> TraceFile {
    TraceFile::from_gguf(GgufFile::from_bytes(bytes).unwrap()).unwrap()
}

fn spec(flash: bool) -> Spec {
    Spec {
        shapes: Shapes {
            flash,
            ..Shapes::default()
        },
        ..Spec::default()
    }
}

fn checked(o: Outcome) -> attn_verify::Checked {
    match o {
        Outcome::Checked(c) => c,
        Outcome::Missing(m) => panic!("missing {m}"),
    }
}

/// Rewrite the honest trace of `spec`; `edit` gets the trace (to find tensors), the
/// header and the data.
fn planted(
    spec: &Spec,
    edit: impl FnOnce(&TraceFile, &mut HeaderSpec, &mut Vec<Vec<u8>>),
) -> TraceFile {
    let honest = honest_trace(spec).unwrap();
    let t = open(honest.clone());
    open(rewrite(&honest, |h, d| edit(&t, h, d)).unwrap())
}

fn f32s_mut(d: &mut [u8], f: impl Fn(usize, f32) -> f32) {
    for (i, c) in d.chunks_exact_mut(4).enumerate() {
        let x = f(i, f32::from_le_bytes(c.try_into().unwrap()));
        c.copy_from_slice(&x.to_le_bytes());
    }
}

#[test]
fn honest_synthetic_traces_verify_with_their_intermediates() {
    for flash in [true, false] {
        let t = open(honest_trace(&spec(flash)).unwrap());
        assert!(t.problems().is_empty(), "{:#?}", t.problems());
        assert_eq!(t.groups().len(), 4);
        for &(s, l) in t.groups().keys() {
            let c = checked(check_in_trace(&t, s, l).unwrap());
            assert!(c.pass && c.findings.is_empty(), "flash={flash}: {c:?}");
            assert!(c.verification.nmse < 1e-12, "{c:?}");
        }
    }
}

#[test]
fn a_zero_byte_k_view_claiming_2_pow_60_cells_is_refused_quickly() {
    let start = Instant::now();
    let t = planted(&spec(true), |t, h, d| {
        let k = t.find(Role::K, 0, 0).unwrap().index;
        h.tensors[k].dims = vec![0, 1 << 60, 1, 1];
        d[k].clear();
    });
    let e = check_in_trace(&t, 0, 0).unwrap_err();
    assert!(
        matches!(
            &e,
            VerifyError::Invalid {
                first: Violation::Shape { role: Role::K, .. },
                ..
            }
        ),
        "{e}"
    );
    assert!(!e.line().contains('\n'));
    // The other groups are still checked.
    assert!(checked(check_in_trace(&t, 1, 0).unwrap()).pass);
    // Live captures (no validation pass) are refused by the group itself.
    let meta = |role, ne: [u64; 4]| TensorMeta {
        role,
        layer: 0,
        step: 0,
        ggml_name: role.to_string(),
        op: "NONE".into(),
        layout: TensorLayout {
            ty: GgmlType::F32,
            ne,
            nb: [4, 16, 16, 16],
        },
        view_of: String::new(),
    };
    let q = meta(Role::Q, [4, 1, 1, 1]);
    let k = meta(Role::K, [0, 1 << 60, 1, 1]);
    let v = meta(Role::V, [4, 1 << 60, 0, 1]);
    let o = meta(Role::KqvOut, [4, 1, 1, 1]);
    let qb = [0u8; 16];
    let g = Group::from_tensors(
        0,
        0,
        FLASH_OP,
        AttnParams::default(),
        &[],
        [(&q, &qb[..]), (&k, &[][..]), (&v, &[][..]), (&o, &qb[..])],
    )
    .unwrap();
    let e = check(&g, None).unwrap_err();
    assert!(e.to_string().contains("zero dimension"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_group_over_the_work_budget_is_refused_before_any_work() {
    let t = open(honest_trace(&spec(true)).unwrap());
    // 1 seq x 2 heads x 2 tokens x 6 cells x (4 + 4) = 192 multiply-adds.
    let tight = Limits { max_work: 191 };
    let e = check_in_trace_with(&t, 1, 1, &tight).unwrap_err();
    assert!(
        matches!(
            e,
            VerifyError::Budget {
                work: 192,
                limit: 191,
                step: 1,
                layer: 1
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("over the work budget of 191"), "{e}");
    assert!(checked(check_in_trace_with(&t, 1, 1, &Limits { max_work: 192 }).unwrap()).pass);
}

#[test]
fn a_duplicate_kqv_out_with_other_values_is_reported_not_ignored() {
    // Group (1, 0)'s kqv_out relabelled (0, 0): two kqv_out there, with other values.
    let t = planted(&spec(true), |t, h, _| {
        let i = t.find(Role::KqvOut, 0, 1).unwrap().index;
        let Some(Value::Array(Array::U32(steps))) = h.metadata.get(keys::TENSOR_STEP) else {
            panic!()
        };
        let mut steps = steps.clone();
        steps[i] = 0;
        h.metadata.set(keys::TENSOR_STEP, steps);
    });
    let e = check_in_trace(&t, 0, 0).unwrap_err();
    assert!(
        matches!(
            &e,
            VerifyError::Invalid {
                first: Violation::Duplicate {
                    role: Role::KqvOut,
                    ..
                },
                ..
            }
        ),
        "{e}"
    );
    assert!(checked(check_in_trace(&t, 0, 1).unwrap()).pass);
}

#[test]
fn intermediates_that_disagree_fail_their_group_and_are_named() {
    for (flash, role, word) in [
        (true, Role::Attn, "differs from kqv_out in 1 of"),
        (false, Role::Attn, "differs from kqv_out in 1 of"),
        (false, Role::Kq, "is not K·Q"),
        (false, Role::KqSoftMax, "is not softmax"),
    ] {
        let t = planted(&spec(flash), |t, _, d| {
            let i = t.find(role, 1, 1).unwrap().index;
            f32s_mut(&mut d[i], |j, x| if j == 3 { x + 0.5 } else { x });
        });
        for &(s, l) in t.groups().keys() {
            let c = checked(check_in_trace(&t, s, l).unwrap());
            if (s, l) != (1, 1) {
                assert!(c.pass, "{c:?}");
                continue;
            }
            assert!(!c.pass, "{role}: {c:?}");
            // kqv_out itself still matches its inputs.
            assert!(c.verification.nmse < 1e-12);
            // A wrong kq also makes the traced softmax disagree with the softmax of it.
            let n = if role == Role::Kq { 2 } else { 1 };
            assert_eq!(c.findings.len(), n, "{:?}", c.findings);
            let f = &c.findings[0];
            assert_eq!(f.suspect, Suspect::Tensor(role));
            assert_eq!(f.tensor, t.find(role, 1, 1).unwrap().name);
            assert!(f.what.contains(word), "{}", f.what);
        }
    }
}

/// A failed group with many query heads: the q-head search is bounded (skipped over
/// MAX_DIAGNOSIS_HEADS heads, and stopped by the diagnosis budget below it).
#[test]
fn the_diagnosis_of_a_failed_group_is_bounded() {
    // The group's own recomputation: heads x 1 token x 2 cells x (1 + 1).
    for (heads, word) in [(2048u64, "search skipped"), (512, "work budget")] {
        let s = Spec {
            shapes: Shapes {
                head_dim: 1,
                n_tokens: 1,
                n_head: heads,
                n_head_kv: 1,
                n_kv: 2,
                flash: true,
            },
            n_steps: 1,
            n_layer: 1,
            seed: 3,
        };
        let t = planted(&s, |t, _, d| {
            let i = t.find(Role::KqvOut, 0, 0).unwrap().index;
            f32s_mut(&mut d[i], |j, x| if j % 3 == 0 { x + 1.0 } else { x });
        });
        let start = Instant::now();
        let limits = Limits {
            max_work: heads * 4,
        };
        let c = checked(check_in_trace_with(&t, 0, 0, &limits).unwrap());
        assert!(!c.pass);
        assert!(
            c.notes.iter().any(|n| n.contains(word)),
            "{heads}: {:?}",
            c.notes
        );
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{:?}",
            start.elapsed()
        );
    }
}
