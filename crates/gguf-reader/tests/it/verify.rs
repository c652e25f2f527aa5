//! `--verify-attention` and `--shapes` on synthetic traces (attn_verify::synth): exit 0
//! when every group verifies, 1 when a group fails, 2 when the trace is malformed or a
//! group cannot be checked; every group is reported; stderr is one line; strings from the
//! file are escaped.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use attn_verify::synth::{honest_trace, Spec};
use gguf_io::{Array, GgufFile, HeaderSpec, Value};
use trace_format::synth::rewrite;
use trace_format::{keys, Role, TraceFile};

const BIN: &str = env!("CARGO_BIN_EXE_gguf-reader");

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn honest() -> Vec<u8> {
    honest_trace(&Spec::default()).unwrap()
}

/// The honest trace rewritten; `edit` gets the honest trace to find tensors.
fn planted(edit: impl FnOnce(&TraceFile, &mut HeaderSpec, &mut Vec<Vec<u8>>)) -> Vec<u8> {
    let h = honest();
    let t = TraceFile::from_gguf(GgufFile::from_bytes(h.clone()).unwrap()).unwrap();
    rewrite(&h, |spec, data| edit(&t, spec, data)).unwrap()
}

fn reader(path: &Path, args: &[&str]) -> (Output, String, String) {
    let o = Command::new(BIN).arg(path).args(args).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    (o, out, err)
}

fn one_line(err: &str) {
    assert_eq!(err.lines().count(), 1, "{err:?}");
    assert!(!err.contains('\u{1b}'), "{err:?}");
}

#[test]
fn verify_attention_exit_codes_tell_failed_from_malformed() {
    let dir = tempfile::tempdir().unwrap();
    // 0: every group verifies.
    let good = write(dir.path(), "good.gguf", &honest());
    let (o, out, err) = reader(&good, &["--verify-attention"]);
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    assert!(out.contains("verified 4 of 4 (step, layer) groups: 0 failed, 0 missing inputs"));
    assert!(err.is_empty());

    // 1: one group's kqv_out perturbed; the others verify.
    let failed = planted(|t, _, d| {
        let i = t.find(Role::KqvOut, 1, 1).unwrap().index;
        d[i][..4].copy_from_slice(&7.5f32.to_le_bytes());
    });
    let failed = write(dir.path(), "failed.gguf", &failed);
    let (o, out, err) = reader(&failed, &["--verify-attention"]);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(
        out.contains("verified 3 of 4 (step, layer) groups: 1 failed"),
        "{out}"
    );

    // 2: a duplicate kqv_out in (0, 0) makes that group malformed; the others are checked.
    let dup = planted(|t, h, _| {
        let i = t.find(Role::KqvOut, 0, 1).unwrap().index;
        let Some(Value::Array(Array::U32(s))) = h.metadata.get(keys::TENSOR_STEP) else {
            panic!()
        };
        let mut s = s.clone();
        s[i] = 0;
        h.metadata.set(keys::TENSOR_STEP, s);
    });
    let dup = write(dir.path(), "dup.gguf", &dup);
    let (o, out, err) = reader(&dup, &["--verify-attention"]);
    assert_eq!(o.status.code(), Some(2), "{out}{err}");
    let row = out
        .lines()
        .find(|l| l.split_whitespace().take(2).eq(["0", "0"]))
        .unwrap();
    assert!(
        row.contains("malformed:") && row.contains("a second kqv_out"),
        "{row}"
    );
    assert!(
        out.contains(
            "verified 2 of 4 (step, layer) groups: 0 failed, 1 missing inputs, 1 malformed"
        ),
        "{out}"
    );
    one_line(&err);
    assert!(err.contains("1 group(s) malformed"), "{err}");
    // --json says so too.
    let (o, out, _) = reader(&dup, &["--verify-attention", "--json"]);
    assert_eq!(o.status.code(), Some(2));
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["malformed"], 1);
    assert_eq!(doc["groups"][0]["verdict"], "malformed");

    // 2: a file-level contradiction (a 64-bit n_head that does not fit), one line.
    let wide = planted(|_, h, _| h.metadata.set(keys::RUN_N_HEAD, (1u64 << 32) + 4));
    let wide = write(dir.path(), "wide.gguf", &wide);
    for args in [&["--verify-attention"][..], &["--shapes"]] {
        let (o, out, err) = reader(&wide, args);
        assert_eq!(o.status.code(), Some(2), "{out}{err}");
        one_line(&err);
        assert!(err.contains("4294967300 does not fit in u32"), "{err}");
    }
    // The plain reader still shows the file.
    let (o, _, _) = reader(&wide, &[]);
    assert_eq!(o.status.code(), Some(0));

    // 2: over the work budget (192 multiply-adds per group), with the flag to raise it.
    let (o, out, err) = reader(&good, &["--verify-attention", "--max-work", "100"]);
    assert_eq!(o.status.code(), Some(2), "{out}{err}");
    assert_eq!(out.matches("malformed:").count(), 4, "{out}");
    assert!(out.contains("raise it with --max-work N"), "{out}");
    one_line(&err);
    let (o, _, _) = reader(&good, &["--verify-attention", "--max-work", "192"]);
    assert_eq!(o.status.code(), Some(0));
}

#[test]
fn a_k_view_claiming_2_pow_60_cells_in_zero_bytes_is_refused_quickly_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = planted(|t, h, d| {
        let k = t.find(Role::K, 0, 0).unwrap().index;
        h.tensors[k].dims = vec![0, 1 << 60, 1, 1];
        d[k].clear();
    });
    let bad = write(dir.path(), "k60.gguf", &bad);
    let start = Instant::now();
    let (o, out, err) = reader(&bad, &["--verify-attention"]);
    assert!(start.elapsed() < Duration::from_secs(10));
    assert_eq!(o.status.code(), Some(2), "{out}{err}");
    one_line(&err);
    assert!(out.contains("zero dimension"), "{out}");
    assert!(out.contains("verified 3 of 4"), "{out}");
    for args in [&["--shapes"][..], &["--show-data"], &["--json"]] {
        let (o, _, err) = reader(&bad, args);
        assert!(matches!(o.status.code(), Some(0 | 2)), "{args:?}: {err}");
        assert!(err.lines().count() <= 1, "{err}");
    }
}

#[test]
fn strings_from_the_file_are_escaped_on_the_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let evil = planted(|t, h, _| {
        let i = t.find(Role::KqvOut, 0, 1).unwrap().index;
        h.tensors[i].name = "kqv\n\u{1b}[2Jout".into();
        h.metadata
            .set(keys::RUN_MODEL_PATH, "/m\n\u{1b}]0;pwned\u{7}.gguf");
        let Some(Value::Array(Array::U32(s))) = h.metadata.get(keys::TENSOR_STEP) else {
            panic!()
        };
        let mut s = s.clone();
        s[i] = 0;
        h.metadata.set(keys::TENSOR_STEP, s);
    });
    let evil = write(dir.path(), "evil.gguf", &evil);
    for args in [
        &["--verify-attention"][..],
        &["--shapes"],
        &[],
        &["--show-data"],
    ] {
        let (_, out, err) = reader(&evil, args);
        for s in [&out, &err] {
            assert!(!s.contains(['\u{1b}', '\u{7}']), "{args:?}: {s:?}");
            assert!(!s.contains("kqv\n"), "{args:?}: {s:?}");
        }
    }
    let (_, out, _) = reader(&evil, &["--verify-attention"]);
    assert!(out.contains("kqv\\n\\u{1b}[2Jout"), "{out}");
}
