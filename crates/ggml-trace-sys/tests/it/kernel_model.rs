//! The verification's kernel model (`attn_verify::kernel`) against its oracle, ggml
//! itself: `FLASH_ATTN_EXT` computed by ggml-cpu through the FFI on random inputs, for
//! each path ggml takes (one-chunk, split-KV at 512+ cells with 1-4 threads, tiled from 64
//! query tokens), each cache type the paths read (F16, F32, Q8_0, Q4_0), with a mask,
//! ALiBi, softcap and sinks; then checked by `attn_verify::check` as a live group would be.
//! The faithful reference must reproduce ggml's output to the documented bound (on an
//! AVX2 build: bit for bit where the path is modelled exactly), while the exact f64
//! reference is measurably farther away.

use std::ptr;

use attn_verify::{check, kernel::KernelPath, Group, KernelFacts, Outcome};
use ggml_trace_sys::sys;
use gguf_io::{quant, GgmlType};
use test_support::Rng;
use trace_format::{AttnParams, Role, TensorLayout, TensorMeta};

#[derive(Clone, Copy, Debug)]
struct Case {
    d: usize,
    n_head: usize,
    n_head_kv: usize,
    n_tokens: usize,
    n_kv: usize,
    ty: GgmlType,
    threads: i32,
    max_bias: f32,
    softcap: f32,
    sinks: bool,
}

impl Case {
    fn new(n_tokens: usize, n_kv: usize, ty: GgmlType, threads: i32) -> Self {
        Self {
            d: 64,
            n_head: 4,
            n_head_kv: 2,
            n_tokens,
            n_kv,
            ty,
            threads,
            max_bias: 0.0,
            softcap: 0.0,
            sinks: false,
        }
    }
}

fn meta(role: Role, ty: GgmlType, ne: [u64; 4]) -> TensorMeta {
    TensorMeta {
        role,
        layer: 0,
        step: 1,
        ggml_name: format!("{}-0", role.name()),
        op: "NONE".into(),
        layout: TensorLayout::contiguous(ty, ne).unwrap(),
        view_of: String::new(),
    }
}

/// ggml's flash attention of random inputs; the group a capture would hand over.
fn run(c: &Case, seed: u64) -> Group {
    let mut rng = Rng::new(seed);
    let (d, h, hkv, t, n) = (c.d, c.n_head, c.n_head_kv, c.n_tokens, c.n_kv);
    let q: Vec<f32> = (0..d * t * h).map(|_| rng.normal()).collect();
    let k: Vec<f32> = (0..d * n * hkv).map(|_| rng.normal()).collect();
    let v: Vec<f32> = (0..d * n * hkv).map(|_| rng.normal()).collect();
    // Causal over the last `t` cells, and every 7th older cell masked out.
    let mask: Vec<f32> = (0..t)
        .flat_map(|ti| {
            (0..n).map(move |j| {
                let visible = j + t <= n + ti && j % 7 != 3;
                if visible {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    let sinks: Vec<f32> = (0..h).map(|_| rng.normal()).collect();
    let k_bytes = quant::quantize(c.ty, &k).unwrap();
    let v_bytes = quant::quantize(c.ty, &v).unwrap();
    let m_bytes = quant::quantize(GgmlType::F16, &mask).unwrap();
    let scale = 1.0 / (d as f32).sqrt();
    let params = AttnParams {
        scale,
        max_bias: c.max_bias,
        softcap: c.softcap,
    };
    // SAFETY: one context owns every tensor; each copy fills exactly its tensor's bytes
    // (sizes asserted), and everything is read before ggml_free.
    let out = unsafe {
        let ctx = sys::ggml_init(sys::ggml_init_params {
            mem_size: 256 << 20,
            mem_buffer: ptr::null_mut(),
            no_alloc: false,
        });
        assert!(!ctx.is_null());
        let fill = |ty: sys::ggml_type, ne: [i64; 4], bytes: &[u8]| {
            let x = sys::ggml_new_tensor_4d(ctx, ty, ne[0], ne[1], ne[2], ne[3]);
            assert_eq!(sys::ggml_nbytes(x), bytes.len());
            ptr::copy_nonoverlapping(bytes.as_ptr(), (*x).data as *mut u8, bytes.len());
            x
        };
        let gt = |ty: GgmlType| ty.0 as sys::ggml_type;
        let qt = fill(
            sys::GGML_TYPE_F32,
            [d as i64, t as i64, h as i64, 1],
            bytemuck::cast_slice(&q),
        );
        let kt = fill(gt(c.ty), [d as i64, n as i64, hkv as i64, 1], &k_bytes);
        let vt = fill(gt(c.ty), [d as i64, n as i64, hkv as i64, 1], &v_bytes);
        let mt = fill(sys::GGML_TYPE_F16, [n as i64, t as i64, 1, 1], &m_bytes);
        let fa = sys::ggml_flash_attn_ext(ctx, qt, kt, vt, mt, scale, c.max_bias, c.softcap);
        sys::ggml_flash_attn_ext_set_prec(fa, sys::GGML_PREC_F32);
        if c.sinks {
            let st = fill(
                sys::GGML_TYPE_F32,
                [h as i64, 1, 1, 1],
                bytemuck::cast_slice(&sinks),
            );
            sys::ggml_flash_attn_ext_add_sinks(fa, st);
        }
        let graph = sys::ggml_new_graph(ctx);
        sys::ggml_build_forward_expand(graph, fa);
        assert_eq!(
            sys::ggml_graph_compute_with_ctx(ctx, graph, c.threads),
            sys::GGML_STATUS_SUCCESS
        );
        let len = sys::ggml_nelements(fa) as usize;
        let out = std::slice::from_raw_parts((*fa).data as *const f32, len).to_vec();
        sys::ggml_free(ctx);
        out
    };
    let mut tensors = vec![
        (
            meta(Role::Q, GgmlType::F32, [d as u64, t as u64, h as u64, 1]),
            bytemuck::cast_slice(&q).to_vec(),
        ),
        (
            meta(Role::K, c.ty, [d as u64, n as u64, hkv as u64, 1]),
            k_bytes,
        ),
        (
            meta(Role::V, c.ty, [d as u64, n as u64, hkv as u64, 1]),
            v_bytes,
        ),
        (
            meta(Role::Mask, GgmlType::F16, [n as u64, t as u64, 1, 1]),
            m_bytes,
        ),
        (
            meta(
                Role::KqvOut,
                GgmlType::F32,
                [(d * h) as u64, t as u64, 1, 1],
            ),
            bytemuck::cast_slice(&out).to_vec(),
        ),
    ];
    if c.sinks {
        tensors.push((
            meta(Role::Sinks, GgmlType::F32, [h as u64, 1, 1, 1]),
            bytemuck::cast_slice(&sinks).to_vec(),
        ));
    }
    let positions: Vec<i32> = (0..t as i32).map(|i| n as i32 - t as i32 + i).collect();
    let mut g = Group::from_tensors(
        1,
        0,
        "FLASH_ATTN_EXT",
        params,
        &positions,
        tensors.iter().map(|(m, b)| (m, b.as_slice())),
    )
    .unwrap();
    g.kernel = KernelFacts {
        backend: "CPU".into(),
        n_threads: c.threads as u32,
        simd: ggml_trace_sys::cpu_simd(),
    };
    g
}

/// Checks one case: the path ggml took is the one named, the group verifies against the
/// faithful reference, and the faithful NMSE is returned with the exact one.
fn verify(label: &str, c: Case, path: KernelPath) -> (f64, f64) {
    let g = run(&c, 17 + c.n_kv as u64 * 31 + c.n_tokens as u64);
    let Outcome::Checked(r) = check(&g, None).unwrap() else {
        panic!("{label}: missing inputs")
    };
    assert_eq!(r.kernel, Ok(path), "{label}");
    assert!(
        r.pass,
        "{label}: NMSE {} against the faithful reference, bound {} (exact {:?}): {:?}",
        r.verification.nmse, r.bound, r.exact_nmse, r.findings
    );
    let exact = r
        .exact_nmse
        .expect("modelled paths report the exact distance");
    (r.verification.nmse, exact)
}

fn avx2() -> bool {
    ggml_trace_sys::cpu_simd()
        .split_whitespace()
        .any(|f| f == "avx2")
        && !ggml_trace_sys::cpu_simd().contains("avx512")
}

#[test]
fn one_chunk_with_an_f16_accumulator_is_reproduced() {
    for (t, n) in [(1, 100), (3, 400), (9, 700)] {
        let (f, e) = verify(
            &format!("f16 {t}x{n}"),
            Case::new(t, n, GgmlType::F16, 2),
            KernelPath::OneChunk,
        );
        if avx2() {
            assert_eq!(f, 0.0, "one-chunk {t}x{n}: bit for bit on AVX2");
        }
        // The F16 accumulator is the kernel's own error: far above the faithful distance.
        assert!(
            e > 1e-8 && e > 1e3 * f.max(1e-15),
            "{t}x{n}: exact {e}, faithful {f}"
        );
    }
}

#[test]
fn split_kv_is_reproduced_for_each_thread_count() {
    for threads in 1..=4 {
        for n in [512, 1500, 4096] {
            let (f, e) = verify(
                &format!("split {threads} threads {n} cells"),
                Case::new(1, n, GgmlType::F16, threads),
                KernelPath::SplitKv {
                    n_chunks: threads as usize,
                },
            );
            if avx2() {
                assert_eq!(f, 0.0, "split-KV {threads}x{n}: bit for bit on AVX2");
            }
            assert!(
                e > 1e3 * f.max(1e-15),
                "{threads}x{n}: exact {e}, faithful {f}"
            );
        }
    }
}

#[test]
fn tiled_and_f32_paths_are_within_f32_rounding() {
    verify(
        "tiled f16",
        Case::new(70, 300, GgmlType::F16, 2),
        KernelPath::Tiled,
    );
    verify(
        "tiled f32",
        Case::new(64, 200, GgmlType::F32, 3),
        KernelPath::Tiled,
    );
    verify(
        "split f32",
        Case::new(1, 600, GgmlType::F32, 2),
        KernelPath::SplitKv { n_chunks: 2 },
    );
    verify(
        "one-chunk f32",
        Case::new(1, 100, GgmlType::F32, 2),
        KernelPath::OneChunk,
    );
}

#[test]
fn quantized_caches_take_the_one_chunk_path_with_an_f32_accumulator() {
    for ty in [GgmlType::Q8_0, GgmlType::Q4_0] {
        // Quantized caches never split nor tile.
        verify(
            &format!("{ty:?} decode"),
            Case::new(1, 900, ty, 2),
            KernelPath::OneChunk,
        );
        verify(
            &format!("{ty:?} batch"),
            Case::new(80, 300, ty, 2),
            KernelPath::OneChunk,
        );
    }
}

#[test]
fn softcap_alibi_and_sinks_are_reproduced() {
    let base = Case::new(1, 800, GgmlType::F16, 2);
    let split = KernelPath::SplitKv { n_chunks: 2 };
    verify(
        "softcap",
        Case {
            softcap: 30.0,
            ..base
        },
        split,
    );
    verify(
        "alibi",
        Case {
            max_bias: 8.0,
            ..base
        },
        split,
    );
    verify(
        "sinks",
        Case {
            sinks: true,
            ..base
        },
        split,
    );
    verify(
        "sinks one-chunk",
        Case {
            sinks: true,
            ..Case::new(2, 100, GgmlType::F16, 2)
        },
        KernelPath::OneChunk,
    );
}

/// The verdict separates a one-cell defect from rounding at a context length where the
/// exact reference cannot: one recent K cell of 4096 scaled by 1.1 fails, while the honest
/// group passes. Scaled by 3, its effect stands well above the F16 accumulator's rounding
/// and the one-cell diagnosis names the key and the cell (smaller effects are named in
/// saved traces by the previous-step check instead: the monitor's long-context tests).
#[test]
fn a_one_cell_defect_fails_where_the_exact_reference_could_not_tell() {
    let c = Case::new(1, 4096, GgmlType::F16, 2);
    let honest = run(&c, 99);
    let Outcome::Checked(ok) = check(&honest, None).unwrap() else {
        panic!()
    };
    assert!(ok.pass, "{ok:?}");
    let cell = 4090;
    for factor in [1.1f32, 3.0] {
        let mut planted = honest.clone();
        let k = planted
            .operands
            .iter_mut()
            .find(|o| o.role == Role::K)
            .unwrap();
        for x in &mut k.values[cell * c.d..(cell + 1) * c.d] {
            *x = half::f16::from_f32(*x * factor).to_f32();
        }
        let Outcome::Checked(bad) = check(&planted, None).unwrap() else {
            panic!()
        };
        assert!(!bad.pass, "x{factor}: {bad:?}");
        // An exact-reference bound could not have told: the honest group's own kernel
        // error is larger than this defect's effect.
        if factor == 1.1 {
            assert!(
                ok.exact_nmse.unwrap() > bad.verification.nmse,
                "{ok:?}\n{bad:?}"
            );
        } else {
            assert!(
                bad.findings
                    .iter()
                    .any(|f| f.suspect == attn_verify::Suspect::Tensor(Role::K)
                        && f.what.starts_with(&format!("cell {cell} "))),
                "{:#?}",
                bad.findings
            );
        }
    }
}

/// Without flash attention, a score bias added to `kq` before the softmax (T5's
/// relative-position bias): ggml's own `MUL_MAT` → `ADD` → `SOFT_MAX` → `MUL_MAT` on random
/// inputs is reproduced by the unfused model when the group carries the bias as
/// `kq_bias`, and fails without it.
#[test]
fn a_score_bias_before_the_softmax_is_reproduced() {
    let (d, h, hkv, t, n) = (64usize, 4usize, 2usize, 3usize, 40usize);
    let mut rng = Rng::new(5);
    let q: Vec<f32> = (0..d * t * h).map(|_| rng.normal()).collect();
    let k: Vec<f32> = (0..d * n * hkv).map(|_| rng.normal()).collect();
    let v: Vec<f32> = (0..d * n * hkv).map(|_| rng.normal()).collect();
    // [n_kv, T, H]: a per-head bias of a few units, as T5's buckets give.
    let bias: Vec<f32> = (0..n * t * h).map(|_| 2.0 * rng.normal()).collect();
    let mask: Vec<f32> = (0..t)
        .flat_map(|ti| {
            (0..n).map(move |j| {
                if j <= n - t + ti {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    let k_bytes = quant::quantize(GgmlType::F16, &k).unwrap();
    // V transposed, as the non-flash path reads it: [n_kv, D, H_kv].
    let vt: Vec<f32> = (0..hkv)
        .flat_map(|hh| {
            let v = &v;
            (0..d).flat_map(move |dd| (0..n).map(move |j| v[(hh * n + j) * d + dd]))
        })
        .collect();
    let v_bytes = quant::quantize(GgmlType::F16, &vt).unwrap();
    let scale = 0.5f32;
    // SAFETY: one context owns every tensor; each copy fills exactly its tensor's bytes
    // (sizes asserted), and everything is read before ggml_free.
    let out = unsafe {
        let ctx = sys::ggml_init(sys::ggml_init_params {
            mem_size: 64 << 20,
            mem_buffer: ptr::null_mut(),
            no_alloc: false,
        });
        assert!(!ctx.is_null());
        let fill = |ty: sys::ggml_type, ne: [i64; 4], bytes: &[u8]| {
            let x = sys::ggml_new_tensor_4d(ctx, ty, ne[0], ne[1], ne[2], ne[3]);
            assert_eq!(sys::ggml_nbytes(x), bytes.len());
            ptr::copy_nonoverlapping(bytes.as_ptr(), (*x).data as *mut u8, bytes.len());
            x
        };
        let (d, h, hkv, t, n) = (d as i64, h as i64, hkv as i64, t as i64, n as i64);
        let qt = fill(sys::GGML_TYPE_F32, [d, t, h, 1], bytemuck::cast_slice(&q));
        let kt = fill(sys::GGML_TYPE_F16, [d, n, hkv, 1], &k_bytes);
        let vtt = fill(sys::GGML_TYPE_F16, [n, d, hkv, 1], &v_bytes);
        let bt = fill(
            sys::GGML_TYPE_F32,
            [n, t, h, 1],
            bytemuck::cast_slice(&bias),
        );
        let mt = fill(
            sys::GGML_TYPE_F32,
            [n, t, 1, 1],
            bytemuck::cast_slice(&mask),
        );
        let kq = sys::ggml_mul_mat(ctx, kt, qt);
        sys::ggml_mul_mat_set_prec(kq, sys::GGML_PREC_F32);
        let kq = sys::ggml_add(ctx, kq, bt);
        let sm = sys::ggml_soft_max_ext(ctx, kq, mt, scale, 0.0);
        let kqv = sys::ggml_mul_mat(ctx, vtt, sm);
        let out = sys::ggml_cont(ctx, sys::ggml_permute(ctx, kqv, 0, 2, 1, 3));
        let graph = sys::ggml_new_graph(ctx);
        sys::ggml_build_forward_expand(graph, out);
        assert_eq!(
            sys::ggml_graph_compute_with_ctx(ctx, graph, 2),
            sys::GGML_STATUS_SUCCESS
        );
        let len = sys::ggml_nelements(out) as usize;
        let o = std::slice::from_raw_parts((*out).data as *const f32, len).to_vec();
        sys::ggml_free(ctx);
        o
    };
    let (du, tu, hu, hkvu, nu) = (d as u64, t as u64, h as u64, hkv as u64, n as u64);
    let mut tensors = vec![
        (
            meta(Role::Q, GgmlType::F32, [du, tu, hu, 1]),
            bytemuck::cast_slice(&q).to_vec(),
        ),
        (meta(Role::K, GgmlType::F16, [du, nu, hkvu, 1]), k_bytes),
        (meta(Role::V, GgmlType::F16, [nu, du, hkvu, 1]), v_bytes),
        (
            meta(Role::Mask, GgmlType::F32, [nu, tu, 1, 1]),
            bytemuck::cast_slice(&mask).to_vec(),
        ),
        (
            meta(Role::KqvOut, GgmlType::F32, [du * hu, tu, 1, 1]),
            bytemuck::cast_slice(&out).to_vec(),
        ),
    ];
    let group = |tensors: &[(TensorMeta, Vec<u8>)]| {
        let positions: Vec<i32> = (0..t as i32).map(|i| (n - t) as i32 + i).collect();
        let mut g = Group::from_tensors(
            1,
            0,
            "SOFT_MAX",
            AttnParams {
                scale,
                max_bias: 0.0,
                softcap: 0.0,
            },
            &positions,
            tensors.iter().map(|(m, b)| (m, b.as_slice())),
        )
        .unwrap();
        g.kernel = KernelFacts {
            backend: "CPU".into(),
            n_threads: 2,
            simd: ggml_trace_sys::cpu_simd(),
        };
        let Outcome::Checked(r) = check(&g, None).unwrap() else {
            panic!("missing inputs")
        };
        r
    };
    let without = group(&tensors);
    assert!(!without.pass, "the bias matters: {without:?}");
    tensors.push((
        meta(Role::KqBias, GgmlType::F32, [nu, tu, hu, 1]),
        bytemuck::cast_slice(&bias).to_vec(),
    ));
    let with = group(&tensors);
    assert_eq!(with.kernel, Ok(KernelPath::Unfused));
    assert!(
        with.pass,
        "NMSE {} bound {} (exact {:?}): {:?}",
        with.verification.nmse, with.bound, with.exact_nmse, with.findings
    );
    assert!(with.verification.nmse < 1e-12, "{}", with.verification.nmse);
}

/// The Q8_0 rounding of Q (and of an unfused softmax) against ggml-cpu's own
/// `from_float` for Q8_0 (the `quantize_row_q8_0` the build runs): on an AVX2 build the
/// model's `q8_0_row_x86` gives the same values bit for bit, on random rows and on rows
/// made to hit its two differences from the reference quantizer (`127 / amax` for the
/// multiplier instead of `1 / d`; ties rounded to even), where the reference quantizer
/// is shown to differ. (A q8_0-cache run on a tiny model with heads of 32 failed
/// verification at one group before: one Q value one step off.)
#[test]
fn q8_0_operands_are_rounded_as_the_cpu_build_rounds_them() {
    if !avx2() {
        eprintln!("skipped: the model follows x86 AVX2's quantize_row_q8_0 only on such builds");
        return;
    }
    // SAFETY: initialises ggml-cpu's tables; idempotent.
    unsafe { sys::ggml_cpu_init() };
    // SAFETY: a static table of ggml-cpu.
    let from_float = unsafe { (*sys::ggml_get_type_traits_cpu(sys::GGML_TYPE_Q8_0)).from_float }
        .expect("Q8_0 has from_float");
    let ggml = |row: &[f32]| -> Vec<f32> {
        let mut bytes = vec![0u8; row.len() / 32 * 34];
        // SAFETY: `bytes` holds row.len()/32 blocks of 34 bytes.
        unsafe { from_float(row.as_ptr(), bytes.as_mut_ptr().cast(), row.len() as i64) };
        let mut out = vec![0f32; row.len()];
        quant::dequantize(GgmlType::Q8_0, &bytes, &mut out).unwrap();
        out
    };
    let reference = |row: &[f32]| -> Vec<f32> {
        let bytes = quant::quantize(GgmlType::Q8_0, row).unwrap();
        let mut out = vec![0f32; row.len()];
        quant::dequantize(GgmlType::Q8_0, &bytes, &mut out).unwrap();
        out
    };
    let mut rng = Rng::new(0x5180);
    let mut rows: Vec<Vec<f32>> = (0..2000)
        .map(|_| (0..64).map(|_| rng.normal() * 2.0).collect())
        .collect();
    // amax 127: d = 1, and every x.5 is a tie.
    rows.push(
        (0..32)
            .map(|i| if i == 0 { 127.0 } else { (i as f32) - 0.5 })
            .collect(),
    );
    let mut reference_differs = 0;
    for row in &rows {
        let want = ggml(row);
        assert_eq!(attn_verify::kernel::q8_0_row_x86(row), want, "{row:?}");
        reference_differs += usize::from(reference(row) != want);
    }
    eprintln!(
        "the reference quantizer differs on {reference_differs} of {} rows",
        rows.len()
    );
    assert!(
        reference_differs > 0,
        "the rows must exercise the differences"
    );
}

/// A group that ran on an RPC server (`kqv_trace.attn.backend` `RPC0[host:port]`): ggml-rpc
/// does not tell the client what the server computes with, so the verification tries this
/// build's CPU kernel model and keeps it when the group matches it (a `kcm-rpc-server`
/// serves this build's CPU backend, so its groups do: bit for bit on AVX2). The F16
/// accumulator's own error is what the exact reference sees, and on few cells it can pass
/// the older bound's `2e-6 + n_cells * 2^-24` (the cause of an RPC group failing at NMSE
/// 1.05e-5 before). A group that matches no CPU model (another kind of server: here the
/// CPU output perturbed in its last bits, as another kernel's rounding would) falls back
/// to the exact reference and its older bound, with the reason; so does split-KV, whose
/// chunks follow the server's thread count, which the trace does not know.
#[test]
fn a_group_from_an_rpc_server_is_judged_by_the_cpu_kernel_it_matches() {
    let rpc = |mut g: Group| {
        g.kernel.backend = "RPC0[127.0.0.1:50052]".into();
        g.kernel.n_threads = 7; // the client's, not the server's
        g
    };
    // One-chunk (F16 accumulator) on a CPU-backed server: the CPU model, its bound.
    let g = rpc(run(&Case::new(1, 100, GgmlType::F16, 2), 5));
    let Outcome::Checked(r) = check(&g, None).unwrap() else {
        panic!("missing inputs")
    };
    assert_eq!(r.kernel, Ok(KernelPath::OneChunk));
    assert!(r.pass && r.bound <= 1e-7, "{r:?}");
    if avx2() {
        assert_eq!(r.verification.nmse, 0.0);
    }
    assert!(r.exact_nmse.unwrap() > 1e-8, "{r:?}");

    // The same output changed by 1e-3 relative (NMSE about 1e-6, above every CPU model's
    // bound, within the older one's 8e-6): not this build's CPU kernel, judged against
    // the exact reference (which it passes).
    let mut other = g.clone();
    for op in other.operands.iter_mut().filter(|o| o.role == Role::KqvOut) {
        for (i, x) in op.values.iter_mut().enumerate() {
            *x *= 1.0 + if i % 2 == 0 { 1e-3 } else { -1e-3 };
        }
    }
    let Outcome::Checked(r) = check(&other, None).unwrap() else {
        panic!("missing inputs")
    };
    let why = r.kernel.clone().unwrap_err();
    assert!(
        why.contains("RPC0[127.0.0.1:50052]")
            && why.contains("nor does it match this build's CPU one-chunk kernel"),
        "{why}"
    );
    assert!(r.pass, "{r:?}");
    assert_eq!(r.exact_nmse, None);

    // Split-KV (512+ cells, one token): the server's threads are unknown; exact reference.
    let g = rpc(run(&Case::new(1, 600, GgmlType::F16, 3), 9));
    let Outcome::Checked(r) = check(&g, None).unwrap() else {
        panic!("missing inputs")
    };
    assert!(r.kernel.is_err(), "{:?}", r.kernel);
    assert!(r.pass, "{r:?}");

    // A CPU group is unchanged: the recorded thread count names the split.
    let g = run(&Case::new(1, 600, GgmlType::F16, 3), 9);
    let Outcome::Checked(r) = check(&g, None).unwrap() else {
        panic!("missing inputs")
    };
    assert_eq!(r.kernel, Ok(KernelPath::SplitKv { n_chunks: 3 }));
}
