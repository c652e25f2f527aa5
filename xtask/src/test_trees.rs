//! `cargo xtask test-trees`: build the tools against llama.cpp trees other than the pin and
//! check that they trace and verify (issue 18).
//!
//! - **fork**: the pinned tree (vendor/llama.cpp, with our patches) plus
//!   `vendor/test-patches/*.patch`, which insert a new op before `GGML_OP_FLASH_ATTN_EXT`
//!   (every later op code moves up by one). The tools are built against it with
//!   `KCM_LLAMA_SRC`; the tiny model is traced with flash attention on and off and with F16
//!   and q8_0 caches (V stays F16 without flash attention, as llama.cpp requires), and
//!   every trace verified with `gguf-reader --verify-attention`;
//!   ggml-trace-sys's tests of the generated op codes (against the fork's `ggml_op_name`),
//!   the layout guard and the build info run against it too.
//! - **guard**: the same fork with a member added to `struct ggml_tensor`: the build must
//!   fail in its build script, before compiling anything, with the one line naming the
//!   moved field and `cargo xtask bindgen --llama-src`.
//!
//! - **staging**: `--with-patches` on the pinned package's unpatched tree gives exactly
//!   vendor/llama.cpp; on an already patched tree it names patch 0001 and stages the tree
//!   without patches (no build).
//!
//! Build times are printed (wall clock; the machine may be busy).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use crate::build_llama::{self, SRC_ENV};
use crate::demo;
use crate::llama_tree;
use crate::util::{self, Result};

const FORK: &str = "fork-insert-op";

pub fn run(mut args: pico_args::Arguments) -> Result {
    let only: Option<String> = args
        .opt_value_from_str("--only")
        .map_err(|e| format!("--only: {e}"))?;
    util::no_more_args(args)?;
    let (fork, guard, staging) = match only.as_deref() {
        None => (true, true, true),
        Some("fork") => (true, false, false),
        Some("guard") => (false, true, false),
        Some("staging") => (false, false, true),
        Some(other) => {
            return Err(format!(
                "--only: unknown `{other}` (fork, guard or staging)"
            ))
        }
    };
    let root = util::workspace_root();
    llama_tree::prepare(false)?;
    let pinned = root.join("vendor/llama.cpp");
    let patches = llama_tree::patches_in(&root.join("vendor/test-patches"))?;
    if patches.is_empty() {
        return Err("vendor/test-patches has no *.patch".into());
    }
    let tree = llama_tree::stage_test_tree(
        &pinned,
        FORK,
        &patches,
        "llama-cpp-sys-2 0.1.161 + kv-cache-monitor patches + test fork (new op before FLASH_ATTN_EXT)",
    )?;
    let mut report = Vec::new();
    if staging {
        report.extend(staging_test(&root)?);
    }
    if guard {
        report.push(guard_test(&tree)?);
    }
    if fork {
        report.extend(fork_test(&tree)?);
    }
    eprintln!("\nxtask test-trees: all passed");
    for line in report {
        eprintln!("  {line}");
    }
    Ok(())
}

/// `--with-patches` staging, without building: the pinned package's unpatched tree (in the
/// cargo registry) plus our patches must equal vendor/llama.cpp file for file; the already
/// patched vendor/llama.cpp must be staged unpatched, the stamp naming patch 0001.
fn staging_test(root: &Path) -> Result<Vec<String>> {
    let (_, pristine) = llama_tree::locate_pinned_source(root)?;
    eprintln!("\n== staging: {} --with-patches", pristine.display());
    let staged = llama_tree::stage_external(&pristine, true)?;
    let stamp = std::fs::read_to_string(staged.join(llama_tree::STAMP)).unwrap_or_default();
    if !stamp.contains("+ kv-cache-monitor patches") {
        return Err(format!(
            "staging: patches not applied to {}:\n{stamp}",
            staged.display()
        ));
    }
    let vendor = root.join("vendor/llama.cpp");
    let same = Command::new("diff")
        .args(["-r", "-q", "-x", llama_tree::STAMP])
        .arg(&vendor)
        .arg(&staged)
        .status()
        .map_err(|e| format!("cannot run diff: {e}"))?;
    if !same.success() {
        return Err(format!(
            "staging: {} differs from vendor/llama.cpp",
            staged.display()
        ));
    }
    eprintln!("\n== staging: vendor/llama.cpp (already patched) --with-patches");
    let unpatched = llama_tree::stage_external(&vendor, true)?;
    let stamp = std::fs::read_to_string(unpatched.join(llama_tree::STAMP)).unwrap_or_default();
    if !stamp.contains("unpatched: 0001-") {
        return Err(format!(
            "staging: expected patch 0001 to be refused for {}:\n{stamp}",
            unpatched.display()
        ));
    }
    for dir in [&staged, &unpatched] {
        std::fs::remove_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    Ok(vec![
        "staging: the pinned package's tree + our patches, staged, equals vendor/llama.cpp".into(),
        "staging: an already patched tree is staged unpatched, patch 0001 named".into(),
    ])
}

/// The fork with `int32_t kcm_fork_field;` after `enum ggml_op op;` in `struct ggml_tensor`:
/// `cargo build -p ggml-trace-sys` must fail with the guard's one line.
fn guard_test(fork: &Path) -> Result<String> {
    let bad = fork.with_file_name(format!("{FORK}-layout"));
    let _ = std::fs::remove_dir_all(&bad);
    util::run(Command::new("cp").arg("-r").arg(fork).arg(&bad))?;
    let ggml_h = bad.join("ggml/include/ggml.h");
    let text =
        std::fs::read_to_string(&ggml_h).map_err(|e| format!("{}: {e}", ggml_h.display()))?;
    let changed = text.replacen(
        "        enum ggml_op op;\n",
        "        enum ggml_op op;\n        int32_t kcm_fork_field;\n",
        1,
    );
    if changed == text {
        return Err(format!(
            "{}: `enum ggml_op op;` not found",
            ggml_h.display()
        ));
    }
    std::fs::write(&ggml_h, changed).map_err(|e| format!("{}: {e}", ggml_h.display()))?;

    eprintln!(
        "\n== guard: build against {} (ggml_tensor has a new member)",
        bad.display()
    );
    let start = Instant::now();
    let out = util::cargo()
        .args(["build", "-p", "ggml-trace-sys"])
        .env(SRC_ENV, &bad)
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    let secs = start.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .map(str::trim)
        .find(|l| l.contains("does not match the committed bindings"))
        .map(str::to_string);
    match (out.status.success(), line) {
        (false, Some(line))
            if line.contains("ggml_tensor::op_params is not at offset 84")
                && line.contains("cargo xtask bindgen --llama-src") =>
        {
            eprintln!("{line}");
            std::fs::remove_dir_all(&bad).map_err(|e| format!("{}: {e}", bad.display()))?;
            Ok(format!("guard: the build failed in {secs:.1} s with: {line}"))
        }
        (ok, _) => Err(format!(
            "guard: expected the build to fail with the layout guard's line (success: {ok}); stderr:\n{stderr}"
        )),
    }
}

/// Builds the tools against the fork and traces + verifies the tiny model.
fn fork_test(fork: &Path) -> Result<Vec<String>> {
    let mut report = Vec::new();
    eprintln!("\n== fork: build ggml-trace-sys against {}", fork.display());
    let start = Instant::now();
    build_llama::build_tree(Some(fork), false)?;
    report.push(format!(
        "fork: ggml-trace-sys (llama.cpp) built in {:.0} s",
        start.elapsed().as_secs_f64()
    ));
    // Everything below (cargo builds, the tools) sees the fork.
    std::env::set_var(SRC_ENV, fork);
    let start = Instant::now();
    demo::build_tools(false)?;
    report.push(format!(
        "fork: the tools built in {:.0} s",
        start.elapsed().as_secs_f64()
    ));

    // ggml-trace-sys's own tests on the fork: generated op codes against ggml_op_name,
    // the layout guard, the build info.
    let start = Instant::now();
    let tests = util::output(util::cargo().args([
        "test",
        "-p",
        "ggml-trace-sys",
        "--test",
        "it",
        "--",
        "tree_enums",
        "layout_guard",
        "llama_ffi",
        "--nocapture",
    ]))?;
    let tests = String::from_utf8_lossy(&tests);
    print!("{tests}");
    for line in tests.lines() {
        if line.contains("would be misread") || line.starts_with("test result:") {
            report.push(format!("fork: ggml-trace-sys tests: {}", line.trim()));
        }
    }
    report.push(format!(
        "fork: ggml-trace-sys tests built and ran in {:.0} s",
        start.elapsed().as_secs_f64()
    ));

    let bin = util::target_dir().join("debug");
    let out = util::target_dir().join("test-trees").join(FORK);
    std::fs::create_dir_all(&out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let version = util::output(Command::new(bin.join("kqv-trace-monitor")).arg("--version"))?;
    let version = String::from_utf8_lossy(&version).trim().to_string();
    eprintln!("{version}");
    if !version.contains("test fork") {
        return Err(format!("--version does not name the fork: {version}"));
    }
    report.push(format!(
        "fork: kqv-trace-monitor --version: {}",
        version.replace('\n', " | ")
    ));

    let model = out.join("tiny-llama.gguf");
    step(
        Command::new(bin.join("examples/write_tiny_llama"))
            .arg(&model)
            .args(["--head-dim", "32"]),
    )?;
    // llama.cpp quantizes the V cache only with flash attention: -fa off keeps V in F16.
    for (fa, ctk, ctv) in [
        ("on", "f16", "f16"),
        ("on", "q8_0", "q8_0"),
        ("off", "f16", "f16"),
        ("off", "q8_0", "f16"),
    ] {
        let trace = out.join(format!("trace-fa-{fa}-k-{ctk}-v-{ctv}.gguf"));
        step(
            Command::new(bin.join("kqv-trace-monitor"))
                .arg("-m")
                .arg(&model)
                .args(["-p", "Hello", "-n", "4", "--temp", "0", "-fa", fa])
                .args(["-ctk", ctk, "-ctv", ctv])
                .arg("--save-gguf")
                .arg(&trace),
        )?;
        let verdict = util::output(
            Command::new(bin.join("gguf-reader"))
                .arg(&trace)
                .arg("--verify-attention"),
        )?;
        let verdict = String::from_utf8_lossy(&verdict);
        print!("{verdict}");
        let ops: std::collections::BTreeSet<&str> = verdict
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() > 3 && f[0].parse::<u32>().is_ok() && f.last() == Some(&"ok"))
                    .then(|| f[2])
            })
            .collect();
        let last = verdict
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        report.push(format!(
            "fork: -fa {fa} -ctk {ctk} -ctv {ctv}: {} (op: {})",
            last.trim(),
            ops.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    Ok(report)
}

fn step(cmd: &mut Command) -> Result {
    let line: Vec<String> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| util::shell_quote(&a.to_string_lossy()))
        .collect();
    eprintln!("$ {}", line.join(" "));
    util::run(cmd)
}
