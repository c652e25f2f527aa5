//! A saved trace is an ordinary GGUF: PyPI gguf-py and ggml's own C reader (through the
//! FFI of the vendored llama.cpp) read the same tensors, names, keys and values as
//! `trace-format`.

use test_support::gguf_py as support;

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;

use ggml_trace::sys;
use trace_format::{keys, Role, TraceFile};

const BIN: &str = env!("CARGO_BIN_EXE_kqv-trace-monitor");

/// Trace the tiny model (flash attention on: kqv_out, attn, q, k, v, mask per layer),
/// stored `full` (format version 1: every GGUF tensor is the traced tensor, what gguf-py
/// and ggml read directly) or `delta` (the default, version 2).
fn saved_trace(dir: &Path, storage: &str) -> PathBuf {
    let model = dir.join("tiny.gguf");
    tiny_llama::write_model(&model, &tiny_llama::TinyLlamaConfig::default()).unwrap();
    let out = dir.join("trace.gguf");
    let o = Command::new(BIN)
        .args(["-m", model.to_str().unwrap(), "-p", "Hello world"])
        .args(["-n", "2", "-t", "2", "--temp", "0", "-fa", "on"])
        .args(["--kv-storage", storage])
        .args(["--save-gguf", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

const GGUF_PY: &str = r#"
import json, sys
import gguf
import numpy as np
r = gguf.GGUFReader(sys.argv[1])
wanted = set(sys.argv[2:])
out = {
    "n_tensors": len(r.tensors),
    "tensors": [
        {"name": t.name, "type": t.tensor_type.name, "shape": [int(x) for x in t.shape]}
        for t in r.tensors
    ],
    "fields": {},
    "data": {},
}
for key in ["kqv_trace.total_steps", "kqv_trace.tensor_count", "kqv_trace.format_version",
            "kqv_trace.complete", "kqv_trace.run.flash_attn", "kqv_trace.run.cache_type_k",
            "kqv_trace.tensor.role", "kqv_trace.tensor.layer", "kqv_trace.tensor.nb",
            "kqv_trace.step.n_tokens"]:
    f = r.fields[key]
    v = f.contents()
    out["fields"][key] = {"type": [t.name for t in f.types], "value": v}
for t in r.tensors:
    if t.name in wanted:
        # As f32 bit patterns (f16 widens exactly), so no decimal round trip intervenes.
        bits = t.data.reshape(-1).astype(np.float32).view(np.uint32)
        out["data"][t.name] = [int(x) for x in bits]
print(json.dumps(out))
"#;

#[test]
fn gguf_py_reads_a_saved_trace() {
    let dir = tempfile::tempdir().unwrap();
    let path = saved_trace(dir.path(), "full");
    let t = TraceFile::open(&path).unwrap();
    let k = t.find(Role::K, 1, 2).unwrap();
    let out = t.find(Role::KqvOut, 0, 0).unwrap();
    let q = t.find(Role::Q, 1, 1).unwrap();
    let picked = [out, k, q];

    let mut args = vec![path.display().to_string()];
    args.extend(picked.iter().map(|x| x.name.clone()));
    let json = support::run_python_ok(GGUF_PY, &args);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();

    let n = t.gguf().tensors().len();
    assert_eq!(v["n_tensors"], n);
    assert_eq!(n, 3 * 2 * 6);
    for (i, tt) in t.tensors.iter().enumerate() {
        let py = &v["tensors"][i];
        assert_eq!(py["name"], tt.name.as_str());
        assert_eq!(
            py["type"],
            tt.meta.layout.ty.name().to_uppercase().as_str(),
            "{}",
            tt.name
        );
        // gguf-py's `shape` is ggml's ne (fastest first).
        assert_eq!(
            py["shape"],
            serde_json::json!(tt.meta.layout.ne),
            "{}",
            tt.name
        );
    }

    let f = &v["fields"];
    let field = |k: &str| &f[k]["value"];
    assert_eq!(f[keys::TOTAL_STEPS]["type"], serde_json::json!(["INT32"]));
    assert_eq!(field(keys::TOTAL_STEPS), t.steps.len());
    assert_eq!(field(keys::TENSOR_COUNT), n);
    assert_eq!(
        field(keys::FORMAT_VERSION),
        trace_format::FORMAT_VERSION_FULL
    );
    assert_eq!(field(keys::COMPLETE), true);
    assert_eq!(field(keys::RUN_FLASH_ATTN), "on");
    assert_eq!(field(keys::RUN_CACHE_TYPE_K), "f16");
    assert_eq!(
        f[keys::TENSOR_ROLE]["type"],
        serde_json::json!(["ARRAY", "STRING"])
    );
    let roles: Vec<&str> = t.tensors.iter().map(|x| x.meta.role.name()).collect();
    assert_eq!(field(keys::TENSOR_ROLE), &serde_json::json!(roles));
    let layers: Vec<i32> = t.tensors.iter().map(|x| x.meta.layer).collect();
    assert_eq!(field(keys::TENSOR_LAYER), &serde_json::json!(layers));
    let nb: Vec<u64> = t.tensors.iter().flat_map(|x| x.meta.layout.nb).collect();
    assert_eq!(field(keys::TENSOR_NB), &serde_json::json!(nb));
    assert_eq!(
        f[keys::TENSOR_NB]["type"],
        serde_json::json!(["ARRAY", "UINT64"])
    );
    let counts: Vec<usize> = t.steps.iter().map(|s| s.positions.len()).collect();
    assert_eq!(field(keys::STEP_N_TOKENS), &serde_json::json!(counts));

    // Values: f32 (kqv_out, q) and f16 (the K cache view) read the same both ways, bit
    // for bit.
    for x in picked {
        let ours = t.f32(x).unwrap();
        let theirs: Vec<u32> = v["data"][x.name.as_str()]
            .as_array()
            .unwrap_or_else(|| panic!("no data for {}", x.name))
            .iter()
            .map(|y| y.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(theirs.len(), ours.len(), "{}", x.name);
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert_eq!(
                a.to_bits(),
                *b,
                "{} [{i}]: {a} vs {}",
                x.name,
                f32::from_bits(*b)
            );
        }
    }
}

fn c_str<'a>(p: *const std::os::raw::c_char) -> &'a str {
    assert!(!p.is_null());
    // SAFETY: ggml returns NUL-terminated strings owned by the live gguf context.
    unsafe { CStr::from_ptr(p) }.to_str().unwrap()
}

#[test]
fn ggml_c_reader_reads_a_saved_trace() {
    let dir = tempfile::tempdir().unwrap();
    let path = saved_trace(dir.path(), "full");
    let t = TraceFile::open(&path).unwrap();
    let n = t.gguf().tensors().len();
    let cpath = CString::new(path.to_str().unwrap()).unwrap();

    // Metadata and the tensor table only.
    let params = sys::gguf_init_params {
        no_alloc: true,
        ctx: std::ptr::null_mut(),
    };
    // SAFETY: a valid NUL-terminated path; ggml returns null on failure.
    let ctx = unsafe { sys::gguf_init_from_file(cpath.as_ptr(), params) };
    assert!(!ctx.is_null(), "ggml rejected the trace");
    // SAFETY: ctx is a live gguf context until gguf_free below; ids come from ggml.
    unsafe {
        assert_eq!(sys::gguf_get_n_tensors(ctx), n as i64);
        let key = CString::new(keys::TOTAL_STEPS).unwrap();
        let id = sys::gguf_find_key(ctx, key.as_ptr());
        assert!(id >= 0, "no {}", keys::TOTAL_STEPS);
        assert_eq!(sys::gguf_get_kv_type(ctx, id), sys::GGUF_TYPE_INT32);
        assert_eq!(sys::gguf_get_val_i32(ctx, id), t.steps.len() as i32);

        let key = CString::new(keys::TENSOR_ROLE).unwrap();
        let id = sys::gguf_find_key(ctx, key.as_ptr());
        assert!(id >= 0);
        assert_eq!(sys::gguf_get_kv_type(ctx, id), sys::GGUF_TYPE_ARRAY);
        assert_eq!(sys::gguf_get_arr_type(ctx, id), sys::GGUF_TYPE_STRING);
        assert_eq!(sys::gguf_get_arr_n(ctx, id), n);
        for (i, tt) in t.tensors.iter().enumerate() {
            assert_eq!(
                c_str(sys::gguf_get_arr_str(ctx, id, i)),
                tt.meta.role.name()
            );
        }

        assert_eq!(c_str(sys::gguf_get_tensor_name(ctx, 0)), t.tensors[0].name);
        assert_eq!(t.tensors[0].name, "kqv_out_kqv_out-0_step_0");
        for (i, tt) in t.tensors.iter().enumerate() {
            let id = i as i64;
            assert_eq!(c_str(sys::gguf_get_tensor_name(ctx, id)), tt.name);
            assert_eq!(sys::gguf_get_tensor_type(ctx, id), tt.meta.layout.ty.0);
            assert_eq!(
                sys::gguf_get_tensor_size(ctx, id) as u64,
                tt.meta.layout.n_bytes().unwrap()
            );
        }
        sys::gguf_free(ctx);
    }

    // With the data: ggml builds a context whose tensors hold the trace's bytes.
    let mut gctx: *mut sys::ggml_context = std::ptr::null_mut();
    let params = sys::gguf_init_params {
        no_alloc: false,
        ctx: &mut gctx,
    };
    // SAFETY: as above; ggml stores the data context in `gctx`.
    let ctx = unsafe { sys::gguf_init_from_file(cpath.as_ptr(), params) };
    assert!(!ctx.is_null() && !gctx.is_null());
    // SAFETY: gctx holds every tensor of the file with its data until ggml_free.
    unsafe {
        for tt in &t.tensors {
            let name = CString::new(tt.name.as_str()).unwrap();
            let g = sys::ggml_get_tensor(gctx, name.as_ptr());
            assert!(!g.is_null(), "{} not in the ggml context", tt.name);
            let ne: Vec<u64> = (*g).ne.iter().map(|&x| x as u64).collect();
            assert_eq!(ne, tt.meta.layout.ne, "{}", tt.name);
            let bytes = std::slice::from_raw_parts((*g).data as *const u8, sys::ggml_nbytes(g));
            assert!(*bytes == *t.data(tt), "{}: ggml reads other bytes", tt.name);
        }
        sys::ggml_free(gctx);
        sys::gguf_free(ctx);
    }
}

/// docs/trace-format.md describes every key a trace holds and every role.
#[test]
fn the_format_doc_covers_every_key_and_role() {
    let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/trace-format.md");
    let doc = std::fs::read_to_string(&doc_path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let t = TraceFile::open(saved_trace(dir.path(), "delta")).unwrap();
    let mut n = 0;
    for (key, _) in t.gguf().metadata().iter() {
        // Tables list `kqv_trace.run.n_ctx` as `n_ctx` under their section.
        let short = ["run.", "step.", "tensor.", "attn."]
            .iter()
            .find_map(|s| key.strip_prefix(&format!("kqv_trace.{s}")));
        let found = doc.contains(&format!("`{key}`"))
            || short.is_some_and(|s| doc.contains(&format!("`{s}`")));
        assert!(found, "{key} is not in docs/trace-format.md");
        n += 1;
    }
    assert!(n >= 41, "{n} keys");
    for role in Role::ALL {
        assert!(
            doc.contains(&format!("`{}`", role.name())),
            "role {role} is not in docs/trace-format.md"
        );
    }
}
