//! The `gguf-reader` binary end to end: output, stdin, JSON, filters, exit codes.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use gguf_io::{quant, GgmlType, GgufWriter, HeaderSpec, Metadata, TensorSpec};

const BIN: &str = env!("CARGO_BIN_EXE_gguf-reader");

fn write_sample(dir: &Path, extra_tokens: usize) -> PathBuf {
    let mut m = Metadata::new();
    m.set("general.architecture", "llama");
    m.set("llama.block_count", 2u32);
    m.set("general.alignment", 64u32);
    let tokens: Vec<String> = (0..extra_tokens.max(3))
        .map(|i| format!("tok{i}"))
        .collect();
    m.set("tokenizer.ggml.tokens", tokens);
    let spec = HeaderSpec {
        metadata: m,
        tensors: vec![
            TensorSpec {
                name: "small.f32".into(),
                dims: vec![4],
                ty: GgmlType::F32,
            },
            TensorSpec {
                name: "blk.0.q8".into(),
                dims: vec![32, 2],
                ty: GgmlType::Q8_0,
            },
            TensorSpec {
                name: "blk.1.weird".into(),
                dims: vec![2],
                ty: GgmlType::F32,
            },
        ],
        byte_order: gguf_io::ByteOrder::Little,
    };
    let q8_src: Vec<f32> = (0..64).map(|i| i as f32 - 32.0).collect();
    let path = dir.join("sample.gguf");
    gguf_io::write_file(&path, &spec, |w: &mut GgufWriter<_>| {
        w.write_tensor(&quant::quantize(GgmlType::F32, &[1.0, 2.0, 3.0, 4.0]).unwrap())?;
        w.write_tensor(&quant::quantize(GgmlType::Q8_0, &q8_src).unwrap())?;
        w.write_tensor(&quant::quantize(GgmlType::F32, &[f32::NAN, f32::INFINITY]).unwrap())
    })
    .unwrap();
    path
}

fn run(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        let mut si = child.stdin.take().unwrap();
        let input = input.to_vec();
        std::thread::spawn(move || {
            let _ = si.write_all(&input);
        });
    }
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

#[test]
fn lists_header_metadata_and_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_sample(dir.path(), 3);
    let o = run(&[path.to_str().unwrap()], None);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let s = stdout(&o);
    assert!(s.contains("version:      3"), "{s}");
    assert!(s.contains("byte order:   little-endian"));
    assert!(s.contains("alignment:    64"));
    assert!(s.contains("llama.block_count"));
    assert!(s.contains("UINT32"));
    assert!(
        s.contains("ARRAY[STRING; 3]  [\"tok0\", \"tok1\", \"tok2\"]"),
        "{s}"
    );
    assert!(s.contains("blk.0.q8"));
    assert!(s.contains("q8_0"));
    assert!(s.contains("[32, 2]"));
    assert!(o.stderr.is_empty());
}

#[test]
fn show_data_dequantizes_and_summarises() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_sample(dir.path(), 3);
    let o = run(
        &[path.to_str().unwrap(), "--show-data", "--count", "3"],
        None,
    );
    assert_eq!(o.status.code(), Some(0));
    let s = stdout(&o);
    assert!(s.contains("values: [1.000000, 2.000000, 3.000000]"), "{s}");
    assert!(s.contains("mean=2.500000e+00 std=1.118034e+00"), "{s}");
    assert!(
        s.contains("min=1.000000e+00 max=4.000000e+00 nan=0 inf=0"),
        "{s}"
    );
    // Q8_0 of -32..31: d = 32/127 rounds to f16 0.251953125, so -127 * d = -31.998047.
    assert!(
        s.contains("values: [-31.998047, -30.990234, -29.982422]"),
        "{s}"
    );
    assert!(s.contains("nan=1 inf=1"), "{s}");
}

#[test]
fn stdin_gives_the_same_report_as_a_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_sample(dir.path(), 3);
    let bytes = std::fs::read(&path).unwrap();
    let from_file = run(&[path.to_str().unwrap(), "--show-data", "--json"], None);
    let from_pipe = run(&["-", "--show-data", "--json"], Some(&bytes));
    assert_eq!(from_pipe.status.code(), Some(0));
    let mut a: serde_json::Value = serde_json::from_slice(&from_file.stdout).unwrap();
    let mut b: serde_json::Value = serde_json::from_slice(&from_pipe.stdout).unwrap();
    assert_eq!(a["file_size"], bytes.len());
    assert_eq!(b["input"], "<stdin>");
    for v in [&mut a, &mut b] {
        v["input"] = serde_json::Value::Null;
        v["file_size"] = serde_json::Value::Null;
    }
    assert_eq!(a, b);
}

#[test]
fn json_document_and_tensor_filter() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_sample(dir.path(), 20);
    let o = run(
        &[
            path.to_str().unwrap(),
            "--json",
            "--tensor",
            r"^blk\.\d+\.",
            "--show-data",
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["schema"], "gguf-reader/1");
    assert_eq!(v["version"], 3);
    assert_eq!(v["kind"], "gguf");
    assert_eq!(v["tensor_count"], 3);
    let names: Vec<&str> = v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["blk.0.q8", "blk.1.weird"]);
    let tok = &v["metadata"][3];
    assert_eq!(tok["key"], "tokenizer.ggml.tokens");
    assert_eq!(tok["len"], 20);
    assert_eq!(tok["truncated"], true);
    assert_eq!(tok["value"].as_array().unwrap().len(), 8);
    let weird = &v["tensors"][1]["data"];
    assert_eq!(weird["first"], serde_json::json!(["nan", "inf"]));
    assert_eq!(weird["nan"], 1);
    assert_eq!(weird["pos_inf"], 1);
    let o = run(&[path.to_str().unwrap(), "--json", "--full-arrays"], None);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["metadata"][3]["value"].as_array().unwrap().len(), 20);
}

#[test]
fn recognises_trace_files_and_groups_by_step() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Metadata::new();
    m.set("kqv_trace.description", "test");
    m.set("kqv_trace.total_steps", 2i32);
    let names = [
        "kqv_out_kqv_out-0_step_0",
        "src0_q-0_step_0",
        "kqv_out_kqv_out-0_step_1",
    ];
    let spec = HeaderSpec {
        metadata: m,
        tensors: names
            .iter()
            .map(|n| TensorSpec {
                name: (*n).into(),
                dims: vec![2],
                ty: GgmlType::F32,
            })
            .collect(),
        byte_order: gguf_io::ByteOrder::Little,
    };
    let path = dir.path().join("trace.gguf");
    gguf_io::write_file(&path, &spec, |w: &mut GgufWriter<_>| {
        for _ in names {
            w.write_tensor(&[0; 8])?;
        }
        Ok(())
    })
    .unwrap();
    let s = stdout(&run(&[path.to_str().unwrap()], None));
    assert!(s.contains("kind:         kv-cache-monitor trace"), "{s}");
    assert!(s.contains("step 0: 2 tensors"), "{s}");
    assert!(s.contains("step 1: 1 tensors"), "{s}");
    let o = run(&[path.to_str().unwrap(), "--json"], None);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["kind"], "kqv-trace");
    assert_eq!(
        v["trace"]["steps"][1]["tensors"][0],
        "kqv_out_kqv_out-0_step_1"
    );
    assert_eq!(v["tensors"][2]["step"], 1);
}

#[test]
fn exit_codes_and_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_sample(dir.path(), 3);
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.gguf");
    // Cut inside the data of the last tensor (the file ends in padding after it).
    let file = gguf_io::GgufFile::open(&path).unwrap();
    let last = file.tensors().last().unwrap();
    let end = (file.header().data_offset + last.offset + last.n_bytes) as usize;
    std::fs::write(&cut, &bytes[..end - 1]).unwrap();

    type Case<'a> = (Vec<&'a str>, Option<&'a [u8]>, i32, &'a str);
    let cases: Vec<Case> = vec![
        (vec![cut.to_str().unwrap()], None, 1, "past its end"),
        (vec!["-"], Some(&bytes[..100]), 1, "input ends at byte 100"),
        (vec!["/nonexistent/x.gguf"], None, 1, "No such file"),
        (vec![], None, 2, "missing input"),
        (vec!["--bogus", "x"], None, 2, "unexpected argument"),
        (vec!["a", "b"], None, 2, "unexpected argument 'b'"),
        (vec!["x", "--count", "many"], None, 2, "--count"),
        (vec!["x", "--tensor", "("], None, 2, "invalid regex"),
    ];
    for (args, input, code, msg) in cases {
        let o = run(&args, input);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        assert!(err.starts_with("gguf-reader: "), "{err}");
        assert!(err.contains(msg), "{args:?}: {err}");
        assert!(o.stdout.is_empty(), "{args:?}: nothing on stdout on error");
    }
    let help = run(&["--help"], None);
    assert_eq!(help.status.code(), Some(0));
    assert!(stdout(&help).contains("--show-data"));
}

#[test]
fn closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_sample(dir.path(), 200_000);
    let mut child = Command::new(BIN)
        .args([path.to_str().unwrap(), "--full-arrays"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `--version` names the tool and the llama.cpp pinned in vendor/pin/Cargo.toml.
#[test]
fn version_names_the_pinned_llama_cpp() {
    let pin = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../vendor/pin/Cargo.toml"),
    )
    .unwrap();
    let line = pin
        .lines()
        .find(|l| l.starts_with("llama-cpp-sys-2"))
        .expect("pin line");
    let version = line
        .split("\"=")
        .nth(1)
        .and_then(|v| v.split('"').next())
        .expect("pinned version");
    let o = run(&["--version"], None);
    assert!(o.status.success());
    let s = stdout(&o);
    assert!(s.starts_with("gguf-reader "), "{s}");
    assert!(s.contains(&format!("llama-cpp-sys-2 {version}")), "{s}");
}
