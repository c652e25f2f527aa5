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
//! - **lcp**: llama-cpp-python 0.3.36's `vendor/llama.cpp` (an older upstream than the pin),
//!   downloaded once (`curl`, SHA-256 checked) and unpacked under `target/`, built as it is
//!   (our patches apply to it but do not compile there): the build detects no mixed KV
//!   cache, `--version` must say so, `--mixed-kv-cache` must be refused in one line with
//!   exit 2, and the tiny model and gemma-3-270m are traced and verified like the fork.
//!
//! - **cmake**: the pinned package's complete llama.cpp tree (CMakeLists.txt, cmake/, which
//!   vendor/llama.cpp lacks) plus our patches, staged in `target/kcm-trees/cmake-pinned`,
//!   configured and built with cmake (the system's, else PyPI `cmake` in
//!   `target/cmake-venv`) twice: shared and static libraries, `-j2`. For each, the tools are
//!   linked against it (`KCM_LLAMA_BUILD`), `--version` must name the cmake build, the tiny
//!   model and gemma-3-270m are traced and verified like the fork (and the tiny model with
//!   the mixed KV cache), and all of ggml-trace-sys's tests run against it.
//!
//! Build times are printed (wall clock; the machine may be busy).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use crate::build_llama::{self, SRC_ENV};
use crate::cmake_plan::BUILD_ENV;
use crate::demo;
use crate::llama_tree;
use crate::util::{self, Result};

const FORK: &str = "fork-insert-op";

/// The llama-cpp-python source package whose `vendor/llama.cpp` is the "different upstream
/// version" test tree (an older llama.cpp than the pin).
const LCP_VERSION: &str = "0.3.36";
const LCP_URL: &str = "https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-0.3.36.tar.gz";
const LCP_SHA256: &str = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e";

/// `target/kcm-trees/src/llama_cpp_python-0.3.36/vendor/llama.cpp`, downloaded once (76.6 MB,
/// `curl`, SHA-256 checked) into `target/downloads/` and unpacked once.
pub fn lcp_source() -> Result<std::path::PathBuf> {
    let target = util::target_dir();
    let name = format!("llama_cpp_python-{LCP_VERSION}");
    let tarball = target.join("downloads").join(format!("{name}.tar.gz"));
    if !tarball.exists() || sha256_hex(&tarball)? != LCP_SHA256 {
        let dir = tarball.parent().expect("has a parent");
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let tmp = tarball.with_extension("gz.part");
        eprintln!("xtask: downloading {LCP_URL} (76.6 MB)");
        util::run(
            Command::new("curl")
                .args(["-fL", "--retry", "3", "-o"])
                .arg(&tmp)
                .arg(LCP_URL),
        )?;
        let got = sha256_hex(&tmp)?;
        if got != LCP_SHA256 {
            let _ = std::fs::remove_file(&tmp);
            return Err(format!("{LCP_URL}: sha256 {got}, expected {LCP_SHA256}"));
        }
        std::fs::rename(&tmp, &tarball).map_err(|e| format!("{}: {e}", tarball.display()))?;
    }
    let unpacked = target.join("kcm-trees/src");
    let tree = unpacked.join(&name).join("vendor/llama.cpp");
    let marker = unpacked.join(format!("{name}.unpacked"));
    if std::fs::read_to_string(&marker).ok().as_deref() != Some(LCP_SHA256) {
        let _ = std::fs::remove_dir_all(unpacked.join(&name));
        std::fs::create_dir_all(&unpacked)
            .map_err(|e| format!("cannot create {}: {e}", unpacked.display()))?;
        eprintln!("xtask: unpacking {name}/vendor/llama.cpp");
        util::run(
            Command::new("tar")
                .arg("xzf")
                .arg(&tarball)
                .arg("-C")
                .arg(&unpacked)
                .arg(format!("{name}/vendor/llama.cpp")),
        )?;
        std::fs::write(&marker, LCP_SHA256)
            .map_err(|e| format!("cannot write {}: {e}", marker.display()))?;
    }
    Ok(tree)
}

fn sha256_hex(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut file =
        std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    Ok(hash.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

pub fn run(mut args: pico_args::Arguments) -> Result {
    let only: Option<String> = args
        .opt_value_from_str("--only")
        .map_err(|e| format!("--only: {e}"))?;
    util::no_more_args(args)?;
    let all_cmake: &[&str] = &["shared", "static"];
    let (fork, guard, staging, lcp, cmake) = match only.as_deref() {
        None => (true, true, true, true, all_cmake),
        Some("fork") => (true, false, false, false, &[][..]),
        Some("guard") => (false, true, false, false, &[][..]),
        Some("staging") => (false, false, true, false, &[][..]),
        Some("lcp") => (false, false, false, true, &[][..]),
        Some("cmake") => (false, false, false, false, all_cmake),
        Some("cmake-shared") => (false, false, false, false, &["shared"][..]),
        Some("cmake-static") => (false, false, false, false, &["static"][..]),
        Some(other) => {
            return Err(format!(
                "--only: unknown `{other}` (fork, guard, staging, lcp, cmake, cmake-shared or cmake-static)"
            ))
        }
    };
    let root = util::workspace_root();
    let mut report = Vec::new();
    if lcp {
        report.extend(lcp_test()?);
    }
    if !cmake.is_empty() {
        report.extend(cmake_test(&root, cmake)?);
    }
    if fork || guard || staging {
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
            false,
        )?;
        if staging {
            report.extend(staging_test(&root)?);
        }
        if guard {
            report.push(guard_test(&tree)?);
        }
        if fork {
            report.extend(tree_test("fork", &tree, None, "test fork", false, true)?);
        }
    }
    eprintln!("\nxtask test-trees: all passed");
    for line in report {
        eprintln!("  {line}");
    }
    Ok(())
}

/// The llama-cpp-python tree as it is, without our patches: they apply to it
/// (`git apply --check`) but the patched tree does not compile (the patches use members
/// the older tree lacks: `n_rot_k`/`n_rot_v` in llama-kv-cache.cpp, `mixed_n_cold` in
/// llama-graph.cpp), so it is built without the mixed KV cache. The build detects that,
/// `--version` must say `features: no mixed-kv-cache`, `--mixed-kv-cache` must be refused
/// in one line with exit 2, and the tiny model and gemma-3-270m trace and verify.
fn lcp_test() -> Result<Vec<String>> {
    let start = Instant::now();
    let src = lcp_source()?;
    let tree = llama_tree::stage_external(&src, false)?;
    let mut report = vec![format!(
        "lcp: llama-cpp-python {LCP_VERSION} vendor/llama.cpp fetched and unpacked in {:.0} s (built as it is, without our patches)",
        start.elapsed().as_secs_f64()
    )];
    report.extend(tree_test(
        "lcp",
        &tree,
        None,
        "llama_cpp_python-0.3.36",
        true,
        false,
    )?);
    Ok(report)
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

/// Builds the tools against `tree` (`label` in the report; `--version` must contain
/// `version_tag`) and traces + verifies the tiny model (and gemma-3-270m with `gemma`).
/// `cmake`: the cmake build of `tree` to link (`KCM_LLAMA_BUILD`; then all of
/// ggml-trace-sys's tests run, else those that depend on the tree).
/// `mixed`: whether the tree has our mixed KV cache (then a mixed trace is verified too;
/// else `--mixed-kv-cache` must be refused in one line with exit 2).
fn tree_test(
    label: &str,
    tree: &Path,
    cmake: Option<&Path>,
    version_tag: &str,
    gemma: bool,
    mixed: bool,
) -> Result<Vec<String>> {
    let mut report = Vec::new();
    eprintln!(
        "\n== {label}: build ggml-trace-sys against {}",
        tree.display()
    );
    let start = Instant::now();
    build_llama::build_tree(Some(tree), cmake, false)?;
    report.push(format!(
        "{label}: ggml-trace-sys ({}) built in {:.0} s",
        if cmake.is_some() {
            "shim only, linking the cmake build"
        } else {
            "llama.cpp"
        },
        start.elapsed().as_secs_f64()
    ));
    // Everything below (cargo builds, the tools) sees the tree (and the cmake build).
    std::env::set_var(SRC_ENV, tree);
    match cmake {
        Some(b) => std::env::set_var(BUILD_ENV, b),
        None => std::env::remove_var(BUILD_ENV),
    }
    let start = Instant::now();
    demo::build_tools(false)?;
    report.push(format!(
        "{label}: the tools built in {:.0} s",
        start.elapsed().as_secs_f64()
    ));

    let bin = util::target_dir().join("debug");
    let out = util::target_dir().join("test-trees").join(label);
    std::fs::create_dir_all(&out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let version = util::output(Command::new(bin.join("kqv-trace-monitor")).arg("--version"))?;
    let version = String::from_utf8_lossy(&version).trim().to_string();
    eprintln!("{version}");
    if !version.contains(version_tag) {
        return Err(format!(
            "--version does not name the tree ({version_tag}): {version}"
        ));
    }
    report.push(format!(
        "{label}: kqv-trace-monitor --version: {}",
        version.replace('\n', " | ")
    ));

    let features = if mixed {
        "features: mixed-kv-cache"
    } else {
        "features: no mixed-kv-cache"
    };
    if !version.contains(features) {
        return Err(format!("--version should say `{features}`: {version}"));
    }

    let tiny = out.join("tiny-llama.gguf");
    step(
        Command::new(bin.join("examples/write_tiny_llama"))
            .arg(&tiny)
            .args(["--head-dim", "32"]),
    )?;
    let mut models = vec![("tiny", tiny.clone())];
    if gemma {
        models.push(("gemma-3-270m", crate::fetch_model::gemma()?));
    }
    // Traces `model` with `args`, verifies every traced attention with gguf-reader and
    // returns the report line: the verdict's last line and the attention ops verified.
    let trace_verify =
        |model_name: &str, model: &Path, name: &str, args: &[&str]| -> Result<String> {
            let trace = out.join(format!("trace-{model_name}-{name}.gguf"));
            step(
                Command::new(bin.join("kqv-trace-monitor"))
                    .arg("-m")
                    .arg(model)
                    .args(["-p", "Hello", "-n", "4", "--temp", "0"])
                    .args(args)
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
            Ok(format!(
                "{label}: {model_name} {}: {} (op: {})",
                args.join(" "),
                last.trim(),
                ops.into_iter().collect::<Vec<_>>().join(", ")
            ))
        };
    // llama.cpp quantizes the V cache only with flash attention: -fa off keeps V in F16.
    for (model_name, model) in &models {
        for (fa, ctk, ctv) in [
            ("on", "f16", "f16"),
            ("on", "q8_0", "q8_0"),
            ("off", "f16", "f16"),
            ("off", "q8_0", "f16"),
        ] {
            report.push(trace_verify(
                model_name,
                model,
                &format!("fa-{fa}-k-{ctk}-v-{ctv}"),
                &["-fa", fa, "-ctk", ctk, "-ctv", ctv],
            )?);
        }
    }
    if mixed {
        // The mixed KV cache on this tree: a hot window of 16 cells, the rest q8_0.
        let prompt = "Hello world, this is a longer prompt. ".repeat(8);
        let trace = out.join("trace-tiny-mixed.gguf");
        step(
            Command::new(bin.join("kqv-trace-monitor"))
                .arg("-m")
                .arg(&tiny)
                .args(["-p", &prompt, "-n", "4", "--temp", "0"])
                .args(["--mixed-kv-cache", "--mixed-hot-window", "16"])
                .args(["--mixed-cold-type", "q8_0"])
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
        let last = verdict
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        report.push(format!(
            "{label}: tiny --mixed-kv-cache --mixed-hot-window 16 --mixed-cold-type q8_0: {}",
            last.trim()
        ));
    } else {
        // Without the mixed KV cache its option is refused in one line, exit 2.
        let out = Command::new(bin.join("kqv-trace-monitor"))
            .arg("-m")
            .arg(&tiny)
            .args(["-p", "Hello", "-n", "1", "--mixed-kv-cache"])
            .output()
            .map_err(|e| format!("cannot run kqv-trace-monitor: {e}"))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        if out.status.code() != Some(2)
            || lines.len() != 1
            || !lines[0].contains("has no mixed KV cache")
        {
            return Err(format!(
                "--mixed-kv-cache on a tree without it: expected exit 2 and one line, got {:?}:\n{stderr}",
                out.status.code()
            ));
        }
        report.push(format!(
            "{label}: --mixed-kv-cache refused, exit 2: {}",
            lines[0]
        ));
    }
    // After the traces, so that their results come first on a busy machine.
    // ggml-trace-sys's own tests on the fork: generated op codes against ggml_op_name,
    // the layout guard, the build info.
    let start = Instant::now();
    let args: &[&str] = if cmake.is_some() {
        // Linked against another build of llama.cpp: every test of the crate.
        &["test", "-p", "ggml-trace-sys", "--", "--nocapture"]
    } else {
        &[
            "test",
            "-p",
            "ggml-trace-sys",
            "--test",
            "it",
            "--",
            "tree_enums",
            "layout_guard",
            "llama_ffi",
            "mixed",
            "source_lists",
            "--nocapture",
        ]
    };
    let tests = util::output(util::cargo().args(args))?;
    let tests = String::from_utf8_lossy(&tests);
    print!("{tests}");
    for line in tests.lines() {
        if line.contains("would be misread")
            || line.starts_with("test result:")
            || line.starts_with("source lists:")
        {
            report.push(format!("{label}: ggml-trace-sys tests: {}", line.trim()));
        }
    }
    if label == "fork" && !tests.contains("kcm-fork-test.cpp") {
        return Err(
            "fork: ggml-cpu/kcm-fork-test.cpp (listed only in the fork's CMake list) is not in the build's source list"
                .into(),
        );
    }
    report.push(format!(
        "{label}: ggml-trace-sys tests built and ran in {:.0} s",
        start.elapsed().as_secs_f64()
    ));

    Ok(report)
}

/// PyPI's `cmake`, pinned, installed in `target/cmake-venv` when the system has none.
const CMAKE_PYPI: &str = "cmake==4.4.5";

/// cmake's options for the test builds: the CPU and RPC backends (as the `cc` build), no
/// OpenSSL/network, no tests, examples, server, tools or app (only the libraries the
/// tools link).
const CMAKE_OPTIONS: &[&str] = &[
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_RPC=ON",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_APP=OFF",
];

/// `cmake` on PATH, else `target/cmake-venv/bin/cmake` (made with pip when missing).
fn cmake_binary() -> Result<std::path::PathBuf> {
    let works = |cmd: &Path| {
        Command::new(cmd)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works(Path::new("cmake")) {
        return Ok("cmake".into());
    }
    let venv = util::target_dir().join("cmake-venv");
    let cmake = venv.join("bin/cmake");
    if !works(&cmake) {
        eprintln!(
            "xtask: no cmake on PATH; installing PyPI {CMAKE_PYPI} in {}",
            venv.display()
        );
        util::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        util::run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", CMAKE_PYPI]))?;
    }
    Ok(cmake)
}

/// The pinned package's complete tree plus our patches, built with cmake as shared and/or
/// as static libraries (`kinds`); the tools linked against each and checked by
/// [`tree_test`].
fn cmake_test(root: &Path, kinds: &[&str]) -> Result<Vec<String>> {
    let (version, pristine) = llama_tree::locate_pinned_source(root)?;
    let patches = llama_tree::patches_in(&root.join("vendor/patches"))?;
    let tree = llama_tree::stage_test_tree(
        &pristine,
        "cmake-pinned",
        &patches,
        &format!("llama-cpp-sys-2 {version} + kv-cache-monitor patches (complete tree, for cmake)"),
        true,
    )?;
    let cmake = cmake_binary()?;
    let trees = tree.parent().expect("under target/kcm-trees").to_path_buf();
    let mut report = Vec::new();
    for &kind in kinds {
        let shared = if kind == "shared" { "ON" } else { "OFF" };
        let build = trees.join(format!("cmake-build-{kind}"));
        eprintln!("\n== cmake-{kind}: configure and build {}", build.display());
        let start = Instant::now();
        // cmake's git lookups (build info) must not find this repository.
        step(
            Command::new(&cmake)
                .env("GIT_CEILING_DIRECTORIES", &trees)
                .arg("-S")
                .arg(&tree)
                .arg("-B")
                .arg(&build)
                .arg(format!("-DBUILD_SHARED_LIBS={shared}"))
                .args(CMAKE_OPTIONS),
        )?;
        step(
            Command::new(&cmake)
                .env("GIT_CEILING_DIRECTORIES", &trees)
                .arg("--build")
                .arg(&build)
                .arg("-j2"),
        )?;
        report.push(format!(
            "cmake-{kind}: cmake configure + build ({kind} libraries, -j2) took {:.0} s (a no-op when already built)",
            start.elapsed().as_secs_f64()
        ));
        let rustflags = std::env::var_os("RUSTFLAGS");
        let (src, plan) = build_llama::cmake_env(&build, Some(&tree))?;
        let tag = format!("cmake build at {} ({})", plan.build.display(), plan.kind());
        let result = tree_test(
            &format!("cmake-{kind}"),
            &src,
            Some(&plan.build),
            &tag,
            true,
            true,
        );
        match rustflags {
            Some(v) => std::env::set_var("RUSTFLAGS", v),
            None => std::env::remove_var("RUSTFLAGS"),
        }
        std::env::remove_var(BUILD_ENV);
        report.extend(result?);
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
