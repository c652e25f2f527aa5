//! Interoperability with PyPI `gguf` 0.19 (gguf-py) in both directions:
//! files gguf-py writes (little- and big-endian) are read by gguf-io exactly as gguf-py's
//! own reader reads them, and files gguf-io writes are read by gguf-py with identical
//! metadata (types, values, order) and tensors (names, types, shapes, offsets, values).

use test_support::gguf_py as support;

use std::path::Path;

use gguf_io::{
    Array, ByteOrder, GgmlType, GgufFile, GgufWriter, HeaderSpec, Metadata, TensorSpec, Value,
};
use serde_json::Value as Json;

/// Prints, as JSON, what gguf-py's GGUFReader makes of a file. Floats are given as their
/// bit patterns so NaN, -0.0 and the last ulp are compared exactly.
const DUMP: &str = r#"
import json, sys, numpy as np
from gguf import GGUFReader, GGUFValueType as T
from gguf.quants import dequantize
r = GGUFReader(sys.argv[1])
def bits(v, t):
    if t == T.FLOAT32: return int(np.float32(v).view(np.uint32))
    if t == T.FLOAT64: return int(np.float64(v).view(np.uint64))
    if t == T.BOOL: return bool(v)
    return v
fields = []
for f in r.fields.values():
    types = [t.name for t in f.types]
    if f.types[0] == T.ARRAY and len(f.types) > 2:
        value = None  # gguf-py's contents() does not decode nested arrays
    elif f.types[0] == T.ARRAY:
        value = [bits(v, f.types[-1]) for v in f.contents()]
    else:
        value = bits(f.contents(), f.types[0])
    fields.append({"key": f.name, "types": types, "value": value})
tensors = []
for t in r.tensors:
    if t.tensor_type.name in ("F32", "F16", "F64", "I8", "I16", "I32", "I64"):
        vals = np.asarray(t.data).astype(np.float32).reshape(-1)  # numpy rounds to nearest
    else:
        vals = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
    tensors.append({"name": t.name, "type": int(t.tensor_type), "shape": [int(x) for x in t.shape],
        "n_bytes": int(t.n_bytes), "data_offset": int(t.data_offset),
        "f32_bits": [int(x) for x in vals.view(np.uint32)]})
print(json.dumps({"alignment": r.alignment, "data_offset": int(r.data_offset), "fields": fields, "tensors": tensors}))
"#;

/// gguf-py writes a file with every value type, arrays, and tensors of several types.
const WRITE: &str = r#"
import sys, numpy as np
from gguf import GGUFWriter, GGUFValueType as T, GGUFEndian, GGMLQuantizationType as Q
from gguf.quants import quantize
endian = GGUFEndian.BIG if sys.argv[2] == "big" else GGUFEndian.LITTLE
w = GGUFWriter(sys.argv[1], "llama", endianess=endian)
w.add_key_value("s.u8", 250, T.UINT8)
w.add_key_value("s.i8", -100, T.INT8)
w.add_key_value("s.u16", 60000, T.UINT16)
w.add_key_value("s.i16", -30000, T.INT16)
w.add_key_value("s.u32", 4000000000, T.UINT32)
w.add_key_value("s.i32", -2000000000, T.INT32)
w.add_key_value("s.f32", 0.1, T.FLOAT32)
w.add_key_value("s.bool", True, T.BOOL)
w.add_key_value("s.str", "héllo wörld", T.STRING)
w.add_key_value("s.u64", 2**64 - 1, T.UINT64)
w.add_key_value("s.i64", -2**63, T.INT64)
w.add_key_value("s.f64", -1e-300, T.FLOAT64)
for name, t, vals in [("u8", T.UINT8, [0, 255]), ("i8", T.INT8, [-128, 127]), ("u16", T.UINT16, [1, 65535]),
        ("i16", T.INT16, [-1, 2]), ("u32", T.UINT32, [7]), ("i32", T.INT32, [-7, 8, 9]),
        ("f32", T.FLOAT32, [1.5, -0.0, float("inf")]), ("bool", T.BOOL, [True, False, True]),
        ("u64", T.UINT64, [2**63]), ("i64", T.INT64, [-5]), ("f64", T.FLOAT64, [3.25])]:
    w.add_key_value("a." + name, vals, T.ARRAY, sub_type=t)
w.add_array("a.str", ["<pad>", "", "ŧøķëñ"])
w.add_array("a.nested", [[1, 2], [3]])
rng = np.random.default_rng(7)
x = rng.standard_normal((4, 64)).astype(np.float32)
w.add_tensor("t.f32", x)
w.add_tensor("t.f16", x.astype(np.float16))
w.add_tensor("t.f64", x[:1].astype(np.float64))
w.add_tensor("t.i8", np.arange(-16, 16, dtype=np.int8).reshape(2, 16))
w.add_tensor("t.i16", np.arange(-8, 8, dtype=np.int16))
w.add_tensor("t.i32", np.arange(-4, 4, dtype=np.int32))
w.add_tensor("t.i64", np.arange(-2, 2, dtype=np.int64))
w.add_tensor("t.bf16", quantize(x, Q.BF16), raw_dtype=Q.BF16)
w.add_tensor("t.q8_0", quantize(x, Q.Q8_0), raw_dtype=Q.Q8_0)
w.add_tensor("t.q4_0", quantize(x, Q.Q4_0), raw_dtype=Q.Q4_0)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
"#;

fn dump(path: &Path) -> Json {
    let out = support::run_python_ok(DUMP, [path]);
    serde_json::from_str(&out).expect("gguf-py dump is JSON")
}

/// The scalar in gguf-py's dump format (floats as bits).
fn scalar_json(v: &Value) -> Json {
    match v {
        Value::U8(x) => (*x).into(),
        Value::I8(x) => (*x).into(),
        Value::U16(x) => (*x).into(),
        Value::I16(x) => (*x).into(),
        Value::U32(x) => (*x).into(),
        Value::I32(x) => (*x).into(),
        Value::F32(x) => x.to_bits().into(),
        Value::Bool(x) => (*x).into(),
        Value::String(s) => s.as_str().into(),
        Value::U64(x) => (*x).into(),
        Value::I64(x) => (*x).into(),
        Value::F64(x) => x.to_bits().into(),
        Value::Array(_) => Json::Null,
    }
}

/// Type names and value of one metadata entry the way the dump renders it.
fn entry_json(v: &Value) -> (Vec<String>, Json) {
    match v {
        Value::Array(a) => {
            let mut types = vec!["ARRAY".to_owned()];
            let mut inner = a;
            while let Array::Array(items) = inner {
                types.push("ARRAY".to_owned());
                match items.first() {
                    Some(first) => inner = first,
                    None => break,
                }
            }
            types.push(inner.elem_type().name().to_owned());
            if types.len() > 2 {
                return (types, Json::Null);
            }
            let vals = (0..a.len())
                .filter_map(|i| a.get(i))
                .map(|x| scalar_json(&x));
            (types, Json::Array(vals.collect()))
        }
        v => (vec![v.value_type().name().to_owned()], scalar_json(v)),
    }
}

/// Assert gguf-io's reading of `file` equals gguf-py's dump of the same file.
fn assert_same_as_gguf_py(file: &GgufFile, py: &Json) {
    let h = file.header();
    assert_eq!(py["alignment"], h.alignment);
    assert_eq!(py["data_offset"], h.data_offset);
    let fields = py["fields"].as_array().unwrap();
    // gguf-py lists the header fields (GGUF.MAGIC, GGUF.version, ...) first.
    let kv: Vec<&Json> = fields
        .iter()
        .filter(|f| !f["key"].as_str().unwrap().starts_with("GGUF."))
        .collect();
    assert_eq!(kv.len(), h.metadata.len(), "key count");
    for (f, (key, value)) in kv.iter().zip(h.metadata.iter()) {
        assert_eq!(f["key"], key, "key order");
        let (types, val) = entry_json(value);
        assert_eq!(f["types"], serde_json::json!(types), "{key}: types");
        assert_eq!(f["value"], val, "{key}: value");
    }
    let tensors = py["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), file.tensors().len());
    for (pt, t) in tensors.iter().zip(file.tensors()) {
        assert_eq!(pt["name"], t.name);
        assert_eq!(pt["type"], t.ty.0, "{}", t.name);
        assert_eq!(pt["shape"], serde_json::json!(t.dims), "{}", t.name);
        assert_eq!(pt["n_bytes"], t.n_bytes, "{}", t.name);
        assert_eq!(pt["data_offset"], h.data_offset + t.offset, "{}", t.name);
        let ours: Vec<u32> = file
            .tensor_f32(t)
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect();
        assert_eq!(
            pt["f32_bits"],
            serde_json::json!(ours),
            "{}: values",
            t.name
        );
    }
}

#[test]
fn files_written_by_gguf_py_read_identically() {
    let dir = tempfile::tempdir().unwrap();
    for (endian, order) in [("little", ByteOrder::Little), ("big", ByteOrder::Big)] {
        let path = dir.path().join(format!("{endian}.gguf"));
        support::run_python_ok(WRITE, [path.as_os_str(), endian.as_ref()]);
        let file = GgufFile::open(&path).unwrap();
        assert_eq!(file.header().byte_order, order);
        // The nested array gguf-py cannot decode is checked here directly.
        assert_eq!(
            file.metadata().get("a.nested"),
            Some(&Value::Array(Array::Array(vec![
                Array::I32(vec![1, 2]),
                Array::I32(vec![3])
            ])))
        );
        assert_same_as_gguf_py(&file, &dump(&path));
    }
}

#[test]
fn files_written_by_gguf_io_read_identically_by_gguf_py() {
    let mut m = Metadata::new();
    m.set("general.architecture", "llama");
    m.set("s.u8", 1u8);
    m.set("s.i8", -1i8);
    m.set("s.u16", 2u16);
    m.set("s.i16", -2i16);
    m.set("s.u32", 3u32);
    m.set("s.i32", -3i32);
    m.set("s.f32", f32::NAN);
    m.set("s.bool", false);
    m.set("s.str", "ünïcode ✓");
    m.set("s.u64", u64::MAX);
    m.set("s.i64", i64::MIN);
    m.set("s.f64", std::f64::consts::PI);
    m.set("a.str", vec!["a".to_owned(), "b c".to_owned()]);
    m.set("a.f32", vec![1.0f32, -0.0, f32::NEG_INFINITY]);
    m.set("a.u64", vec![1u64, 2, 3]);
    m.set("a.bool", vec![true]);
    m.set("a.i16", vec![-5i16]);
    let values: Vec<f32> = (0..128)
        .map(|i| ((i * 37) % 101) as f32 / 7.0 - 6.0)
        .collect();
    let tensors = [
        (GgmlType::F32, vec![32u64, 4]),
        (GgmlType::F16, vec![128]),
        (GgmlType::BF16, vec![64, 2]),
        (GgmlType::Q8_0, vec![64, 2]),
        (GgmlType::Q4_0, vec![32, 2, 2]),
    ];
    let spec = HeaderSpec {
        metadata: m,
        tensors: tensors
            .iter()
            .enumerate()
            .map(|(i, (ty, dims))| TensorSpec {
                name: format!("t{i}.{}", ty.name()),
                dims: dims.clone(),
                ty: *ty,
            })
            .collect(),
        byte_order: ByteOrder::Little,
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ours.gguf");
    gguf_io::write_file(&path, &spec, |w: &mut GgufWriter<_>| {
        for (ty, _) in &tensors {
            w.write_tensor(&gguf_io::quant::quantize(*ty, &values).unwrap())?;
        }
        Ok(())
    })
    .unwrap();
    let file = GgufFile::open(&path).unwrap();
    assert_same_as_gguf_py(&file, &dump(&path));
}
