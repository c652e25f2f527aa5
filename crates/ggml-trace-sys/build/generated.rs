//! Files cmake would generate: version headers and common's build-info.cpp (from the
//! tree's own `*.in` templates, `configure_file`'s `@VAR@` substitution), and
//! the unity-build batches for src/models/*.cpp.

use std::fs;
use std::path::{Path, PathBuf};

/// The pin's version: its top-level CMakeLists.txt (not copied into vendor/llama.cpp)
/// says 0.6.0 with LLAMA_BUILD_IS_DEV=ON. Update together with the pin. Other trees'
/// versions come from their stamp or their own CMakeLists.txt ([`llama_version`]).
pub const PINNED_LLAMA_VERSION: &str = "0.6.0-dev";

/// Upstream builds src/models/*.cpp with CMake's UNITY_BUILD, batch size 16
/// (src/CMakeLists.txt). We do the same: ~10 translation units instead of
/// ~160, each of which would otherwise parse the heavy llama headers.
const UNITY_BATCH: usize = 16;

pub struct Generated {
    /// Include directory with ggml-version.h and llama-version.h.
    pub include_dir: PathBuf,
    pub build_info_cpp: PathBuf,
    pub unity_models: Vec<PathBuf>,
}

/// The generated files' names and contents. `origin` is the tree's description
/// (`llama-cpp-sys-2 0.1.161` for the pin, `git describe` output for a checkout) and
/// stands in for the commit; `build_number` is llama.cpp's build number (0 if unknown).
pub fn render(
    tree: &Path,
    llama_version: &str,
    origin: &str,
    build_number: u64,
) -> Vec<(String, String)> {
    let ggml_version = ggml_version(tree);
    let build_number = build_number.to_string();
    let target = std::env::var("TARGET").unwrap_or_default();
    let vars: &[(&str, &str)] = &[
        ("GGML_VERSION", &ggml_version),
        ("GGML_BUILD_COMMIT", origin),
        ("LLAMA_VERSION", llama_version),
        ("LLAMA_BUILD_COMMIT", origin),
        ("LLAMA_BUILD_NUMBER", &build_number),
        ("BUILD_COMPILER", "cc-rs (kv-cache-monitor ggml-trace)"),
        ("BUILD_TARGET", &target),
    ];
    let mut files = vec![
        (
            "ggml-version.h".to_string(),
            configure(tree, "ggml/src/ggml-version.h.in", vars, || {
                "#pragma once\n#define GGML_VERSION \"@GGML_VERSION@\"\n#define GGML_COMMIT  \"@GGML_BUILD_COMMIT@\"\n".into()
            }),
        ),
        (
            "llama-version.h".to_string(),
            configure(tree, "src/llama-version.h.in", vars, || {
                "#pragma once\n#define LLAMA_VERSION \"@LLAMA_VERSION@\"\n#define LLAMA_COMMIT  \"@LLAMA_BUILD_COMMIT@\"\n".into()
            }),
        ),
        (
            "build-info.cpp".to_string(),
            configure(tree, "common/build-info.cpp.in", vars, || {
                crate::fail(&format!(
                    "{}: no common/build-info.cpp.in: not a llama.cpp tree this build knows",
                    tree.display()
                ))
            }),
        ),
    ];
    files.extend(unity_batches(&tree.join("src/models")));
    files
}

/// Writes `files` into `dir`.
pub fn write_all(files: &[(String, String)], dir: &Path) -> Generated {
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    for (name, text) in files {
        write(&dir.join(name), text);
    }
    Generated {
        include_dir: dir.to_path_buf(),
        build_info_cpp: dir.join("build-info.cpp"),
        unity_models: files
            .iter()
            .filter(|(name, _)| name.starts_with(UNITY_PREFIX))
            .map(|(name, _)| dir.join(name))
            .collect(),
    }
}

fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// llama.cpp's version from the tree's top-level CMakeLists.txt
/// (`set(LLAMA_VERSION_{MAJOR,MINOR,PATCH} N)`, `-dev` while `LLAMA_BUILD_IS_DEV` defaults
/// to ON), `None` without that file (vendor/llama.cpp and staged copies, which carry the
/// version in their stamp instead). Same rule as xtask's `llama_tree::llama_version`.
pub fn llama_version(tree: &Path) -> Option<String> {
    let text = fs::read_to_string(tree.join("CMakeLists.txt")).ok()?;
    let part = |name: &str| {
        let prefix = format!("set(LLAMA_VERSION_{name} ");
        text.lines().find_map(|l| {
            l.trim()
                .strip_prefix(&prefix)
                .map(|v| v.trim_end_matches(')').trim().to_string())
        })
    };
    let base = format!("{}.{}.{}", part("MAJOR")?, part("MINOR")?, part("PATCH")?);
    let dev = text.contains("option(LLAMA_BUILD_IS_DEV \"llama: dev build\" ON)");
    Some(if dev { format!("{base}-dev") } else { base })
}

/// "MAJOR.MINOR.PATCH" from the `set(GGML_VERSION_*)` lines of ggml/CMakeLists.txt.
fn ggml_version(tree: &Path) -> String {
    let text = fs::read_to_string(tree.join("ggml/CMakeLists.txt")).unwrap_or_default();
    let part = |name: &str| {
        let prefix = format!("set(GGML_VERSION_{name} ");
        text.lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix(&prefix)
                    .map(|v| v.trim_end_matches(')').trim().to_string())
            })
            .unwrap_or_else(|| "0".to_string())
    };
    format!("{}.{}.{}", part("MAJOR"), part("MINOR"), part("PATCH"))
}

/// The tree's template `rel` (a CMake `configure_file` input) with its `@NAME@` variables
/// replaced from `vars`, as CMake does; `fallback()` when the tree has no such template
/// (older trees wrote some of these headers differently). A variable we do not know is
/// replaced by nothing, as CMake does, and named in a build warning.
fn configure(
    tree: &Path,
    rel: &str,
    vars: &[(&str, &str)],
    fallback: impl FnOnce() -> String,
) -> String {
    let template = fs::read_to_string(tree.join(rel)).unwrap_or_else(|_| fallback());
    let (text, unknown) = crate::cmake_lists::substitute(&template, vars);
    if !unknown.is_empty() {
        println!(
            "cargo:warning=kcm: {rel}: no value for {} (left empty, as CMake does)",
            unknown.join(", ")
        );
    }
    text
}

const UNITY_PREFIX: &str = "unity_models_";

/// unity_models_N.cpp, each #including up to UNITY_BATCH model sources in
/// sorted order (the batches CMake would form), as `models/<name>.cpp`
/// (found through llama's `src/` include directory).
fn unity_batches(models_dir: &Path) -> Vec<(String, String)> {
    let models = crate::sources::cpp_files(models_dir);
    models
        .chunks(UNITY_BATCH)
        .enumerate()
        .map(|(i, chunk)| {
            let body: String = chunk
                .iter()
                .map(|p| {
                    let name = p.file_name().unwrap_or_default().to_string_lossy();
                    // Relative to src/ (on llama's include path), so the
                    // generated files do not depend on where the tree lives.
                    format!("#include \"models/{name}\"\n")
                })
                .collect();
            (format!("{UNITY_PREFIX}{i}.cpp"), body)
        })
        .collect()
}
