use super::*;
use crate::types::TYPE_TABLE;
use test_support::Rng;

fn f16_bytes(x: f32) -> [u8; 2] {
    half::f16::from_f32(x).to_bits().to_le_bytes()
}

#[test]
fn f16_to_f32_matches_half_for_every_bit_pattern() {
    for h in 0..=u16::MAX {
        let ours = f16_to_f32(h);
        let theirs = half::f16::from_bits(h).to_f32();
        assert_eq!(ours.to_bits(), theirs.to_bits(), "f16 {h:#06x}");
    }
    // A signalling-NaN f16 comes out quiet with its payload.
    assert_eq!(f16_to_f32(0x7c01).to_bits(), 0x7fc0_2000);
    assert_eq!(f16_to_f32(0xfd00).to_bits(), 0xffe0_0000);
}

#[test]
fn f32_to_f16_rounds_to_nearest_even_like_half() {
    // Every f16 value, the midpoints between neighbours (ties), and a bit either side.
    for h in 0..=u16::MAX {
        let x = half::f16::from_bits(h);
        if x.is_nan() {
            continue;
        }
        let v = x.to_f32();
        for cand in [
            v,
            f32::from_bits(v.to_bits() + 1),
            f32::from_bits(v.to_bits().wrapping_sub(1)),
        ] {
            if cand.is_nan() {
                continue;
            }
            let want = half::f16::from_f32(cand).to_bits();
            assert_eq!(
                f32_to_f16(cand),
                want,
                "{cand:e} ({:#010x})",
                cand.to_bits()
            );
        }
        let next = half::f16::from_bits(h.wrapping_add(1));
        if !next.is_nan() && (h & 0x7fff) < 0x7c00 {
            let mid = ((f64::from(v) + f64::from(next.to_f32())) / 2.0) as f32;
            assert_eq!(
                f32_to_f16(mid),
                half::f16::from_f32(mid).to_bits(),
                "tie {mid:e}"
            );
        }
    }
    let mut rng = Rng::new(0x1234_5678);
    for _ in 0..1_000_000 {
        let v = f32::from_bits(rng.next_u64() as u32);
        if v.is_nan() {
            continue;
        }
        assert_eq!(f32_to_f16(v), half::f16::from_f32(v).to_bits(), "{v:e}");
    }
    assert_eq!(f32_to_f16(65520.0), 0x7c00); // rounds up to infinity
    assert_eq!(f32_to_f16(65519.996), 0x7bff);
    assert_eq!(f32_to_f16(f32::INFINITY), 0x7c00);
    assert_eq!(f32_to_f16(f32::NEG_INFINITY), 0xfc00);
    assert_eq!(f32_to_f16(-0.0), 0x8000);
    assert_eq!(f32_to_f16(2.0f32.powi(-25)), 0x0000); // tie to even (zero)
    assert_eq!(f32_to_f16(f32::from_bits(0x3300_0001)), 0x0001); // just above the tie
}

#[test]
fn f32_to_f16_nan_is_canonical_like_ggml() {
    assert_eq!(f32_to_f16(f32::NAN), 0x7e00);
    assert_eq!(f32_to_f16(f32::from_bits(0x7f80_0001)), 0x7e00);
    assert_eq!(f32_to_f16(f32::from_bits(0xffc1_2345)), 0xfe00);
}

#[test]
fn bf16_conversions_follow_ggml() {
    assert_eq!(f32_to_bf16(1.0), 0x3f80);
    // Ties to even: 0x3f80_8000 is exactly between 0x3f80 and 0x3f81.
    assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80);
    assert_eq!(f32_to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
    assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
    // Largest finite rounds to infinity; subnormals are kept.
    assert_eq!(f32_to_bf16(f32::MAX), 0x7f80);
    assert_eq!(f32_to_bf16(f32::from_bits(0x0001_8000)), 0x0002);
    // NaNs are truncated and made quiet.
    assert_eq!(f32_to_bf16(f32::from_bits(0x7f80_0001)), 0x7fc0);
    assert_eq!(f32_to_bf16(f32::from_bits(0xff81_2345)), 0xffc1);
    assert_eq!(bf16_to_f32(0xc040).to_bits(), 0xc040_0000);
}

#[test]
fn can_dequantize_covers_the_table() {
    for info in TYPE_TABLE {
        let ty = GgmlType(info.id);
        let expected = !info.retired && !GRID_TYPES.contains(&ty);
        assert_eq!(can_dequantize(ty), expected, "{}", info.name);
    }
    assert!(!can_dequantize(GgmlType(TYPE_TABLE.len() as u32)));
    assert!(!can_dequantize(GgmlType(u32::MAX)));
    for ty in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
    ] {
        assert!(can_quantize(ty));
    }
    assert!(!can_quantize(GgmlType::Q4_K));
}

#[test]
fn error_cases() {
    let mut out = [0.0f32; 64];
    for ty in GRID_TYPES {
        let src = vec![0u8; ty.bytes_for(256).unwrap() as usize];
        let mut out = [0.0f32; 256];
        assert_eq!(
            dequantize(ty, &src, &mut out),
            Err(QuantError::Unsupported { ty })
        );
    }
    assert_eq!(
        dequantize(GgmlType(4), &[0; 40], &mut out),
        Err(QuantError::UnknownType {
            id: 4,
            retired: true
        })
    );
    assert_eq!(
        dequantize(GgmlType(31), &[0; 40], &mut out),
        Err(QuantError::UnknownType {
            id: 31,
            retired: true
        })
    );
    assert_eq!(
        dequantize(GgmlType(43), &[0; 40], &mut out),
        Err(QuantError::UnknownType {
            id: 43,
            retired: false
        })
    );
    assert_eq!(
        dequantize_to_vec(GgmlType(u32::MAX), &[], 0),
        Err(QuantError::UnknownType {
            id: u32::MAX,
            retired: false
        })
    );
    // Not whole blocks.
    assert_eq!(
        dequantize(GgmlType::Q4_0, &[0; 18], &mut out[..33]),
        Err(QuantError::NotWholeBlocks {
            ty: GgmlType::Q4_0,
            n_elements: 33,
            block_size: 32
        })
    );
    // Byte count off by one either way.
    for len in [35usize, 37, 0] {
        assert_eq!(
            dequantize(GgmlType::Q4_0, &vec![0; len], &mut out),
            Err(QuantError::LengthMismatch {
                ty: GgmlType::Q4_0,
                n_elements: 64,
                expected_bytes: 36,
                actual_bytes: len as u64
            })
        );
    }
    assert!(matches!(
        dequantize(GgmlType::F32, &[0; 255], &mut out),
        Err(QuantError::LengthMismatch {
            expected_bytes: 256,
            actual_bytes: 255,
            ..
        })
    ));
    // Huge element counts are refused before anything is allocated.
    assert!(matches!(
        dequantize_to_vec(GgmlType::Q4_0, &[0; 18], usize::MAX - 31),
        Err(QuantError::LengthMismatch { .. })
    ));
    assert!(matches!(
        dequantize_to_vec(GgmlType::F64, &[0; 8], usize::MAX),
        Err(QuantError::LengthMismatch {
            expected_bytes: u64::MAX,
            ..
        })
    ));
    assert!(matches!(
        dequantize_to_vec(GgmlType::Q4_K, &[], 100),
        Err(QuantError::NotWholeBlocks {
            block_size: 256,
            ..
        })
    ));
    // Quantize.
    assert_eq!(
        quantize(GgmlType::Q4_K, &[0.0; 256]),
        Err(QuantError::Unsupported { ty: GgmlType::Q4_K })
    );
    assert!(matches!(
        quantize(GgmlType::Q8_0, &[0.0; 33]),
        Err(QuantError::NotWholeBlocks { .. })
    ));
    assert_eq!(
        quantize(GgmlType(5), &[]),
        Err(QuantError::UnknownType {
            id: 5,
            retired: true
        })
    );
    assert_eq!(quantize(GgmlType::Q8_0, &[]), Ok(vec![]));
    assert_eq!(dequantize_to_vec(GgmlType::Q6_K, &[], 0), Ok(vec![]));
    // Messages name the type.
    let msg = QuantError::Unsupported {
        ty: GgmlType::IQ2_XXS,
    }
    .to_string();
    assert!(msg.contains("iq2_xxs"), "{msg}");
    let msg = QuantError::UnknownType {
        id: 4,
        retired: true,
    }
    .to_string();
    assert!(msg.contains("retired"), "{msg}");
}

/// Every dequantizer writes every output and the block constants agree with the table.
#[test]
fn every_output_is_written() {
    const SENTINEL: u32 = 0x7fba_dbad; // a signalling NaN: arithmetic never produces it
    let mut rng = Rng::new(42);
    for info in TYPE_TABLE {
        let ty = GgmlType(info.id);
        if !can_dequantize(ty) {
            continue;
        }
        let n = info.block_size as usize * 3;
        let len = ty.bytes_for(n as u64).unwrap() as usize;
        for src in [vec![0u8; len], rng.bytes(len)] {
            if ty == GgmlType::F32 && src.chunks_exact(4).any(|c| c == SENTINEL.to_le_bytes()) {
                continue;
            }
            let mut out = vec![f32::from_bits(SENTINEL); n];
            dequantize(ty, &src, &mut out).unwrap();
            assert!(out.iter().all(|v| v.to_bits() != SENTINEL), "{}", info.name);
            assert_eq!(dequantize_to_vec(ty, &src, n).unwrap().len(), n);
        }
    }
}

/// No input makes any entry point panic.
#[test]
fn arbitrary_inputs_never_panic() {
    let mut rng = Rng::new(7);
    for id in 0..48u32 {
        let ty = GgmlType(id);
        for _ in 0..50 {
            let n = (rng.next_u64() % 700) as usize;
            let len = (rng.next_u64() % 1200) as usize;
            let src = rng.bytes(len);
            let mut out = vec![0.0f32; n];
            let _ = dequantize(ty, &src, &mut out);
            let _ = dequantize_to_vec(ty, &src, n);
            let x: Vec<f32> = (0..n)
                .map(|_| f32::from_bits(rng.next_u64() as u32))
                .collect();
            let _ = quantize(ty, &x);
        }
        if let Some(bytes) = ty.bytes_for(512) {
            let src = rng.bytes(bytes as usize);
            let r = dequantize_to_vec(ty, &src, 512);
            assert_eq!(r.is_ok(), can_dequantize(ty), "{ty}");
        }
    }
}

#[test]
fn q8_0_with_unit_scale_gives_the_ints_back() {
    let mut block = vec![];
    block.extend_from_slice(&f16_bytes(1.0));
    let ints: Vec<i8> = (0..32).map(|i| (i * 8 - 128) as i8).collect();
    block.extend(ints.iter().map(|&i| i as u8));
    let out = dequantize_to_vec(GgmlType::Q8_0, &block, 32).unwrap();
    let want: Vec<f32> = ints.iter().map(|&i| f32::from(i)).collect();
    assert_eq!(out, want);
    // Quantizing and dequantizing loses at most half a step.
    let vals: Vec<f32> = (-16..16).map(|i| i as f32 * 127.0 / 16.0).collect();
    let q = quantize(GgmlType::Q8_0, &vals).unwrap();
    let back = dequantize_to_vec(GgmlType::Q8_0, &q, 32).unwrap();
    for (a, b) in vals.iter().zip(&back) {
        assert!((a - b).abs() <= 0.5 * (127.0 / 127.0) * 1.001, "{a} vs {b}");
    }
}

#[test]
fn exact_small_formats() {
    // Q4_0 d=2: element j = (nibble - 8) * 2.
    let mut b = f16_bytes(2.0).to_vec();
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let out = dequantize_to_vec(GgmlType::Q4_0, &b, 32).unwrap();
    for j in 0..16 {
        assert_eq!(out[j], (j as f32 - 8.0) * 2.0);
        assert_eq!(out[j + 16], (7.0 - j as f32) * 2.0);
    }
    // Q4_1 d=0.5 m=-1.
    let mut b = f16_bytes(0.5).to_vec();
    b.extend(f16_bytes(-1.0));
    b.extend((0..16u8).map(|j| j | (j << 4)));
    let out = dequantize_to_vec(GgmlType::Q4_1, &b, 32).unwrap();
    for j in 0..16 {
        assert_eq!(out[j], j as f32 * 0.5 - 1.0);
        assert_eq!(out[j + 16], out[j]);
    }
    // Q5_0 with all high bits set: values nibble + 16 - 16.
    let mut b = f16_bytes(1.0).to_vec();
    b.extend([0xff; 4]);
    b.extend((0..16u8).map(|j| j | (j << 4)));
    let out = dequantize_to_vec(GgmlType::Q5_0, &b, 32).unwrap();
    for j in 0..16 {
        assert_eq!(out[j], j as f32);
        assert_eq!(out[j + 16], j as f32);
    }
    // Q8_1 ignores s.
    let mut b = f16_bytes(0.25).to_vec();
    b.extend(f16_bytes(1000.0));
    b.extend((0..32).map(|i| (i as i8 - 16) as u8));
    let out = dequantize_to_vec(GgmlType::Q8_1, &b, 32).unwrap();
    for (i, v) in out.iter().enumerate() {
        assert_eq!(*v, (i as f32 - 16.0) * 0.25);
    }
    // Q1_0: bit set -> d, clear -> -d.
    let mut b = f16_bytes(3.0).to_vec();
    b.extend([0b1010_0101u8; 16]);
    let out = dequantize_to_vec(GgmlType::Q1_0, &b, 128).unwrap();
    for (j, v) in out.iter().enumerate() {
        let bit = (0b1010_0101u8 >> (j % 8)) & 1;
        assert_eq!(*v, if bit == 1 { 3.0 } else { -3.0 }, "{j}");
    }
    // Q2_0: 2-bit codes 0..=3 mean -1, 0, 1, 2.
    let mut b = f16_bytes(1.5).to_vec();
    b.extend([0b11_10_01_00u8; 16]);
    let out = dequantize_to_vec(GgmlType::Q2_0, &b, 64).unwrap();
    for (j, v) in out.iter().enumerate() {
        assert_eq!(*v, ((j % 4) as f32 - 1.0) * 1.5, "{j}");
    }
    // Q8_K: f32 d.
    let mut b = 0.5f32.to_le_bytes().to_vec();
    b.extend((0..256).map(|i| i as u8));
    b.extend([0u8; 32]);
    let out = dequantize_to_vec(GgmlType::Q8_K, &b, 256).unwrap();
    for (i, v) in out.iter().enumerate() {
        assert_eq!(*v, f32::from(i as u8 as i8) * 0.5);
    }
    // TQ2_0 d=1: codes -> -1, 0, 1, 2.
    let mut b = vec![0b11_10_01_00u8; 64];
    b.extend(f16_bytes(1.0));
    let out = dequantize_to_vec(GgmlType::TQ2_0, &b, 256).unwrap();
    for (i, v) in out.iter().enumerate() {
        let l = (i % 128) / 32;
        assert_eq!(*v, l as f32 - 1.0, "{i}");
    }
    // MXFP4: e = 128 -> d = 2^0 / 2... kvalues are doubled, so x = kvalue * 2^(e-128).
    let mut b = vec![128u8];
    b.extend((0..16u8).map(|j| j | (j << 4)));
    let out = dequantize_to_vec(GgmlType::MXFP4, &b, 32).unwrap();
    let kv = [
        0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 0.0, -1.0, -2.0, -3.0, -4.0, -6.0, -8.0, -12.0,
    ];
    assert_eq!(&out[..16], &kv);
    assert_eq!(&out[16..], &kv);
    // NVFP4: UE4M3 0x38 = 1.0 (exp 7, man 0), times 0.5 -> kvalue * 0.5 = E2M1 value.
    let mut b = vec![0x38, 0x40, 0x00, 0x7f];
    b.extend((0..32u8).map(|j| (j % 16) | ((j % 16) << 4)));
    let out = dequantize_to_vec(GgmlType::NVFP4, &b, 64).unwrap();
    for j in 0..8 {
        assert_eq!(out[j], kv[j] * 0.5);
        assert_eq!(out[16 + j], kv[j + 8] * 1.0); // 0x40: exp 8 -> 2.0 * 0.5
        assert_eq!(out[32 + j], 0.0);
        assert_eq!(out[48 + j], 0.0);
    }
}

#[test]
fn scalar_types() {
    let src: Vec<u8> = [1.5f64, -2.0, 1e300]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert_eq!(
        dequantize_to_vec(GgmlType::F64, &src, 3).unwrap(),
        vec![1.5, -2.0, f32::INFINITY]
    );
    assert_eq!(
        dequantize_to_vec(GgmlType::I8, &[0x80, 0x7f, 0xff], 3).unwrap(),
        vec![-128.0, 127.0, -1.0]
    );
    let src: Vec<u8> = [-32768i16, 5]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert_eq!(
        dequantize_to_vec(GgmlType::I16, &src, 2).unwrap(),
        vec![-32768.0, 5.0]
    );
    let src: Vec<u8> = [i32::MAX, -7]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert_eq!(
        dequantize_to_vec(GgmlType::I32, &src, 2).unwrap(),
        vec![2147483648.0, -7.0]
    );
    let src: Vec<u8> = [i64::MIN, 1 << 40]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert_eq!(
        dequantize_to_vec(GgmlType::I64, &src, 2).unwrap(),
        vec![-9.223372e18, 1099511627776.0]
    );
    let vals = [1.0f32, -0.0, f32::MIN_POSITIVE, f32::NAN];
    let q = quantize(GgmlType::F32, &vals).unwrap();
    let back = dequantize_to_vec(GgmlType::F32, &q, 4).unwrap();
    for (a, b) in vals.iter().zip(&back) {
        assert_eq!(a.to_bits(), b.to_bits());
    }
    let q = quantize(GgmlType::F16, &[1.0, -2.5, 1e-7]).unwrap();
    assert_eq!(q, [0x00, 0x3c, 0x00, 0xc1, 0x02, 0x00]);
    assert_eq!(
        dequantize_to_vec(GgmlType::F16, &q, 3).unwrap()[..2],
        [1.0, -2.5]
    );
    let q = quantize(GgmlType::BF16, &[1.0, -2.5]).unwrap();
    assert_eq!(q, [0x80, 0x3f, 0x20, 0xc0]);
    assert_eq!(
        dequantize_to_vec(GgmlType::BF16, &q, 2).unwrap(),
        [1.0, -2.5]
    );
}

#[test]
fn q4_0_reference_quantizer_details() {
    // max is the first element of largest magnitude, sign kept: d = max / -8.
    let mut x = [0.0f32; 32];
    x[3] = -4.0;
    x[7] = 4.0;
    x[9] = 1.0;
    let q = quantize(GgmlType::Q4_0, &x).unwrap();
    assert_eq!(q[..2], f32_to_f16(0.5).to_le_bytes());
    let y = dequantize_to_vec(GgmlType::Q4_0, &q, 32).unwrap();
    assert_eq!(y[3], -4.0);
    // 4 * (1/0.5) + 8.5 = 16.5 truncates to 16, which ggml clamps to 15: (15 - 8) * 0.5.
    assert_eq!(y[7], 3.5);
    assert_eq!(y[9], 1.0);
}

#[test]
fn zero_and_tiny_blocks_quantize_like_ggml() {
    // An all-zero block: q4_0 gets d = 0 / -8 = -0.0, q8_0 d = +0.0.
    let q = quantize(GgmlType::Q4_0, &[0.0; 32]).unwrap();
    assert_eq!(q[..2], [0x00, 0x80]);
    assert!(q[2..].iter().all(|&b| b == 0x88));
    let q = quantize(GgmlType::Q8_0, &[-0.0; 32]).unwrap();
    assert_eq!(q, [0u8; 34]);
    // Subnormal inputs: 1/d overflows to infinity, x*id is +-inf (or NaN for 0), and the
    // C cast to int8_t on x86 yields 0 for all of those.
    let mut x = [0.0f32; 32];
    x[0] = 1e-40;
    x[1] = -1e-40;
    let q = quantize(GgmlType::Q8_0, &x).unwrap();
    assert!(q[2..].iter().all(|&b| b == 0), "{q:?}");
    let q = quantize(GgmlType::Q4_0, &x).unwrap();
    assert!(q[2..].iter().all(|&b| b == 0), "{q:?}");
}
