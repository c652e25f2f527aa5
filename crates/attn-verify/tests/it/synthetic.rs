//! Verification through the public API without llama.cpp: small F32 groups built with
//! `Group::from_tensors` (what `kqv-trace-monitor --verify` does with live captures), whose
//! `kqv_out` is the f64 reference itself (passes), a perturbed copy (fails, with the heads
//! and tokens over the bound), or absent (missing); and the same for a mixed KV cache group
//! (cold and hot stores). The end-to-end tests on real llama.cpp traces are in
//! crates/kqv-trace-monitor/tests (planted.rs, capture.rs, mixed.rs, gemma.rs).

use attn_verify::mixed::MIXED_NMSE_BOUND;
use attn_verify::{check, nmse_bound, Group, Missing, Outcome, FLASH_OP};
use gguf_io::GgmlType;
use tensor_stats::{attention, AttentionParams, Dense};
use trace_format::{AttnParams, Role, TensorLayout, TensorMeta, MIXED_ATTN_OP};

const D: usize = 4;
const T: usize = 2;
const H: usize = 2;

fn values(n: usize, seed: u32) -> Vec<f32> {
    // Deterministic, varied, in [-1, 1).
    (0..n)
        .map(|i| {
            let x = (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed * 97)
                >> 8;
            (x % 2000) as f32 / 1000.0 - 1.0
        })
        .collect()
}

fn meta(role: Role, ne: [usize; 4]) -> TensorMeta {
    TensorMeta {
        role,
        layer: 0,
        step: 1,
        ggml_name: format!("{}-0", role.name()),
        op: "NONE".into(),
        layout: TensorLayout::contiguous(GgmlType::F32, ne.map(|x| x as u64)).unwrap(),
        view_of: String::new(),
    }
}

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

const PARAMS: AttnParams = AttnParams {
    scale: 0.5,
    max_bias: 0.0,
    softcap: 0.0,
};

fn reference(q: &Dense, k: &Dense, v: &Dense, mask: Option<&Dense>) -> Vec<f32> {
    let p = AttentionParams {
        scale: f64::from(PARAMS.scale),
        max_bias: 0.0,
        softcap: 0.0,
    };
    let r = attention(q, k, v, mask, None, &p).unwrap();
    r.data.iter().map(|&x| x as f32).collect()
}

/// The tensors of a flash-attention group over `n_kv` cells, `kqv_out` = the reference
/// plus `delta` on its first element.
fn flash_tensors(n_kv: usize, delta: f32) -> Vec<(TensorMeta, Vec<f32>)> {
    let (qn, kn) = ([D, T, H, 1], [D, n_kv, 1, 1]);
    let (q, k, v) = (
        values(D * T * H, 1),
        values(D * n_kv, 2),
        values(D * n_kv, 3),
    );
    let dense = |ne, x: &[f32]| Dense::from_f32(ne, x).unwrap();
    let mut out = reference(&dense(qn, &q), &dense(kn, &k), &dense(kn, &v), None);
    out[0] += delta;
    vec![
        (meta(Role::Q, qn), q),
        (meta(Role::K, kn), k),
        (meta(Role::V, kn), v),
        (meta(Role::KqvOut, [D * H, T, 1, 1]), out),
    ]
}

fn group(op: &str, tensors: &[(TensorMeta, Vec<f32>)]) -> Group {
    let data: Vec<(TensorMeta, Vec<u8>)> =
        tensors.iter().map(|(m, v)| (m.clone(), bytes(v))).collect();
    Group::from_tensors(
        1,
        0,
        op,
        PARAMS,
        &[7, 8],
        data.iter().map(|(m, b)| (m, b.as_slice())),
    )
    .unwrap()
}

fn checked(o: Outcome) -> attn_verify::Checked {
    match o {
        Outcome::Checked(c) => c,
        Outcome::Missing(m) => panic!("missing {m}"),
    }
}

#[test]
fn a_group_whose_output_is_the_reference_passes_its_bound() {
    let c = checked(check(&group(FLASH_OP, &flash_tensors(3, 0.0)), None).unwrap());
    assert!(c.pass, "{c:?}");
    assert_eq!(c.op, FLASH_OP);
    assert_eq!(c.bound, nmse_bound(GgmlType::F32, true, 3));
    assert!(c.verification.nmse <= 1e-12, "{c:?}");
    assert_eq!(c.verification.n_elements, D * H * T);
    assert!(c.findings.is_empty() && c.bad_heads.is_empty() && c.bad_tokens.is_empty());
}

#[test]
fn a_perturbed_output_fails_and_names_its_head_and_token() {
    let c = checked(check(&group(FLASH_OP, &flash_tensors(3, 0.5)), None).unwrap());
    assert!(!c.pass, "{c:?}");
    // The first element: token 0, head 0, dim 0 (position 7).
    assert_eq!(c.verification.worst, (0, 0, 0));
    assert_eq!(c.verification.worst_position, Some(7));
    assert_eq!(c.bad_heads, [0]);
    assert_eq!(c.bad_tokens, [0]);
}

#[test]
fn a_group_without_q_or_op_is_missing_them() {
    let mut t = flash_tensors(3, 0.0);
    t.remove(0);
    match check(&group(FLASH_OP, &t), None).unwrap() {
        Outcome::Missing(m) => assert_eq!(m, Missing(vec!["q"])),
        Outcome::Checked(c) => panic!("checked without q: {c:?}"),
    }
    match check(&group("", &flash_tensors(3, 0.0)), None).unwrap() {
        Outcome::Missing(m) => assert_eq!(m, Missing(vec!["attention op parameters"])),
        Outcome::Checked(c) => panic!("checked without op parameters: {c:?}"),
    }
}

/// The mixed node: cold rows in front of the hot rows, the mask over both.
fn mixed_tensors(delta: f32) -> Vec<(TensorMeta, Vec<f32>)> {
    let (n_cold, n_hot) = (2, 3);
    let n = n_cold + n_hot;
    let (qn, cold, hot, all) = (
        [D, T, H, 1],
        [D, n_cold, 1, 1],
        [D, n_hot, 1, 1],
        [D, n, 1, 1],
    );
    let q = values(D * T * H, 4);
    let (kc, vc) = (values(D * n_cold, 5), values(D * n_cold, 6));
    let (kh, vh) = (values(D * n_hot, 7), values(D * n_hot, 8));
    // The last token does not see the last hot cell.
    let mut mask = vec![0f32; n * T];
    mask[n * T - 1] = f32::NEG_INFINITY;
    let cat = |a: &[f32], b: &[f32]| [a, b].concat();
    let dense = |ne, x: &[f32]| Dense::from_f32(ne, x).unwrap();
    let mut out = reference(
        &dense(qn, &q),
        &dense(all, &cat(&kc, &kh)),
        &dense(all, &cat(&vc, &vh)),
        Some(&dense([n, T, 1, 1], &mask)),
    );
    out[D * H + 1] += delta;
    vec![
        (meta(Role::Q, qn), q),
        (meta(Role::K, hot), kh),
        (meta(Role::V, hot), vh),
        (meta(Role::KQuant, cold), kc),
        (meta(Role::VQuant, cold), vc),
        (meta(Role::Mask, [n, T, 1, 1]), mask),
        (meta(Role::KqvOut, [D * H, T, 1, 1]), out),
    ]
}

#[test]
fn a_mixed_group_is_checked_over_its_cold_and_hot_stores() {
    let c = checked(check(&group(MIXED_ATTN_OP, &mixed_tensors(0.0)), None).unwrap());
    assert!(c.pass, "{c:?}");
    assert_eq!((c.op.as_str(), c.bound), (MIXED_ATTN_OP, MIXED_NMSE_BOUND));
    assert!(c.verification.nmse <= 1e-12, "{c:?}");

    // Token 1, head 0, dim 1 perturbed.
    let c = checked(check(&group(MIXED_ATTN_OP, &mixed_tensors(0.5)), None).unwrap());
    assert!(!c.pass, "{c:?}");
    assert_eq!(c.verification.worst, (1, 0, 1));
    assert_eq!(
        (c.bad_heads.as_slice(), c.bad_tokens.as_slice()),
        (&[0][..], &[1][..])
    );
    assert!(
        c.findings.is_empty(),
        "no diagnosis for the mixed op: {c:?}"
    );

    // A cold store alone makes a group mixed; without its mask it is missing that.
    let mut t = mixed_tensors(0.0);
    t.retain(|(m, _)| m.role != Role::Mask);
    match check(&group(MIXED_ATTN_OP, &t), None).unwrap() {
        Outcome::Missing(m) => assert_eq!(m, Missing(vec!["mask"])),
        Outcome::Checked(c) => panic!("checked without mask: {c:?}"),
    }
}
