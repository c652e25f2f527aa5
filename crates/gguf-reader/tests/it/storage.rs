//! Format version 2 (`--kv-storage delta`, the default) against version 1 (`--kv-storage
//! full`) of the same run: the monitor traces the same model and prompt twice (prompt in
//! ubatches of 16, a few generated tokens), and every tensor of the version-2 file
//! rebuilds byte-identical to the version-1 file's (names, descriptions, bytes), the
//! version-2 file is smaller, `gguf-reader --materialize` of it gives the version-1 file
//! byte for byte, and `--verify-attention` verifies the same groups on both. Over tiny
//! LLaMA with flash attention on and off, a q8_0 cache, Gemma 3 (sliding-window layers)
//! and the mixed KV cache.

use std::path::{Path, PathBuf};
use std::process::Command;

use test_support::LlamaArgs;
use tiny_llama::zoo::Arch;
use trace_format::{Role, Stored, TraceFile};

const READER: &str = env!("CARGO_BIN_EXE_gguf-reader");
pub(crate) const PROMPT: &str =
    "The quick brown fox jumps over a lazy dog. The quick brown fox jumps over a lazy dog again.";

pub(crate) fn capture(args: Vec<String>) {
    match kcm_cli::capture_args::parse(args).expect("arguments") {
        kcm_cli::capture_args::Command::Run(o) => kcm_cli::trace::run(&o).expect("trace"),
        c => panic!("{c:?}"),
    }
}

/// The run `args` traced twice, full and delta: (version 1, version 2).
pub(crate) fn both(dir: &Path, label: &str, args: &[String]) -> (PathBuf, PathBuf) {
    let out = |s: &str| dir.join(format!("{label}-{s}.gguf"));
    for storage in ["full", "delta"] {
        let mut a = args.to_vec();
        a.extend(
            ["--quiet", "--kv-storage", storage, "--save-gguf"]
                .map(String::from)
                .into_iter()
                .chain([out(storage).display().to_string()]),
        );
        capture(a);
    }
    (out("full"), out("delta"))
}

fn reader(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(READER).args(args).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Every tensor (and logits row) of `b` equals `a`'s: table order, names, descriptions,
/// bytes; and the steps, attention records and run facts.
fn same_tensors(label: &str, a: &TraceFile, b: &TraceFile) {
    assert_eq!(
        a.gguf().tensors().len(),
        b.gguf().tensors().len(),
        "{label}"
    );
    for (x, y) in [(&a.tensors, &b.tensors), (&a.logits, &b.logits)] {
        assert_eq!(x.len(), y.len(), "{label}");
        for (ta, tb) in x.iter().zip(y.iter()) {
            assert_eq!(ta.index, tb.index, "{label}");
            assert_eq!(ta.name, tb.name, "{label}");
            assert_eq!(ta.meta, tb.meta, "{label}: {}", ta.name);
            assert!(
                a.data(ta) == b.data(tb),
                "{label}: {} rebuilds other bytes",
                ta.name
            );
        }
    }
    assert_eq!(a.steps, b.steps, "{label}");
    assert_eq!(a.attn, b.attn, "{label}");
    assert_eq!(a.run, b.run, "{label}");
    assert_eq!(a.sampled, b.sampled, "{label}");
}

fn check(dir: &Path, label: &str, args: Vec<String>) {
    let (full, delta) = both(dir, label, &args);
    let a = TraceFile::open(&full).unwrap();
    let b = TraceFile::open(&delta).unwrap();
    assert_eq!(a.format_version, 1, "{label}");
    assert_eq!(b.format_version, 2, "{label}");
    same_tensors(label, &a, &b);
    // Read again from the last tensor back (no rebuilt tensor to start from): the same.
    for (ta, tb) in a.tensors.iter().zip(&b.tensors).rev() {
        assert!(a.data(ta) == b.data(tb), "{label}: {} (reverse)", ta.name);
    }

    let n = b.gguf().tensors().len();
    let deltas = (0..n).filter(|&i| b.stored(i) != Stored::Whole).count();
    let same = (0..n)
        .filter(|&i| matches!(b.stored(i), Stored::Delta { n_ranges: 0, .. }))
        .count();
    let (sa, sb) = (
        std::fs::metadata(&full).unwrap().len(),
        std::fs::metadata(&delta).unwrap().len(),
    );
    eprintln!("{label}: {n} tensors, {deltas} deltas ({same} same as another), {sa} -> {sb} bytes");
    assert!(deltas > 0, "{label}: nothing stored as a delta");
    assert!(sb < sa, "{label}: version 2 is {sb} bytes, version 1 {sa}");
    // Every K view after the first step of its shape is a delta.
    let k_deltas = b
        .tensors
        .iter()
        .filter(|t| t.meta.role == Role::K && b.stored(t.index) != Stored::Whole)
        .count();
    assert!(k_deltas > 0, "{label}: no K view stored as a delta");

    // --materialize: the version-1 file of the same run, byte for byte.
    let mat = dir.join(format!("{label}-materialized.gguf"));
    let (code, out, err) = reader(&[
        delta.to_str().unwrap(),
        "--materialize",
        mat.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{label}: {err}");
    assert!(out.contains("version 1 written"), "{out}");
    let c = TraceFile::open(&mat).unwrap();
    assert_eq!(c.format_version, 1);
    same_tensors(&format!("{label} materialized"), &a, &c);
    assert!(
        std::fs::read(&mat).unwrap() == std::fs::read(&full).unwrap(),
        "{label}: the materialized file is not the version-1 file"
    );
    // A version-1 trace is copied as is.
    let copy = dir.join(format!("{label}-copy.gguf"));
    let (code, _, err) = reader(&[
        full.to_str().unwrap(),
        "--materialize",
        copy.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(std::fs::read(&copy).unwrap() == std::fs::read(&full).unwrap());

    // --verify-attention: the same verdicts on both files, every group verified.
    let verify = |p: &Path| {
        let (code, out, err) = reader(&[p.to_str().unwrap(), "--verify-attention", "--json"]);
        assert_eq!(code, 0, "{label}: {err}\n{out}");
        out
    };
    let (va, vb) = (verify(&full), verify(&delta));
    let groups = |s: &str| s.matches("\"verdict\"").count();
    assert!(groups(&va) > 0, "{label}: {va}");
    assert_eq!(groups(&va), groups(&vb), "{label}");
    assert_eq!(va, vb, "{label}: verification reads other values");

    show_data_is_the_same(label, &full, &delta);

    // The listing says how each tensor is stored.
    let (code, out, _) = reader(&[delta.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(
        out.contains(" stored") && out.contains("delta of #"),
        "{out}"
    );
    let (_, out, _) = reader(&[full.to_str().unwrap()]);
    assert!(!out.contains("delta of #"));
}

/// `gguf-reader` with `args` reading `path` from stdin.
fn reader_stdin(path: &Path, args: &[&str]) -> (i32, String, String) {
    let o = Command::new(READER)
        .arg("-")
        .args(args)
        .stdin(std::fs::File::open(path).unwrap())
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `--show-data` shows each tensor's logical values: the Data section of the version-2
/// file (read from a path or from stdin, every tensor or one delta picked alone) is the
/// version-1 file's, line for line, and so are the `--json` data objects.
fn show_data_is_the_same(label: &str, full: &Path, delta: &Path) {
    let data_section = |out: &str| -> String {
        let at = out
            .find("\nData (")
            .unwrap_or_else(|| panic!("{label}: no Data section"));
        out[at..].to_owned()
    };
    let show = ["--show-data", "--count", "40"];
    let run = |p: &Path, stdin: bool, extra: &[&str]| {
        let args: Vec<&str> = show.iter().chain(extra).copied().collect();
        let (code, out, err) = if stdin {
            reader_stdin(p, &args)
        } else {
            let mut a = vec![p.to_str().unwrap()];
            a.extend(&args);
            reader(&a)
        };
        assert_eq!(code, 0, "{label}: {err}");
        out
    };
    let want = data_section(&run(full, false, &[]));
    assert!(!want.contains("no data"), "{label}: {want}");
    for stdin in [false, true] {
        let got = data_section(&run(delta, stdin, &[]));
        assert!(
            got == want,
            "{label} (stdin {stdin}): --show-data differs on version 2:\n{}",
            first_difference(&want, &got)
        );
    }
    // One delta deep in a K stream, alone (rebuilt through its chain).
    let b = TraceFile::open(delta).unwrap();
    let last_k = b
        .tensors
        .iter()
        .rev()
        .find(|t| {
            t.meta.role == Role::K
                && matches!(b.stored(t.index), Stored::Delta { n_ranges: 1.., .. })
        })
        .unwrap_or_else(|| panic!("{label}: no K delta"));
    let pick = format!("^{}$", regex::escape(&last_k.name));
    for stdin in [false, true] {
        let got = data_section(&run(delta, stdin, &["--tensor", &pick]));
        let want = data_section(&run(full, stdin, &["--tensor", &pick]));
        assert_eq!(got, want, "{label}: {} alone", last_k.name);
        assert!(got.contains("values: ["), "{got}");
    }
    // --json: every tensor's data object.
    let data_objects = |out: &str| -> Vec<serde_json::Value> {
        let v: serde_json::Value = serde_json::from_str(out).unwrap();
        v["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["data"].clone())
            .collect()
    };
    let (a, b) = (
        data_objects(&run(full, false, &["--json"])),
        data_objects(&run(delta, false, &["--json"])),
    );
    assert!(a.iter().all(|d| d.get("first").is_some()), "{label}");
    assert!(a == b, "{label}: --json data objects differ on version 2");
}

/// The first line where `a` and `b` differ, for a readable failure.
fn first_difference(a: &str, b: &str) -> String {
    a.lines()
        .zip(b.lines())
        .find(|(x, y)| x != y)
        .map(|(x, y)| format!("version 1: {x}\nversion 2: {y}"))
        .unwrap_or_else(|| format!("{} lines against {}", a.lines().count(), b.lines().count()))
}

pub(crate) fn tiny(dir: &Path) -> PathBuf {
    let model = dir.join("tiny.gguf");
    tiny_llama::write_model(&model, &tiny_llama::TinyLlamaConfig::default()).unwrap();
    model
}

/// Heads of 32 (a q8_0 cache holds whole blocks of 32; the mixed cache needs them too).
pub(crate) fn tiny_hd32(dir: &Path) -> PathBuf {
    let model = dir.join("tiny-hd32.gguf");
    let cfg = tiny_llama::TinyLlamaConfig {
        head_dim: 32,
        n_embd: 128,
        ..Default::default()
    };
    tiny_llama::write_model(&model, &cfg).unwrap();
    model
}

pub(crate) fn args(model: &Path) -> LlamaArgs {
    LlamaArgs::new(model, PROMPT)
        .n(4)
        .ubatch(16)
        .threads(2)
        .greedy()
}

#[test]
fn version_2_rebuilds_version_1_of_the_same_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    check(
        dir.path(),
        "llama-fa-on",
        args(&model).flash(true).arg("--logits").build(),
    );
    check(
        dir.path(),
        "llama-fa-off",
        args(&model).flash(false).build(),
    );
    // (This run failed one group in both storages until the model rounded Q to Q8_0 as
    // ggml-cpu's x86 quantizer does; it verifies now.)
    let hd32 = tiny_hd32(dir.path());
    check(
        dir.path(),
        "llama-q8_0",
        args(&hd32).flash(true).cache("q8_0", "q8_0").build(),
    );
    let gemma = tiny_llama::zoo::write_zoo_model(dir.path(), Arch::Gemma3).unwrap();
    check(dir.path(), "gemma3", args(&gemma).flash(true).build());
}

/// The mixed KV cache (as crates/kqv-trace-monitor/tests/it/mixed.rs runs it): a hot
/// window of 16, older cells migrated to a q4_0 cold store during the prompt and the
/// generation.
#[test]
fn version_2_rebuilds_version_1_with_the_mixed_kv_cache() {
    if ggml_trace::skip_without_mixed_kv("version_2_rebuilds_version_1_with_the_mixed_kv_cache") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_hd32(dir.path());
    let prompt = PROMPT.repeat(2);
    let a = LlamaArgs::new(&model, &prompt)
        .n(12)
        .ubatch(16)
        .threads(2)
        .greedy()
        .args([
            "--mixed-kv-cache",
            "--mixed-hot-window",
            "16",
            "--mixed-cold-type",
            "q4_0",
        ])
        .build();
    check(dir.path(), "mixed", a);
}
