//! `gguf_io::quant` against gguf-py (PyPI `gguf` 0.19, numpy-based) as the oracle.
//!
//! One Python run (see [`GEN_SCRIPT`]) finds which types the installed gguf-py can
//! dequantize and quantize, generates deterministic blocks for each (gguf-py-quantized
//! random data where it can quantize; random bytes with the f16 scale fields overwritten
//! by sane finite values otherwise; all-zero / all-ones blocks; edge-case scales: zero,
//! negative zero, negative, subnormal, largest finite; every bit pattern for F16 and
//! BF16), has gguf-py dequantize them, and hands raw bytes plus expected f32 to Rust
//! through files in a temporary directory. Rust's output must be bit-identical
//! (`to_bits`, so NaNs must match too).
//!
//! Types gguf-py 0.19 has no dequantizer for (Q8_1, Q8_K, Q1_0, Q2_0, F64, I8..I64) are
//! checked against a short numpy transcription of ggml's C in the same script, marked
//! `numpy-ref`; they also have exact hand-made cases in `src/quant/tests.rs`.
//!
//! Quantization (F16, BF16, Q8_0, Q4_0) is compared byte for byte with gguf-py's.
//!
//! Where gguf-py and ggml's C disagree, ggml wins (a later test compares with ggml
//! itself through FFI). There is one such disagreement, and it is not about arithmetic:
//! numpy keeps signalling NaNs signalling when widening F16, ggml quiets them (see
//! [`is_snan_quieting`]); that case is asserted exactly (quiet bit only, and exactly the
//! 1022 sNaN patterns). Everything else is bit-identical.

use gguf_io::quant::GRID_TYPES;
use test_support::gguf_py as support;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::OnceLock;

use gguf_io::quant::{self, QuantError};
use gguf_io::GgmlType;

/// Quantization cases whose expected bytes come from numpy's undefined float -> int cast.
///
/// `subnormal`: a block whose largest magnitude is an f32 subnormal. `1/d` overflows to
/// infinity, `x * id` is +-inf (or NaN for zeros), and ggml's C cast to `int8_t`
/// (`cvttss2si`, low byte) stores 0 for every element; so does Rust (see `c_f32_to_i8`).
/// gguf-py's `astype(int8)` / `astype(uint8)` of inf and NaN gives the same 0 on x86-64
/// but is undefined in numpy and may saturate elsewhere, so off x86-64 only the scale
/// bytes are compared for these (ggml's behaviour is pinned in `src/quant/tests.rs`).
const PLATFORM_DEPENDENT_QUANT_CASES: &[&str] = &["subnormal"];

/// gguf-py converts F16 with numpy, which keeps a signalling NaN signalling; ggml's
/// `ggml_compute_fp16_to_fp32` (its rebiasing multiply) and F16C's `vcvtph2ps` both
/// return it quiet, as `gguf_io::quant` does. For exactly those inputs (the 2 x 511 f16
/// patterns with exponent 31, a non-zero mantissa and the top mantissa bit clear) the
/// result may differ from gguf-py's in the f32 quiet bit (0x0040_0000) and nothing else:
/// same sign, same payload, both NaN.
fn is_snan_quieting(ty: GgmlType, got: f32, want: f32) -> bool {
    ty == GgmlType::F16
        && want.is_nan()
        && want.to_bits() & 0x0040_0000 == 0
        && got.to_bits() == want.to_bits() | 0x0040_0000
}

struct Case {
    ty: GgmlType,
    case: String,
    n: usize,
    src: Vec<u8>,
    expected: Vec<u8>,
}

struct Fixture {
    gguf_version: String,
    /// Type ids gguf-py can dequantize / quantize, as probed in the installed package.
    py_dequant: BTreeSet<u32>,
    py_quant: BTreeSet<u32>,
    dequant: Vec<Case>,
    quant: Vec<Case>,
}

/// Generates the cases. `argv[1]` is the output directory; a `manifest.json` lists them.
const GEN_SCRIPT: &str = r#"
import json, os, sys
import numpy as np
import gguf
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

out_dir = sys.argv[1]
rng = np.random.default_rng(0x5EED_2024)
manifest = {"gguf_version": "", "py_dequant": [], "py_quant": [], "dequant": [], "quant": []}
try:
    from importlib.metadata import version
    manifest["gguf_version"] = version("gguf")
except Exception:
    pass

def probe_dequant(t):
    bs, ts = GGML_QUANT_SIZES[t]
    try:
        r = quants.dequantize(np.zeros(2 * ts, dtype=np.uint8), t)
        return r.dtype == np.float32 and r.size == 2 * bs
    except Exception:
        return False

def probe_quant(t):
    bs, ts = GGML_QUANT_SIZES[t]
    try:
        r = np.asarray(quants.quantize(np.ones(2 * bs, dtype=np.float32), t))
        return r.nbytes == 2 * ts
    except Exception:
        return False

PY_DEQUANT = [t for t in T if probe_dequant(t)]
PY_QUANT = [t for t in T if probe_quant(t)]
manifest["py_dequant"] = [int(t) for t in PY_DEQUANT]
manifest["py_quant"] = [int(t) for t in PY_QUANT]

counter = [0]
def emit(kind, t, case, n, src, expected):
    i = counter[0]; counter[0] += 1
    sp = os.path.join(out_dir, f"{i}.src"); ep = os.path.join(out_dir, f"{i}.exp")
    with open(sp, "wb") as f: f.write(src)
    with open(ep, "wb") as f: f.write(expected)
    manifest[kind].append({"type": int(t), "case": case, "n": int(n), "src": sp, "expected": ep})

def f32le(a):
    return np.ascontiguousarray(a, dtype="<f4").tobytes()

# Byte offsets of the f16 scale fields inside one block.
SCALES = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q8_1": [0, 2],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
    "TQ1_0": [52], "TQ2_0": [64], "IQ4_NL": [0], "IQ4_XS": [0], "Q1_0": [0], "Q2_0": [0],
}
# zero, -zero, +-1, +-smallest subnormal, +-largest subnormal, smallest normal,
# +-largest finite, 0.5, ~1e-3
EDGE_F16 = [0x0000, 0x8000, 0x3C00, 0xBC00, 0x0001, 0x8001, 0x03FF, 0x83FF, 0x0400,
            0x7BFF, 0xFBFF, 0x3800, 0x1419]
NONFINITE_F16 = [0x7C00, 0xFC00, 0x7E00, 0xFE00, 0x7C01, 0xFD55]

def sane_f16(n):
    v = rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 1, n)
    return v.astype(np.float16).view(np.uint16)

def set_scales(blocks, offs, values):
    # blocks: (nb, ts) uint8; values: (nb, len(offs)) uint16
    for k, off in enumerate(offs):
        blocks[:, off] = (values[:, k] & 0xFF).astype(np.uint8)
        blocks[:, off + 1] = (values[:, k] >> 8).astype(np.uint8)

def block_cases(t):
    """(case, raw bytes) for a block type."""
    bs, ts = GGML_QUANT_SIZES[t]
    offs = SCALES.get(t.name, [])
    out = []
    # Random bytes, sane scales; the first blocks take every edge value in every field.
    nb = 256
    blocks = rng.integers(0, 256, size=(nb, ts), dtype=np.uint8)
    if offs:
        vals = sane_f16(nb * len(offs)).reshape(nb, len(offs))
        for i, e in enumerate(EDGE_F16):
            vals[i, :] = e                      # all fields the edge value
            vals[len(EDGE_F16) + i, 0] = e      # only the first one
        set_scales(blocks, offs, vals)
    out.append(("random", blocks.tobytes()))
    out.append(("zeros", bytes(4 * ts)))
    ones = np.full((4, ts), 0xFF, dtype=np.uint8)
    if offs:
        set_scales(ones, offs, np.full((4, len(offs)), 0x3C00, dtype=np.uint16))
    out.append(("ones", ones.tobytes()))
    if offs:
        nb = 4 * len(NONFINITE_F16)
        blocks = rng.integers(0, 256, size=(nb, ts), dtype=np.uint8)
        vals = sane_f16(nb * len(offs)).reshape(nb, len(offs))
        for i, e in enumerate(NONFINITE_F16):
            vals[i, :] = e
            vals[len(NONFINITE_F16) + i, 0] = e
            vals[2 * len(NONFINITE_F16) + i, -1] = e
        set_scales(blocks, offs, vals)
        out.append(("nonfinite-scales", blocks.tobytes()))
    if t in PY_QUANT:
        nb = 256
        x = rng.standard_normal((nb, bs)) * 10.0 ** rng.uniform(-3, 2, (nb, 1))
        x[0] = 0.0
        x[1] = 1.0
        x[2, ::2] = -x[2, ::2]
        x = x.astype(np.float32).reshape(-1)
        out.append(("quantized", np.asarray(quants.quantize(x, t)).tobytes()))
    if t.name == "NVFP4":
        blocks = rng.integers(0, 256, size=(8, ts), dtype=np.uint8)
        blocks[0, :4] = [0x00, 0x7F, 0x80, 0xFF]
        blocks[1, :4] = [0x01, 0x07, 0x08, 0x78]
        out.append(("ue4m3-edges", blocks.tobytes()))
    if t.name == "MXFP4":
        blocks = rng.integers(0, 256, size=(256, ts), dtype=np.uint8)
        blocks[:, 0] = np.arange(256, dtype=np.uint8)   # every E8M0 exponent
        out.append(("every-exponent", blocks.tobytes()))
    return out

# Grid i-quants: gguf_io refuses them (checked in Rust), nothing to compare.
GRID = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S"}

for t in PY_DEQUANT:
    bs, ts = GGML_QUANT_SIZES[t]
    if t.name in GRID:
        continue
    if t == T.F32:
        bits = rng.integers(0, 2**32, size=4096, dtype=np.uint64).astype("<u4")
        cases = [("random-bits", bits.tobytes())]
    elif t in (T.F16, T.BF16):
        cases = [("every-bit-pattern", np.arange(65536, dtype="<u2").tobytes())]
    else:
        cases = block_cases(t)
    for case, raw in cases:
        exp = np.asarray(quants.dequantize(np.frombuffer(raw, dtype=np.uint8), t), dtype=np.float32)
        emit("dequant", t, case, exp.size, raw, f32le(exp))

# Types gguf-py 0.19 cannot dequantize: a numpy transcription of ggml's C, f32 throughout.
def f16(blocks, off):
    return blocks[:, off:off + 2].copy().view("<f2").astype(np.float32)  # (nb, 1)

def numpy_ref(name, raw):
    bs, ts = {"Q8_1": (32, 36), "Q8_K": (256, 292), "Q1_0": (128, 18), "Q2_0": (64, 18)}[name]
    b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, ts)
    if name == "Q8_1":
        return (b[:, 4:].view(np.int8).astype(np.float32) * f16(b, 0)).reshape(-1)
    if name == "Q8_K":
        d = b[:, 0:4].copy().view("<f4")
        return (d * b[:, 4:260].view(np.int8).astype(np.float32)).reshape(-1)
    if name == "Q1_0":
        d = f16(b, 0)
        bits = np.unpackbits(b[:, 2:], axis=1, bitorder="little")
        return np.where(bits == 1, d, -d).astype(np.float32).reshape(-1)
    if name == "Q2_0":
        q = (b[:, 2:, None] >> np.array([0, 2, 4, 6], dtype=np.uint8)) & 3
        q = q.reshape(len(b), -1).astype(np.int32) - 1
        return (q.astype(np.float32) * f16(b, 0)).reshape(-1)

for name in ["Q8_1", "Q8_K", "Q1_0", "Q2_0"]:
    t = T[name] if name in T.__members__ else {"Q2_0": 42}[name]
    bs, ts = {"Q8_1": (32, 36), "Q8_K": (256, 292), "Q1_0": (128, 18), "Q2_0": (64, 18)}[name]
    nb = 128
    blocks = rng.integers(0, 256, size=(nb, ts), dtype=np.uint8)
    if name == "Q8_K":
        d = (rng.standard_normal(nb) * 10.0 ** rng.uniform(-6, 2, nb)).astype("<f4")
        d[:3] = [0.0, -0.0, 1e-40]
        blocks[:, 0:4] = d.view(np.uint8).reshape(nb, 4)
    else:
        offs = SCALES[name]
        vals = sane_f16(nb * len(offs)).reshape(nb, len(offs))
        for i, e in enumerate(EDGE_F16):
            vals[i, :] = e
        set_scales(blocks, offs, vals)
    raw = blocks.tobytes()
    exp = numpy_ref(name, raw)
    emit("dequant", int(t), "numpy-ref", exp.size, raw, f32le(exp))

for name, dt in [("F64", "<f8"), ("I8", "i1"), ("I16", "<i2"), ("I32", "<i4"), ("I64", "<i8")]:
    t = T[name]
    if dt == "<f8":
        v = np.concatenate([rng.standard_normal(1000) * 10.0 ** rng.uniform(-50, 50, 1000),
                            [0.0, -0.0, 1e300, -1e300, 1e-300, np.inf, -np.inf, 3.4028235677973366e38]])
        v = v.astype(dt)
    else:
        info = np.iinfo(dt)
        v = rng.integers(info.min, info.max, size=1000, dtype=dt, endpoint=True)
        v[:2] = [info.min, info.max]
    raw = v.tobytes()
    emit("dequant", t, "numpy-ref", v.size, raw, f32le(v.astype(np.float32)))

# Quantization inputs.
def quant_inputs(bs):
    nb = 512
    cases = []
    x = rng.standard_normal((nb, bs)) * 10.0 ** rng.uniform(-3, 3, (nb, 1))
    cases.append(("normal", x.astype(np.float32)))
    x = rng.uniform(-1, 1, (nb, bs)) * 10.0 ** rng.uniform(-8, 8, (nb, 1))
    cases.append(("wide-range", x.astype(np.float32)))
    # Ties: q8_0 blocks with d = 1 (amax 127) and values on half-integers; q4_0 blocks
    # with max = -8 (d = 1) and values on half-integers.
    t8 = np.tile(np.arange(-16, 16, dtype=np.float32) * 3.5 + 0.5, (16, bs // 32))
    t8[:, 0] = 127.0
    t8[8:, 0] = -127.0
    cases.append(("ties-q8", t8.astype(np.float32)))
    t4 = np.tile(np.arange(-16, 16, dtype=np.float32) * 0.5, (16, bs // 32))
    t4[:, 0] = -8.0
    cases.append(("ties-q4", t4.astype(np.float32)))
    z = np.zeros((4, bs), dtype=np.float32)
    z[1, 5] = 3.0
    z[2, 0] = -2.0
    cases.append(("zeros", z))
    for name, scale in [("huge", 1e30), ("beyond-f16", 1e7), ("tiny", 1e-6), ("tinier", 1e-9)]:
        cases.append((name, (rng.standard_normal((16, bs)) * scale).astype(np.float32)))
    sub = (rng.standard_normal((8, bs)) * 1e-40).astype(np.float32)
    cases.append(("subnormal", sub))
    return cases

def f16_inputs():
    h = np.arange(0, 0x7C00, dtype=np.uint32)          # every positive finite f16
    v = h.astype(np.uint16).view(np.float16).astype(np.float64)
    mids = ((v[:-1] + v[1:]) / 2)                       # every tie, exact in f32
    near = np.concatenate([np.nextafter(mids.astype(np.float32), np.float32(0)),
                           np.nextafter(mids.astype(np.float32), np.float32(1e9))])
    rnd = (rng.choice([-1.0, 1.0], 20000) * 2.0 ** rng.uniform(-30, 17, 20000))
    spec = np.array([0.0, -0.0, np.inf, -np.inf, 65504.0, 65519.99, 65520.0, 1e10, -1e10,
                     2.0**-24, 2.0**-25, 2.0**-26, 3 * 2.0**-26], dtype=np.float64)
    x = np.concatenate([v, -v, mids, -mids, near, rnd, spec]).astype(np.float32)
    pad = (-x.size) % 32
    return np.concatenate([x, np.zeros(pad, dtype=np.float32)])

for t in [T.F16, T.BF16, T.Q8_0, T.Q4_0]:
    if t not in PY_QUANT:
        continue
    bs, ts = GGML_QUANT_SIZES[t]
    if t == T.F16:
        cases = [("f16-grid", f16_inputs())]
    elif t == T.BF16:
        bits = rng.integers(0, 2**32, size=65536, dtype=np.uint64).astype(np.uint32)
        bits[:8] = [0x3F808000, 0x3F818000, 0x3F808001, 0x7F7FFFFF, 0x00018000, 0x7F800001, 0xFF812345, 0x7FC00000]
        cases = [("random-bits", bits.view(np.float32))]
    else:
        cases = quant_inputs(bs)
    for case, x in cases:
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        with np.errstate(all="ignore"):
            q = np.asarray(quants.quantize(x, t))
        emit("quant", t, case, x.size, f32le(x), q.tobytes())

with open(os.path.join(out_dir, "manifest.json"), "w") as f:
    json.dump(manifest, f)
"#;

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        support::run_python_ok(GEN_SCRIPT, [dir.path()]);
        load(dir.path())
    })
}

fn load(dir: &Path) -> Fixture {
    let text = std::fs::read_to_string(dir.join("manifest.json")).expect("manifest");
    let m: serde_json::Value = serde_json::from_str(&text).expect("manifest json");
    let ids = |k: &str| -> BTreeSet<u32> {
        m[k].as_array()
            .expect(k)
            .iter()
            .map(|v| v.as_u64().expect("id") as u32)
            .collect()
    };
    let cases = |k: &str| -> Vec<Case> {
        m[k].as_array()
            .expect(k)
            .iter()
            .map(|c| Case {
                ty: GgmlType(c["type"].as_u64().expect("type") as u32),
                case: c["case"].as_str().expect("case").to_owned(),
                n: c["n"].as_u64().expect("n") as usize,
                src: std::fs::read(c["src"].as_str().expect("src")).expect("read src"),
                expected: std::fs::read(c["expected"].as_str().expect("exp")).expect("read exp"),
            })
            .collect()
    };
    Fixture {
        gguf_version: m["gguf_version"].as_str().unwrap_or("").to_owned(),
        py_dequant: ids("py_dequant"),
        py_quant: ids("py_quant"),
        dequant: cases("dequant"),
        quant: cases("quant"),
    }
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn gguf_py_is_the_pinned_version() {
    assert_eq!(fixture().gguf_version, "0.19.0");
}

/// Every type gguf-py can dequantize is either tested here or a grid type we refuse.
#[test]
fn every_gguf_py_type_is_covered() {
    let f = fixture();
    let tested: BTreeSet<u32> = f.dequant.iter().map(|c| c.ty.0).collect();
    for &id in &f.py_dequant {
        let ty = GgmlType(id);
        if GRID_TYPES.contains(&ty) {
            assert!(!quant::can_dequantize(ty), "{ty}");
        } else {
            assert!(
                quant::can_dequantize(ty),
                "gguf-py dequantizes {ty}, we do not"
            );
            assert!(tested.contains(&id), "no cases for {ty}");
        }
    }
    // And everything we can dequantize is tested (against gguf-py or the numpy reference).
    for id in 0..64u32 {
        if quant::can_dequantize(GgmlType(id)) {
            assert!(tested.contains(&id), "{} has no cases", GgmlType(id));
        }
    }
    for ty in [
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
    ] {
        assert!(f.py_quant.contains(&ty.0), "gguf-py cannot quantize {ty}?");
    }
}

#[test]
fn dequantize_is_bit_identical_to_gguf_py() {
    let f = fixture();
    let mut failures = Vec::new();
    let mut summary = Vec::new();
    for c in &f.dequant {
        let want = f32s(&c.expected);
        assert_eq!(want.len(), c.n, "{} {}", c.ty, c.case);
        let got = match quant::dequantize_to_vec(c.ty, &c.src, c.n) {
            Ok(v) => v,
            Err(e) => {
                failures.push(format!("{} {}: {e}", c.ty, c.case));
                continue;
            }
        };
        let mut quieted = 0;
        let bad: Vec<usize> = (0..c.n)
            .filter(|&i| got[i].to_bits() != want[i].to_bits())
            .filter(|&i| {
                let q = is_snan_quieting(c.ty, got[i], want[i]);
                quieted += usize::from(q);
                !q
            })
            .collect();
        if c.ty == GgmlType::F16 && c.case == "every-bit-pattern" {
            assert_eq!(quieted, 2 * 511, "f16 signalling NaNs quieted");
        } else {
            assert_eq!(quieted, 0);
        }
        summary.push(format!(
            "{:>7} {:<18} {:>6} values, {} differ{}",
            c.ty.name(),
            c.case,
            c.n,
            bad.len(),
            if quieted > 0 {
                format!(" (+{quieted} sNaN quieted, as ggml does)")
            } else {
                String::new()
            }
        ));
        if let Some(&i) = bad.first() {
            let bs = c.ty.info().map_or(1, |i| i.block_size as usize);
            failures.push(format!(
                "{} {}: {} of {} values differ; first at {i} (block {}): got {:e} ({:#010x}) want {:e} ({:#010x})",
                c.ty,
                c.case,
                bad.len(),
                c.n,
                i / bs,
                got[i],
                got[i].to_bits(),
                want[i],
                want[i].to_bits()
            ));
        }
    }
    eprintln!("{}", summary.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn quantize_is_bit_identical_to_gguf_py() {
    let f = fixture();
    let mut failures = Vec::new();
    let mut seen = BTreeSet::new();
    for c in &f.quant {
        seen.insert(c.ty.0);
        let x = f32s(&c.src);
        assert_eq!(x.len(), c.n);
        let got = match quant::quantize(c.ty, &x) {
            Ok(v) => v,
            Err(e) => {
                failures.push(format!("{} {}: {e}", c.ty, c.case));
                continue;
            }
        };
        assert_eq!(got.len(), c.expected.len(), "{} {}", c.ty, c.case);
        let info = c.ty.info().expect("known type");
        let (bs, ts) = (info.block_size as usize, info.type_size as usize);
        if cfg!(not(target_arch = "x86_64"))
            && PLATFORM_DEPENDENT_QUANT_CASES.contains(&c.case.as_str())
        {
            // Scale bytes must still agree (see PLATFORM_DEPENDENT_QUANT_CASES).
            for (k, (g, w)) in got
                .chunks_exact(ts)
                .zip(c.expected.chunks_exact(ts))
                .enumerate()
            {
                if g[..2] != w[..2] {
                    failures.push(format!(
                        "{} {}: block {k} scale {:?} vs {:?}",
                        c.ty,
                        c.case,
                        &g[..2],
                        &w[..2]
                    ));
                }
            }
            continue;
        }
        let bad: Vec<usize> = (0..got.len())
            .filter(|&i| got[i] != c.expected[i])
            .collect();
        if let Some(&i) = bad.first() {
            let block = i / ts;
            failures.push(format!(
                "{} {}: {} of {} bytes differ; first at byte {i} (block {block}): got {:02x?} want {:02x?}; input {:?}",
                c.ty,
                c.case,
                bad.len(),
                got.len(),
                &got[block * ts..block * ts + ts],
                &c.expected[block * ts..block * ts + ts],
                &x[block * bs..block * bs + bs.min(8)],
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    for ty in [
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
    ] {
        assert!(seen.contains(&ty.0), "no quantize cases for {ty}");
    }
}

/// The grid i-quants gguf-py can decode are refused with a typed error, not garbage.
#[test]
fn grid_types_are_unsupported() {
    for ty in GRID_TYPES {
        let n = 512;
        let src = vec![0u8; ty.bytes_for(n as u64).expect("size") as usize];
        assert_eq!(
            quant::dequantize_to_vec(ty, &src, n),
            Err(QuantError::Unsupported { ty })
        );
    }
}
