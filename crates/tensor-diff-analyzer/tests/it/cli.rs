//! `tensor-diff-analyzer` end to end on the generated tiny LLaMA: references are traced
//! with the monitor's library (`kcm_cli::trace::run`), then the analyzer binary runs
//! live against them or compares saved traces offline. Expected numbers come from the
//! traces themselves (recomputed here in f64 from the files), never from constants.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;

use gguf_io::{GgufFile, HeaderSpec};
use serde_json::Value;
use trace_format::{Role, TraceFile};

const BIN: &str = env!("CARGO_BIN_EXE_tensor-diff-analyzer");
const PROMPT: &str = "Hello world";
/// One llama.cpp run in this process at a time (the monitor's library).
pub(crate) static LLAMA: Mutex<()> = Mutex::new(());

pub(crate) fn model(dir: &Path, head_dim: usize) -> PathBuf {
    tiny_llama::write_with_head_dim(dir, head_dim).unwrap()
}

fn llama_args(model: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = ["-m", model.to_str().unwrap(), "-p", PROMPT]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.extend(
        ["-n", "2", "-t", "2", "--temp", "0"]
            .iter()
            .map(|s| s.to_string()),
    );
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// Trace a reference with the monitor's library.
pub(crate) fn reference(model: &Path, out: &Path, extra: &[&str]) -> TraceFile {
    let mut args = llama_args(model, extra);
    args.extend(["--save-gguf".into(), out.display().to_string()]);
    let opts = match kcm_cli::capture_args::parse(args).unwrap() {
        kcm_cli::capture_args::Command::Run(o) => o,
        c => panic!("{c:?}"),
    };
    {
        let _one = LLAMA.lock().unwrap_or_else(|p| p.into_inner());
        kcm_cli::trace::run(&opts).unwrap();
    }
    TraceFile::open(out).unwrap()
}

pub(crate) fn analyze(args: &[String], envs: &[(&str, &str)]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args).stdin(Stdio::null());
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn live(model: &Path, reference: &Path, extra: &[&str], own: &[&str]) -> Output {
    let mut a = llama_args(model, extra);
    a.extend(["--reference".into(), reference.display().to_string()]);
    a.extend(own.iter().map(|s| s.to_string()));
    analyze(&a, &[])
}

pub(crate) fn offline(reference: &Path, current: &Path, own: &[&str]) -> Output {
    let mut a = vec![
        "--reference".to_string(),
        reference.display().to_string(),
        "--current".into(),
        current.display().to_string(),
    ];
    a.extend(own.iter().map(|s| s.to_string()));
    analyze(&a, &[])
}

pub(crate) fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub(crate) fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

pub(crate) fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\nstderr {}", text(&o.stdout), text(&o.stderr)))
}

/// One line on stderr, nothing on stdout, exit 2.
pub(crate) fn input_error(o: &Output) -> String {
    assert_eq!(
        code(o),
        2,
        "stdout {}\nstderr {}",
        text(&o.stdout),
        text(&o.stderr)
    );
    assert!(o.stdout.is_empty(), "{}", text(&o.stdout));
    let e = text(&o.stderr);
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    e
}

pub(crate) fn f64_of(v: &Value) -> f64 {
    match v {
        Value::String(s) if s == "inf" => f64::INFINITY,
        v => v.as_f64().unwrap_or_else(|| panic!("{v}")),
    }
}

/// Exact f64 NMSE of two saved tensors.
fn nmse(
    a: &TraceFile,
    ta: &trace_format::TracedTensor,
    b: &TraceFile,
    tb: &trace_format::TracedTensor,
) -> f64 {
    let (x, y) = (a.f32(ta).unwrap(), b.f32(tb).unwrap());
    let n = y.len() as f64;
    let mean = y.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = y
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    let mse = x
        .iter()
        .zip(&y)
        .map(|(&p, &q)| (f64::from(p) - f64::from(q)).powi(2))
        .sum::<f64>()
        / n;
    mse / var
}

#[test]
fn the_same_configuration_twice_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path(), 16);
    // The reference in both storages: the live analyzer reads either.
    for storage in test_support::storage::BOTH {
        let r = dir.path().join(format!("ref-{}.gguf", storage.name()));
        let t = reference(&m, &r, &test_support::storage::args(storage));
        assert_eq!(t.format_version, storage.format_version());
        let o = live(&m, &r, &[], &[]);
        let out = text(&o.stdout);
        assert_eq!(code(&o), 0, "{out}\n{}", text(&o.stderr));
        let n = t.tensors.len();
        assert!(
            out.starts_with("=== TENSOR DIFFERENCE ANALYSIS SUMMARY ===\n"),
            "{out}"
        );
        assert!(out.contains(&format!("Total comparisons: {n}\n")), "{out}");
        assert!(
            out.contains(&format!("Tensors within tolerance: {n}/{n} (100.0%)")),
            "{out}"
        );
        assert!(
            out.contains("Tolerance - Absolute: 1.00e-06, Relative: 1.00e-04"),
            "{out}"
        );
        assert!(out.contains("First out of tolerance: none"), "{out}");
        // JSON: every tensor of the reference compared, all exactly equal.
        let j = json(&live(&m, &r, &[], &["--json"]));
        assert_eq!(j["schema"], "tensor-diff-analyzer/1");
        assert_eq!(j["total_comparisons"].as_u64(), Some(n as u64));
        assert_eq!(j["exit_code"], 0);
        for c in j["tensors"].as_array().unwrap() {
            assert_eq!(f64_of(&c["metrics"]["max_abs"]), 0.0, "{c}");
            assert_eq!(f64_of(&c["metrics"]["cosine"]), 1.0, "{c}");
        }
        // --noise-floor: the run-to-run difference is reported (and is zero on the CPU).
        let o = live(&m, &r, &[], &["--noise-floor"]);
        let out = text(&o.stdout);
        assert_eq!(code(&o), 0, "{out}\n{}", text(&o.stderr));
        assert!(
            out.contains("noise NMSE")
                && out.contains("noise: the current configuration run twice"),
            "{out}"
        );
    }
}

#[test]
fn offline_gives_the_live_numbers_and_works_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path(), 16);
    let r = dir.path().join("ref.gguf");
    let rt = reference(&m, &r, &["-fa", "on"]);
    // Live against the FA-on reference with FA off, saving the live run.
    let saved = dir.path().join("fa-off.gguf");
    let lo = live(
        &m,
        &r,
        &["-fa", "off"],
        &["--json", "--save-gguf", saved.to_str().unwrap()],
    );
    let lj = json(&lo);
    assert_eq!(code(&lo), 1, "{}", text(&lo.stderr));
    // The flash-attention difference is explained before any number.
    let notes = lj["notes"].as_array().unwrap();
    assert!(
        notes
            .iter()
            .any(|n| n.as_str().unwrap().contains("flash attention differs")),
        "{notes:?}"
    );
    let oj = json(&offline(&r, &saved, &["--json"]));
    assert_eq!(
        lj["tensors"], oj["tensors"],
        "offline must reproduce live exactly"
    );
    assert_eq!(lj["exit_code"], oj["exit_code"]);
    // Both files (written delta, the default) as version 1 too: the same numbers, and
    // one of each storage against the other.
    use test_support::storage::{as_storage, KvStorage};
    let (r1, saved1) = (
        as_storage(&r, KvStorage::Full),
        as_storage(&saved, KvStorage::Full),
    );
    for (a, b) in [(&r1, &saved1), (&r, &saved1), (&r1, &saved)] {
        let j = json(&offline(a, b, &["--json"]));
        assert_eq!(
            lj["tensors"],
            j["tensors"],
            "{} against {}",
            a.display(),
            b.display()
        );
        assert_eq!(lj["exit_code"], j["exit_code"]);
    }
    // Each compared kqv_out's NMSE is the f64 NMSE of the two files' tensors.
    let ct = TraceFile::open(&saved).unwrap();
    for c in oj["tensors"].as_array().unwrap() {
        if c["role"] != "kqv_out" {
            continue;
        }
        let (layer, step) = (
            c["layer"].as_i64().unwrap() as i32,
            c["step"].as_u64().unwrap() as u32,
        );
        let expect = nmse(
            &ct,
            ct.find(Role::KqvOut, layer, step).unwrap(),
            &rt,
            rt.find(Role::KqvOut, layer, step).unwrap(),
        );
        let got = f64_of(&c["metrics"]["nmse"]);
        assert!((got - expect).abs() <= 1e-9 * expect, "{got} vs {expect}");
        assert!(got > 0.0);
    }
    // The other way round: same pairs, reference and current swapped.
    let back = json(&offline(&saved, &r, &["--json"]));
    assert_eq!(back["total_comparisons"], oj["total_comparisons"]);
    assert_eq!(back["exit_code"], 1);
    assert_eq!(f64_of(&back["max_abs"]), f64_of(&oj["max_abs"]));
    // FA-only and FA-off-only tensors are listed as not comparable, not silently dropped.
    let nc = oj["not_comparable"].as_array().unwrap();
    assert!(nc.iter().any(|u| u["role"] == "kq_soft_max"), "{nc:?}");
    assert!(nc
        .iter()
        .any(|u| u["role"] == "attn" && u["side"] == "reference"));
}

#[test]
fn q8_0_cache_against_an_f16_reference() {
    let dir = tempfile::tempdir().unwrap();
    // head_dim 64: llama.cpp rotates a quantized cache (docs/trace-format.md, Rotation).
    let m = model(dir.path(), 64);
    let r = dir.path().join("f16.gguf");
    let rt = reference(&m, &r, &["-fa", "on"]);
    let q8 = ["-fa", "on", "-ctk", "q8_0", "-ctv", "q8_0"];

    // Rotation enabled: q/k/v/attn are in another basis; kqv_out is compared through the
    // current run's kqv_out_unrotated.
    let saved = dir.path().join("q8.gguf");
    let o = live(&m, &r, &q8, &["--save-gguf", saved.to_str().unwrap()]);
    let out = text(&o.stdout);
    assert_eq!(code(&o), 1, "{out}\n{}", text(&o.stderr));
    let notes_at = out.find("--- Run differences").expect("notes");
    assert!(notes_at < out.find("--- Overall Results").unwrap());
    assert!(out.contains("rotation basis differs"), "{out}");
    assert!(out.contains("LLAMA_ATTN_ROT_DISABLE=1"), "{out}");
    assert!(
        out.contains("KV cache types differ: reference K f16 / V f16, current K q8_0 / V q8_0"),
        "{out}"
    );
    assert!(out.contains("passes with --tolerance-abs"), "{out}");
    let j = json(&offline(&r, &saved, &["--json"]));
    let ct = TraceFile::open(&saved).unwrap();
    assert!(ct.run.kv_rotation);
    let tensors = j["tensors"].as_array().unwrap();
    let outs: Vec<&Value> = tensors
        .iter()
        .filter(|c| c["reference_role"] == "kqv_out")
        .collect();
    assert_eq!(
        outs.len(),
        rt.tensors
            .iter()
            .filter(|t| t.meta.role == Role::KqvOut)
            .count()
    );
    for c in &outs {
        assert_eq!(c["role"], "kqv_out_unrotated", "{c}");
        let (layer, step) = (
            c["layer"].as_i64().unwrap() as i32,
            c["step"].as_u64().unwrap() as u32,
        );
        let expect = nmse(
            &ct,
            ct.find(Role::KqvOutUnrotated, layer, step).unwrap(),
            &rt,
            rt.find(Role::KqvOut, layer, step).unwrap(),
        );
        let got = f64_of(&c["metrics"]["nmse"]);
        assert!((got - expect).abs() <= 1e-9 * expect, "{got} vs {expect}");
        // q8_0 error: well above f32 rounding, far below a wrong basis (NMSE ~ 2).
        assert!(got > 1e-8 && got < 1e-2, "{got}");
        assert_eq!(c["within"], false);
    }
    assert!(!tensors
        .iter()
        .any(|c| c["role"] == "q" || c["role"] == "k" || c["role"] == "v"));
    // The smallest passing tolerances do pass.
    let abs = tensors
        .iter()
        .map(|c| f64_of(&c["metrics"]["min_passing_abs"]))
        .fold(0.0, f64::max);
    let o = offline(
        &r,
        &saved,
        &["--tolerance-abs", &format!("{:e}", abs * 1.000001)],
    );
    assert_eq!(code(&o), 0, "{}", text(&o.stdout));

    // Rotation disabled: every role is compared; K and V are of another type.
    let mut a = llama_args(&m, &q8);
    a.extend([
        "--reference".into(),
        r.display().to_string(),
        "--json".into(),
    ]);
    let o = analyze(&a, &[("LLAMA_ATTN_ROT_DISABLE", "1")]);
    let j = json(&o);
    assert_eq!(code(&o), 1);
    assert_eq!(
        j["total_comparisons"].as_u64(),
        Some(rt.tensors.len() as u64)
    );
    assert!(j["not_comparable"].as_array().unwrap().is_empty());
    assert_eq!(
        j["type_mismatches"].as_u64(),
        Some(2 * rt.groups().len() as u64),
        "k and v per group"
    );
    let k = j["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["role"] == "k")
        .unwrap();
    assert_eq!(
        (k["reference_type"].as_str(), k["current_type"].as_str()),
        (Some("f16"), Some("q8_0"))
    );
}

#[test]
fn a_planted_difference_is_the_first_failure() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path(), 16);
    let r = dir.path().join("ref.gguf");
    let t = reference(&m, &r, &[]);
    // Copy the trace with one element of kqv_out (layer 1, step 1) moved by 1e-3.
    let target = t.find(Role::KqvOut, 1, 1).unwrap().index;
    let planted = dir.path().join("planted.gguf");
    // Every tensor whole (the version-2 trace materialized: there `attn` is stored as
    // the same bytes as `kqv_out`, and would move with it).
    let f = GgufFile::from_bytes(trace_format::materialize::full_bytes(&r).unwrap()).unwrap();
    let spec = HeaderSpec::from_header(f.header());
    let elem = 5usize;
    gguf_io::write_file(&planted, &spec, |w| {
        for (i, info) in f.tensors().iter().enumerate() {
            let mut data = f.tensor_data(info).to_vec();
            if i == target {
                let at = elem * 4;
                let v = f32::from_le_bytes(data[at..at + 4].try_into().unwrap()) + 1e-3;
                data[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            w.write_tensor(&data)?;
        }
        Ok(())
    })
    .unwrap();
    let o = offline(&r, &planted, &["--json"]);
    assert_eq!(code(&o), 1);
    let j = json(&o);
    let failing: Vec<&Value> = j["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["within"] == false)
        .collect();
    assert_eq!(failing.len(), 1, "{failing:?}");
    let c = failing[0];
    assert_eq!(
        (c["role"].as_str(), c["layer"].as_i64(), c["step"].as_u64()),
        (Some("kqv_out"), Some(1), Some(1))
    );
    assert_eq!(j["first_failure"]["step"], 1);
    assert_eq!(j["first_failure"]["layer"], 1);
    assert_eq!(c["worst_abs"]["flat_index"].as_u64(), Some(elem as u64));
    assert_eq!(c["metrics"]["mismatches"].as_u64(), Some(1));
    // Element 5 of kqv_out [D*H, T]: head 5 / 16 = 0, dim 5, token 0 (step 1 = position 13).
    assert_eq!(c["worst_abs"]["head"], 0);
    assert_eq!(c["worst_abs"]["dim"], 5);
    assert_eq!(c["worst_abs"]["position"], t.steps[1].positions[0]);
    let text_out = text(&offline(&r, &planted, &[]).stdout);
    assert!(
        text_out.contains("First out of tolerance: step 1, layer 1 (kqv_out)"),
        "{text_out}"
    );
    assert!(
        text_out.contains("--- Tensors exceeding tolerance ---\n  kqv_out_kqv_out-1_step_1: abs="),
        "{text_out}"
    );
    // One failing element of 64 passes with --max-mismatch 2 (%), not with 1.
    assert_eq!(code(&offline(&r, &planted, &["--max-mismatch", "2"])), 0);
    assert_eq!(code(&offline(&r, &planted, &["--max-mismatch", "1"])), 1);
    // ... and with --tolerance-mode mean only if 1e-3/64 <= abs.
    assert_eq!(
        code(&offline(
            &r,
            &planted,
            &[
                "--tolerance-mode",
                "mean",
                "--tolerance-abs",
                "2e-5",
                "--tolerance-rel",
                "1"
            ]
        )),
        0
    );
    assert_eq!(
        code(&offline(
            &r,
            &planted,
            &[
                "--tolerance-mode",
                "mean",
                "--tolerance-abs",
                "1e-5",
                "--tolerance-rel",
                "1"
            ]
        )),
        1
    );
    // --plot draws the heatmap with the failing cell marked.
    let svg = dir.path().join("where.svg");
    let o = offline(&r, &planted, &["--plot", svg.to_str().unwrap()]);
    assert_eq!(code(&o), 1);
    let s = std::fs::read_to_string(&svg).unwrap();
    assert!(s.starts_with("<svg"), "{}", &s[..100.min(s.len())]);
    assert_eq!(crate::plot::marked_cells(&s), 1, "one marked cell");
}

#[test]
fn mismatched_inputs_and_usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path(), 16);
    let r = dir.path().join("ref.gguf");
    reference(&m, &r, &[]);
    // A different prompt: refused from the metadata, before any number.
    let mut a: Vec<String> = [
        "-m",
        m.to_str().unwrap(),
        "-p",
        "Hello there",
        "-n",
        "2",
        "-t",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(["--reference".into(), r.display().to_string()]);
    // Replaying (the default), the prompt given must be the reference's.
    let e = input_error(&analyze(&a, &[]));
    assert!(
        e.contains("the prompt given tokenizes to") && e.contains("leave out -p"),
        "{e}"
    );
    // Without replay the run metadata says so.
    a.push("--no-replay".into());
    let e = input_error(&analyze(&a, &[]));
    assert!(e.contains("different prompt") && e.contains("-p/-f"), "{e}");
    // A model of another shape (3 layers): refused.
    let m3 = dir.path().join("tiny-3-layers.gguf");
    let cfg = tiny_llama::TinyLlamaConfig {
        n_layer: 3,
        ..Default::default()
    };
    tiny_llama::write_model(&m3, &cfg).unwrap();
    let e = input_error(&live(&m3, &r, &[], &[]));
    assert!(
        e.contains("different model") && e.contains(&format!("use -m {}", m.display())),
        "{e}"
    );
    // Another model file of the same architecture and head counts (head_dim 32): said
    // before the numbers, then its tensors differ in shape.
    let m2 = model(dir.path(), 32);
    let o = live(&m2, &r, &[], &[]);
    let out = text(&o.stdout);
    assert_eq!(code(&o), 1, "{out}");
    assert!(out.contains("the model file differs"), "{out}");
    assert!(out.contains("shape mismatch: reference"), "{out}");
    // Files and flags.
    let e = input_error(&offline(&dir.path().join("missing.gguf"), &r, &[]));
    assert!(e.contains("missing.gguf"), "{e}");
    let e = input_error(&offline(&r, &m, &[]));
    assert!(e.contains("not a kv-cache-monitor trace"), "{e}");
    let e = input_error(&offline(&r, &r, &["--tolerance-abs", "x"]));
    assert!(e.contains("--tolerance-abs") && e.contains("--help"), "{e}");
    let e = input_error(&analyze(&["-m".into(), "x.gguf".into()], &[]));
    assert!(e.contains("--reference FILE is required"), "{e}");
    // A run that compares nothing is an error: different layers.
    let l0 = dir.path().join("l0.gguf");
    let l1 = dir.path().join("l1.gguf");
    reference(&m, &l0, &["--layer", "0"]);
    reference(&m, &l1, &["--layer", "1"]);
    let mut a = vec![
        "--reference".to_string(),
        l0.display().to_string(),
        "--current".into(),
        l1.display().to_string(),
    ];
    let e = input_error(&analyze(&a, &[]));
    assert!(e.contains("nothing was compared"), "{e}");
    a.extend(["--layer".into(), "1".into()]);
    let e = input_error(&analyze(&a, &[]));
    assert!(e.contains("nothing was compared"), "{e}");
    // --help and --version.
    let o = analyze(&["--help".into()], &[]);
    assert_eq!(code(&o), 0);
    assert!(text(&o.stdout).contains("EXIT CODES"));
}

#[test]
fn unmatched_tensors_are_listed_and_fail() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path(), 16);
    let r = dir.path().join("ref.gguf");
    let rt = reference(&m, &r, &[]);
    // Three generated tokens against a reference of two: step 3 has no counterpart (not
    // replayed: a replay decodes at most the reference's steps).
    let o = live(&m, &r, &["-n", "3"], &["--json", "--no-replay"]);
    assert_eq!(code(&o), 1, "{}", text(&o.stderr));
    let j = json(&o);
    let un = j["unmatched"].as_array().unwrap();
    let per_step = rt.tensors.iter().filter(|t| t.meta.step == 1).count();
    assert_eq!(un.len(), per_step, "{un:?}");
    assert!(un.iter().all(|u| u["side"] == "current" && u["step"] == 3));
    assert_eq!(j["within_tolerance"], j["total_comparisons"]);
    // The reference's own layer filter applies when --layer is not given.
    let l0 = dir.path().join("l0.gguf");
    let t0 = reference(&m, &l0, &["--layer", "0"]);
    let o = live(&m, &l0, &[], &[]);
    assert_eq!(code(&o), 0, "{}", text(&o.stdout));
    assert!(text(&o.stdout).contains(&format!("Total comparisons: {}\n", t0.tensors.len())));
}

/// The monitor's `--verify` would pass through its parser and be silently ignored here:
/// refused with a usage error instead, offline and live, before any file is read.
#[test]
fn the_monitors_verify_flag_is_a_usage_error() {
    let offline: Vec<String> = ["--reference", "a.gguf", "--current", "b.gguf", "--verify"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let live: Vec<String> = [
        "-m",
        "m.gguf",
        "-p",
        "Hi",
        "--verify",
        "--reference",
        "a.gguf",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for a in [offline, live] {
        let e = input_error(&analyze(&a, &[]));
        assert!(
            e.contains("--verify is a kqv-trace-monitor option") && e.contains("--help"),
            "{e}"
        );
    }
}

/// Issue 15: a model whose cache llama.cpp does not rotate, compared f16 against q8_0:
/// head size 32 (llama.cpp rotates multiples of 64 only), and head size 64 with
/// `LLAMA_ATTN_ROT_DISABLE=1.0` (llama.cpp's `atoi` reads 1, so it does not rotate,
/// where a rule that parses the variable as an integer guessed "rotated"). The trace
/// records no rotation in any layer, and every `kqv_out` is compared, live and offline,
/// and reported outside the tolerance with its q8_0 error (NMSE recomputed here from the
/// files); nothing is skipped.
#[test]
fn an_unrotated_q8_0_cache_compares_kqv_out() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let q8 = ["-fa", "on", "-ctk", "q8_0", "-ctv", "q8_0"];
    for (head_dim, env) in [(32, None), (64, Some("1.0"))] {
        let m = model(d, head_dim);
        let r = d.join(format!("f16-{head_dim}.gguf"));
        let rt = reference(&m, &r, &["-fa", "on"]);
        let saved = d.join(format!("q8-{head_dim}.gguf"));
        let mut a = llama_args(&m, &q8);
        a.extend([
            "--reference".into(),
            r.display().to_string(),
            "--save-gguf".into(),
            saved.display().to_string(),
            "--json".into(),
        ]);
        let envs: Vec<(&str, &str)> = env
            .map(|v| ("LLAMA_ATTN_ROT_DISABLE", v))
            .into_iter()
            .collect();
        let live_run = analyze(&a, &envs);
        let ct = TraceFile::open(&saved).unwrap();
        assert!(!ct.run.kv_rotation, "head {head_dim}");
        assert_eq!(ct.run.rotated_k_layers, [Some(false), Some(false)]);
        assert_eq!(ct.run.rotated_v_layers, [Some(false), Some(false)]);
        let n_kqv = rt
            .tensors
            .iter()
            .filter(|t| t.meta.role == Role::KqvOut)
            .count();
        for o in [live_run, offline(&r, &saved, &["--json"])] {
            assert_eq!(code(&o), 1, "head {head_dim}: {}", text(&o.stderr));
            let j = json(&o);
            assert!(j["not_comparable"].as_array().unwrap().is_empty(), "{j}");
            assert_eq!(j["skipped"]["total"], 0);
            assert_eq!(
                j["total_comparisons"].as_u64(),
                Some(rt.tensors.len() as u64)
            );
            let outs: Vec<&Value> = j["tensors"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|c| c["role"] == "kqv_out" && c["reference_role"] == "kqv_out")
                .collect();
            assert_eq!(outs.len(), n_kqv);
            for c in outs {
                let (layer, step) = (
                    c["layer"].as_i64().unwrap() as i32,
                    c["step"].as_u64().unwrap() as u32,
                );
                let expect = nmse(
                    &ct,
                    ct.find(Role::KqvOut, layer, step).unwrap(),
                    &rt,
                    rt.find(Role::KqvOut, layer, step).unwrap(),
                );
                let got = f64_of(&c["metrics"]["nmse"]);
                assert!((got - expect).abs() <= 1e-9 * expect, "{got} vs {expect}");
                assert!(got > 1e-8 && got < 1e-2, "{got}");
                assert_eq!(c["within"], false);
            }
        }
        let o = offline(&r, &saved, &[]);
        let out = text(&o.stdout);
        assert!(
            out.contains(&format!("Compared {}, skipped 0\n", rt.tensors.len())),
            "{out}"
        );
        assert!(!out.contains("rotation"), "{out}");
    }
}
