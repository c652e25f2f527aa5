//! ggml through the raw FFI: a tiny graph computed on the CPU backend, and the
//! Q8_0 type traits.

use std::ffi::CStr;
use std::ptr;

use ggml_trace_sys::sys;

/// Copies `values` into an F32 tensor's data (contiguous, allocated in the context).
///
/// # Safety
/// `t` must be a contiguous F32 tensor with `values.len()` elements and data.
unsafe fn fill_f32(t: *mut sys::ggml_tensor, values: &[f32]) {
    // SAFETY: the caller guarantees `t` is a live F32 tensor with data for `values.len()`
    // elements; the assertion checks the count.
    unsafe {
        assert_eq!(sys::ggml_nelements(t) as usize, values.len());
        ptr::copy_nonoverlapping(values.as_ptr(), (*t).data as *mut f32, values.len());
    }
}

/// # Safety
/// `t` must be a contiguous F32 tensor with computed data.
unsafe fn read_f32(t: *const sys::ggml_tensor) -> Vec<f32> {
    // SAFETY: the caller guarantees `t` is a live contiguous F32 tensor with data.
    unsafe {
        let n = sys::ggml_nelements(t) as usize;
        std::slice::from_raw_parts((*t).data as *const f32, n).to_vec()
    }
}

#[test]
fn graph_with_add_and_mul_mat_computes_exact_values() {
    // a: 3 rows of 4, b: 2 rows of 4 (ne0 = row length).
    let a_vals: Vec<f32> = (1..=12).map(|v| v as f32).collect();
    let b_vals: Vec<f32> = vec![1.0, 0.0, -1.0, 2.0, 0.5, 0.5, 0.5, 0.5];
    let bias: Vec<f32> = vec![10.0, 20.0, 30.0, 40.0, 50.0, 60.0];

    // SAFETY: one context owns every tensor; all pointers come from ggml and
    // are used before ggml_free. Tensor shapes match the slices copied in/out.
    unsafe {
        let params = sys::ggml_init_params {
            mem_size: 16 * 1024 * 1024,
            mem_buffer: ptr::null_mut(),
            no_alloc: false,
        };
        let ctx = sys::ggml_init(params);
        assert!(!ctx.is_null());

        let a = sys::ggml_new_tensor_2d(ctx, sys::GGML_TYPE_F32, 4, 3);
        let b = sys::ggml_new_tensor_2d(ctx, sys::GGML_TYPE_F32, 4, 2);
        let c = sys::ggml_new_tensor_2d(ctx, sys::GGML_TYPE_F32, 3, 2);
        fill_f32(a, &a_vals);
        fill_f32(b, &b_vals);
        fill_f32(c, &bias);

        // mul_mat(a, b)[j][i] = dot(a row i, b row j): shape ne = [3, 2].
        let prod = sys::ggml_mul_mat(ctx, a, b);
        let out = sys::ggml_add(ctx, prod, c);
        sys::ggml_set_name(out, c"kcm_out".as_ptr());

        let graph = sys::ggml_new_graph(ctx);
        sys::ggml_build_forward_expand(graph, out);
        let status = sys::ggml_graph_compute_with_ctx(ctx, graph, 2);
        assert_eq!(status, sys::GGML_STATUS_SUCCESS);

        let ne = (*out).ne;
        assert_eq!(ne[..2], [3, 2]);
        assert_eq!(
            CStr::from_ptr(sys::ggml_get_name(out)).to_str().unwrap(),
            "kcm_out"
        );
        // a rows: [1,2,3,4] [5,6,7,8] [9,10,11,12]
        // b row 0 = [1,0,-1,2]: 1-3+8=6, 5-7+16=14, 9-11+24=22
        // b row 1 = [.5,.5,.5,.5]: 5, 13, 21
        let expected = [
            6.0 + 10.0,
            14.0 + 20.0,
            22.0 + 30.0,
            5.0 + 40.0,
            13.0 + 50.0,
            21.0 + 60.0,
        ];
        assert_eq!(
            read_f32(prod),
            expected
                .iter()
                .zip(&bias)
                .map(|(e, b)| e - b)
                .collect::<Vec<_>>()
        );
        assert_eq!(read_f32(out), expected);

        sys::ggml_free(ctx);
    }
}

/// A Q8_0 block: f16 scale `d`, then 32 signed 8-bit quants.
const QK8_0: usize = 32;
const Q8_0_BLOCK_BYTES: usize = 2 + QK8_0;

fn q8_0_traits() -> &'static sys::ggml_type_traits {
    // SAFETY: ggml_get_type_traits returns a pointer into a static table for
    // every valid type; GGML_TYPE_Q8_0 is valid.
    unsafe { &*sys::ggml_get_type_traits(sys::GGML_TYPE_Q8_0) }
}

#[test]
fn q8_0_traits_describe_the_block() {
    let t = q8_0_traits();
    // SAFETY: type_name is a static NUL-terminated string.
    let name = unsafe { CStr::from_ptr(t.type_name) };
    assert_eq!(name.to_str().unwrap(), "q8_0");
    assert_eq!(t.blck_size, QK8_0 as i64);
    assert_eq!(t.type_size, Q8_0_BLOCK_BYTES);
    assert!(t.is_quantized);
    assert!(t.to_float.is_some() && t.from_float_ref.is_some());
}

#[test]
fn q8_0_to_float_decodes_a_known_block() {
    // d = 0.5 (f16 0x3800), quants -16..=15.
    let mut block = [0u8; Q8_0_BLOCK_BYTES];
    block[..2].copy_from_slice(&0x3800u16.to_le_bytes());
    for (i, q) in block[2..].iter_mut().enumerate() {
        *q = (i as i8 - 16) as u8;
    }
    let mut out = [0f32; QK8_0];
    let to_float = q8_0_traits().to_float.unwrap();
    // SAFETY: one complete block in, QK8_0 floats out.
    unsafe { to_float(block.as_ptr().cast(), out.as_mut_ptr(), QK8_0 as i64) };
    let expected: Vec<f32> = (0..QK8_0).map(|i| (i as f32 - 16.0) * 0.5).collect();
    assert_eq!(out.to_vec(), expected);
}

#[test]
fn q8_0_from_float_ref_matches_the_reference_formula() {
    let x: Vec<f32> = (0..QK8_0).map(|i| i as f32 - 16.0).collect();
    let mut block = [0u8; Q8_0_BLOCK_BYTES];
    let traits = q8_0_traits();
    // SAFETY: QK8_0 floats in, one block out.
    unsafe { traits.from_float_ref.unwrap()(x.as_ptr(), block.as_mut_ptr().cast(), QK8_0 as i64) };

    // quantize_row_q8_0_ref: d = amax / 127, q = round(x / d) with id = 1/d,
    // d stored as f16.
    let d = 16.0f32 / 127.0;
    let id = 1.0 / d;
    // SAFETY: pure conversion functions.
    let d_f16 = unsafe { sys::ggml_fp32_to_fp16(d) };
    assert_eq!(u16::from_le_bytes([block[0], block[1]]), d_f16);
    for (i, &q) in block[2..].iter().enumerate() {
        assert_eq!(q as i8, (x[i] * id).round() as i8, "quant {i}");
    }
    assert_eq!(block[2] as i8, -127);

    // And back: q * f16(d).
    let mut y = [0f32; QK8_0];
    // SAFETY: one block in, QK8_0 floats out.
    unsafe { traits.to_float.unwrap()(block.as_ptr().cast(), y.as_mut_ptr(), QK8_0 as i64) };
    // SAFETY: a pure conversion of a value.
    let d_back = unsafe { sys::ggml_fp16_to_fp32(d_f16) };
    for i in 0..QK8_0 {
        assert_eq!(y[i], (block[2 + i] as i8) as f32 * d_back);
        assert!(
            (y[i] - x[i]).abs() <= d / 2.0 + 1e-3,
            "element {i}: {} vs {}",
            y[i],
            x[i]
        );
    }
}
