//! The seed README's example workflows, run as written with the installed `llama-*`
//! names (model paths swapped for generated tiny models), after `cargo xtask install`.
//!
//! One test, because the install is the expensive part and every workflow needs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives below the workspace root")
        .to_path_buf()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn show(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        text(&o.stdout),
        text(&o.stderr)
    )
}

/// Runs a command in `dir`, returning its output.
fn run_in(dir: &Path, program: &Path, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()))
}

fn expect_code(o: &Output, code: i32, what: &str) -> String {
    assert_eq!(o.status.code(), Some(code), "{what}:\n{}", show(o));
    text(&o.stdout)
}

/// `cargo xtask install --prefix DIR --debug` (the dev profile the tests already built).
fn install(prefix: &Path) -> Output {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    Command::new(cargo)
        .args([
            "run", "--quiet", "-p", "xtask", "--", "install", "--debug", "--prefix",
        ])
        .arg(prefix)
        .current_dir(workspace_root())
        .output()
        .expect("cannot run cargo")
}

/// The summary's "Tensors within tolerance: n/m" counts.
fn within(summary: &str) -> (u64, u64) {
    let line = summary
        .lines()
        .find(|l| l.starts_with("Tensors within tolerance:"))
        .unwrap_or_else(|| panic!("no summary line in:\n{summary}"));
    let frac = line
        .split_whitespace()
        .nth(3)
        .unwrap_or_else(|| panic!("bad line {line}"));
    let (n, m) = frac.split_once('/').expect("n/m");
    (n.parse().expect("n"), m.parse().expect("m"))
}

#[test]
fn install_then_the_seed_workflows_as_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let prefix = d.join("prefix");

    // --- install: both names, runnable, versions name the pinned llama.cpp
    let o = install(&prefix);
    assert!(o.status.success(), "install failed:\n{}", show(&o));
    let bin = prefix.join("bin");
    for (name, alias) in [
        ("kqv-trace-monitor", "llama-kqv-trace-monitor"),
        ("gguf-reader", "llama-kqv-gguf-reader"),
        ("tensor-diff-analyzer", "llama-tensor-diff-analyzer"),
    ] {
        let real = bin.join(name);
        assert!(real.is_file(), "{} missing", real.display());
        let link = std::fs::read_link(bin.join(alias)).expect("alias is a symlink");
        assert_eq!(
            link,
            Path::new(name),
            "{alias} points at {}",
            link.display()
        );
        let v = expect_code(&run_in(d, &bin.join(alias), &["--version"]), 0, alias);
        assert!(v.starts_with(name), "{alias} --version: {v}");
    }
    // Installing again over the old files works (upgrade in place).
    let o = install(&prefix);
    assert!(o.status.success(), "second install failed:\n{}", show(&o));

    let monitor = bin.join("llama-kqv-trace-monitor");
    let reader = bin.join("llama-kqv-gguf-reader");
    let analyzer = bin.join("llama-tensor-diff-analyzer");

    // Models: 32-dim heads so q4_0 caches are allowed; v2 has other weights.
    let cfg = tiny_llama::TinyLlamaConfig {
        head_dim: 32,
        n_embd: 128,
        ..tiny_llama::TinyLlamaConfig::default()
    };
    tiny_llama::write_model(d.join("model.gguf"), &cfg).expect("model");
    tiny_llama::write_model(d.join("model_v1.gguf"), &cfg).expect("model_v1");
    let v2 = tiny_llama::TinyLlamaConfig {
        seed: cfg.seed + 1,
        ..cfg.clone()
    };
    tiny_llama::write_model(d.join("model_v2.gguf"), &v2).expect("model_v2");

    // --- Workflow 1: basic tensor saving and inspection
    let out = expect_code(
        &run_in(
            d,
            &monitor,
            &[
                "-m",
                "model.gguf",
                "-n",
                "4",
                "-p",
                "Hello, world",
                "-ngl",
                "0",
                "-ctk",
                "q4_0",
                "-ctv",
                "q4_0",
                "-fa",
                "-t",
                "12",
                "--layer",
                "0",
                "--save-gguf",
                "reference_tensors.gguf",
            ],
        ),
        0,
        "workflow 1: save reference tensors",
    );
    assert!(out.contains("kqv_out-0"), "{out}");
    assert!(
        !out.contains("kqv_out-1"),
        "--layer 0 traced layer 1:\n{out}"
    );
    let shown = expect_code(
        &run_in(d, &reader, &["reference_tensors.gguf", "--show-data"]),
        0,
        "workflow 1: inspect",
    );
    assert!(shown.contains("kqv_out_kqv_out-0_step_0"), "{shown}");
    assert!(
        shown.contains("q4_0"),
        "the q4_0 cache views are listed:\n{shown}"
    );

    // --- Workflow 2: tensor difference analysis, baseline vs another model (as written:
    // default sampling, so generation may also diverge; the summary says so)
    expect_code(
        &run_in(
            d,
            &monitor,
            &[
                "-m",
                "model_v1.gguf",
                "-n",
                "4",
                "-p",
                "Hello, world",
                "--layer",
                "0",
                "--save-gguf",
                "baseline_tensors.gguf",
            ],
        ),
        0,
        "workflow 2: baseline",
    );
    let other = run_in(
        d,
        &analyzer,
        &[
            "-m",
            "model_v2.gguf",
            "-n",
            "4",
            "-p",
            "Hello, world",
            "--reference",
            "baseline_tensors.gguf",
            "--layer",
            "0",
        ],
    );
    let other_out = expect_code(&other, 1, "workflow 2 with model_v2");
    assert!(
        other_out.contains("=== TENSOR DIFFERENCE ANALYSIS SUMMARY ==="),
        "{other_out}"
    );
    let (n, m) = within(&other_out);
    assert!(m > 0 && n < m, "model_v2 must differ: {n}/{m}\n{other_out}");
    assert!(
        other_out.contains("--- Tensors exceeding tolerance ---"),
        "{other_out}"
    );
    // The same workflow with greedy sampling on both sides and the same model: every
    // tensor within the default tolerances, exit 0.
    expect_code(
        &run_in(
            d,
            &monitor,
            &[
                "-m",
                "model_v1.gguf",
                "-n",
                "4",
                "-p",
                "Hello, world",
                "--layer",
                "0",
                "--temp",
                "0",
                "--save-gguf",
                "greedy_baseline.gguf",
            ],
        ),
        0,
        "workflow 2: greedy baseline",
    );
    let same = expect_code(
        &run_in(
            d,
            &analyzer,
            &[
                "-m",
                "model_v1.gguf",
                "-n",
                "4",
                "-p",
                "Hello, world",
                "--temp",
                "0",
                "--reference",
                "greedy_baseline.gguf",
                "--layer",
                "0",
            ],
        ),
        0,
        "workflow 2, same model, greedy",
    );
    let (n, m) = within(&same);
    assert!(m > 0 && n == m, "same model: {n}/{m}\n{same}");

    // --- Workflow 3: model validation, golden F16 reference vs a q4_0 cache
    expect_code(
        &run_in(
            d,
            &monitor,
            &[
                "-m",
                "model.gguf",
                "-p",
                "Test prompt",
                "-ctk",
                "f16",
                "-ctv",
                "f16",
                "--save-gguf",
                "golden_reference.gguf",
            ],
        ),
        0,
        "workflow 3: golden reference",
    );
    let q4 = run_in(
        d,
        &analyzer,
        &[
            "-m",
            "model.gguf",
            "-p",
            "Test prompt",
            "-ctk",
            "q4_0",
            "-ctv",
            "q4_0",
            "--reference",
            "golden_reference.gguf",
            "--tolerance-abs",
            "1e-3",
        ],
    );
    let q4_out = text(&q4.stdout);
    let (n, m) = within(&q4_out);
    assert!(m > 0, "{}", show(&q4));
    // The exit code agrees with the verdict printed: q4_0 quantization error is far
    // above 1e-3 somewhere in a 32-dim head.
    assert_eq!(q4.status.code(), Some(1), "{}", show(&q4));
    assert!(n < m, "{q4_out}");
}
