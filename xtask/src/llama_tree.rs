//! Preparing `vendor/llama.cpp` from the source pin in `vendor/pin`.
//!
//! 1. `cargo fetch --locked` the pin package, so the crates.io package
//!    `llama-cpp-sys-2` (exact version in vendor/pin/Cargo.lock) is in the
//!    cargo registry cache;
//! 2. `cargo metadata` tells where that package was unpacked;
//! 3. its `llama.cpp/` subset (see [`COPIED`]) is copied to a temporary
//!    directory, `vendor/patches/*.patch` are applied in name order with
//!    `git apply`, a stamp is written, and the directory is renamed to
//!    `vendor/llama.cpp`.
//!
//! The stamp records the package version and the SHA-256 of every patch. When
//! the existing tree's stamp matches, nothing is done (idempotent); otherwise
//! the tree is rebuilt from scratch, so patches never get applied twice.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::util::{self, Result};

/// The crates.io package that carries the llama.cpp source.
const PACKAGE: &str = "llama-cpp-sys-2";

/// What is copied out of the package's `llama.cpp/` directory.
const COPIED: &[&str] = &["ggml", "src", "include", "common", "vendor", "LICENSE"];

/// Written last into the tree; `crates/ggml-trace-sys/build.rs` checks for it and
/// reruns when it changes. Keep the name in sync with build.rs.
pub const STAMP: &str = ".kcm-tree-stamp";

pub fn prepare(force: bool) -> Result {
    let root = util::workspace_root();
    let dest = root.join("vendor/llama.cpp");
    let (version, src) = locate_pinned_source(&root)?;
    let patches = list_patches(&root.join("vendor/patches"))?;
    let stamp = stamp_text(&version, &patches)?;

    if !force && fs::read_to_string(dest.join(STAMP)).ok().as_deref() == Some(stamp.as_str()) {
        eprintln!(
            "xtask: vendor/llama.cpp is up to date ({PACKAGE} {version}, {} patch(es))",
            patches.len()
        );
        return Ok(());
    }

    // Staging directory: git-ignored (like vendor/llama.cpp) and on the same
    // file system, so a failed run leaves nothing committable behind and the
    // final rename is atomic.
    let tmp = root.join("vendor/pin/target/llama.cpp.tmp");
    remove_dir(&tmp)?;
    eprintln!("xtask: copying {} -> vendor/llama.cpp", src.display());
    for name in COPIED {
        copy_recursively(&src.join(name), &tmp.join(name))?;
    }
    for patch in &patches {
        apply_patch(&root, &tmp, patch)?;
    }
    fs::write(tmp.join(STAMP), &stamp).map_err(|e| format!("cannot write the stamp: {e}"))?;
    remove_dir(&dest)?;
    fs::rename(&tmp, &dest)
        .map_err(|e| format!("cannot rename {} to {}: {e}", tmp.display(), dest.display()))?;
    eprintln!(
        "xtask: vendor/llama.cpp ready ({PACKAGE} {version}, {} patch(es))",
        patches.len()
    );
    Ok(())
}

/// Fetches the pin and returns the package version and its `llama.cpp/` directory.
pub fn locate_pinned_source(root: &Path) -> Result<(String, PathBuf)> {
    let manifest = root.join("vendor/pin/Cargo.toml");
    util::run(
        util::cargo()
            .arg("fetch")
            .arg("--locked")
            .arg("--manifest-path")
            .arg(&manifest),
    )?;
    let json = util::output(
        util::cargo()
            .args([
                "metadata",
                "--locked",
                "--format-version",
                "1",
                "--manifest-path",
            ])
            .arg(&manifest),
    )?;
    let meta: serde_json::Value = serde_json::from_slice(&json)
        .map_err(|e| format!("cannot parse `cargo metadata` output: {e}"))?;
    let pkg = meta["packages"]
        .as_array()
        .and_then(|pkgs| pkgs.iter().find(|p| p["name"] == PACKAGE))
        .ok_or_else(|| format!("`cargo metadata` lists no {PACKAGE} package"))?;
    let version = pkg["version"]
        .as_str()
        .ok_or("package without a version")?
        .to_string();
    let manifest_path = pkg["manifest_path"]
        .as_str()
        .ok_or("package without a manifest_path")?;
    let src = Path::new(manifest_path)
        .parent()
        .ok_or("manifest_path has no parent")?
        .join("llama.cpp");
    if !src.join("ggml").is_dir() {
        return Err(format!("{} has no ggml/ directory", src.display()));
    }
    Ok((version, src))
}

/// `vendor/patches/*.patch`, sorted by file name (apply order).
fn list_patches(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut patches = Vec::new();
    if dir.is_dir() {
        for entry in fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))? {
            let path = entry.map_err(|e| e.to_string())?.path();
            if path.extension().is_some_and(|ext| ext == "patch") {
                patches.push(path);
            }
        }
    }
    patches.sort();
    Ok(patches)
}

fn stamp_text(version: &str, patches: &[PathBuf]) -> Result<String> {
    Ok(format!("{PACKAGE} {version}\n{}", patch_lines(patches)?))
}

/// `patch NAME sha256:HEX` for each patch.
fn patch_lines(patches: &[PathBuf]) -> Result<String> {
    let mut text = String::new();
    for patch in patches {
        let bytes = fs::read(patch).map_err(|e| format!("cannot read {}: {e}", patch.display()))?;
        let digest = Sha256::digest(&bytes);
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        let name = patch.file_name().unwrap_or_default().to_string_lossy();
        text.push_str(&format!("patch {name} sha256:{hex}\n"));
    }
    Ok(text)
}

/// `git apply` with paths relative to the llama.cpp root. It runs from the
/// workspace root with `--directory`, which works both inside our git
/// checkout (where git resolves patch paths from the top of the work tree)
/// and outside any repository.
fn apply_patch(root: &Path, tree: &Path, patch: &Path) -> Result {
    let rel = tree
        .strip_prefix(root)
        .map_err(|_| "tree outside the workspace".to_string())?;
    eprintln!("xtask: applying {}", patch.display());
    util::run(
        Command::new("git")
            .current_dir(root)
            .arg("apply")
            .arg(format!("--directory={}", rel.display()))
            .arg(patch),
    )
}

fn copy_recursively(from: &Path, to: &Path) -> Result {
    let meta = fs::metadata(from).map_err(|e| format!("cannot read {}: {e}", from.display()))?;
    if meta.is_dir() {
        fs::create_dir_all(to).map_err(|e| format!("cannot create {}: {e}", to.display()))?;
        for entry in
            fs::read_dir(from).map_err(|e| format!("cannot list {}: {e}", from.display()))?
        {
            let entry = entry.map_err(|e| e.to_string())?;
            copy_recursively(&entry.path(), &to.join(entry.file_name()))?;
        }
    } else {
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        fs::copy(from, to).map_err(|e| format!("cannot copy {}: {e}", from.display()))?;
    }
    Ok(())
}

fn remove_dir(dir: &Path) -> Result {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot remove {}: {e}", dir.display())),
    }
}

/// `cargo xtask build-llama --llama-src PATH [--with-patches]`: the tree to build.
///
/// Without patches that is PATH itself (canonicalized): the build only reads it. With
/// `--with-patches`, a copy of PATH's sources is staged in `target/kcm-trees/` and our
/// patches are applied there one by one, each after `git apply --check`; if one does not
/// apply, the copy is staged again without any patch and the build goes on without them.
/// The user's tree is never written to.
pub fn stage_external(src: &Path, with_patches: bool) -> Result<PathBuf> {
    let src = src
        .canonicalize()
        .map_err(|e| format!("--llama-src {}: {e}", src.display()))?;
    for needed in ["ggml/include/ggml.h", "include/llama.h", "src", "common"] {
        if !src.join(needed).exists() {
            return Err(format!(
                "--llama-src {}: not a llama.cpp source tree (no {needed})",
                src.display()
            ));
        }
    }
    if !with_patches {
        return Ok(src);
    }
    let root = util::workspace_root();
    let (origin, build_number) = describe_checkout(&src);
    let name = src
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "tree".into());
    let mut hash = Sha256::new();
    hash.update(src.as_os_str().as_encoded_bytes());
    let key: String = hash.finalize()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let dest = root.join(format!("target/kcm-trees/{name}-{key}"));
    let tmp = root.join(format!("target/kcm-trees/{name}-{key}.tmp"));

    let patches = list_patches(&root.join("vendor/patches"))?;
    let stage = |apply: bool| -> Result<Option<String>> {
        remove_dir(&tmp)?;
        for sub in COPIED {
            if src.join(sub).exists() {
                copy_recursively(&src.join(sub), &tmp.join(sub))?;
            }
        }
        if !apply {
            return Ok(None);
        }
        for patch in &patches {
            if !check_patch(&root, &tmp, patch)? {
                return Ok(Some(
                    patch
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned(),
                ));
            }
            apply_patch(&root, &tmp, patch)?;
        }
        Ok(None)
    };
    eprintln!("xtask: staging {} -> {}", src.display(), dest.display());
    let mut stamp = match stage(true)? {
        None => format!(
            "origin {origin} + kv-cache-monitor patches\n{}",
            patch_lines(&patches)?
        ),
        Some(failed) => {
            eprintln!(
                "xtask: vendor/patches/{failed} does not apply to {}; building without our patches",
                src.display()
            );
            stage(false)?;
            format!("origin {origin}\nunpatched: {failed} does not apply\n")
        }
    };
    stamp.push_str(&format!(
        "build-number {build_number}\nsource {}\n",
        src.display()
    ));
    // The top-level CMakeLists.txt is not staged; its version goes into the stamp.
    if let Some(version) = llama_version(&src) {
        stamp.push_str(&format!("llama-version {version}\n"));
    }
    fs::write(tmp.join(STAMP), &stamp).map_err(|e| format!("cannot write the stamp: {e}"))?;
    remove_dir(&dest)?;
    fs::rename(&tmp, &dest)
        .map_err(|e| format!("cannot rename {} to {}: {e}", tmp.display(), dest.display()))?;
    Ok(dest)
}

/// `git apply --check` of `patch` against `tree` (see [`apply_patch`] for the paths).
fn check_patch(root: &Path, tree: &Path, patch: &Path) -> Result<bool> {
    let rel = tree
        .strip_prefix(root)
        .map_err(|_| "tree outside the workspace".to_string())?;
    let out = Command::new("git")
        .current_dir(root)
        .arg("apply")
        .arg("--check")
        .arg(format!("--directory={}", rel.display()))
        .arg(patch)
        .output()
        .map_err(|e| format!("cannot run git apply --check: {e}"))?;
    Ok(out.status.success())
}

/// (`git <describe>`, build number) of a checkout whose top level is `tree`
/// (`git describe --tags --always --dirty`, `git rev-list --count HEAD`), else
/// ("tree <last two path components> (not a git checkout)", 0). Same rule as
/// crates/ggml-trace-sys/build.rs.
pub fn describe_checkout(tree: &Path) -> (String, u64) {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(tree)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let top = git(&["rev-parse", "--show-toplevel"]).map(PathBuf::from);
    if top.and_then(|t| t.canonicalize().ok()).as_deref() != Some(tree) {
        // Same wording as build.rs's `unversioned`.
        let parts: Vec<String> = tree
            .components()
            .rev()
            .take(shown_components(tree))
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        let shown: Vec<&str> = parts.iter().rev().map(String::as_str).collect();
        return (format!("tree {} (not a git checkout)", shown.join("/")), 0);
    }
    let origin = git(&["describe", "--tags", "--always", "--dirty"])
        .map(|d| format!("git {d}"))
        .unwrap_or_else(|| "unknown".into());
    let number = git(&["rev-list", "--count", "HEAD"])
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    (origin, number)
}

/// Stages a copy of `src`'s sources as `target/kcm-trees/<name>` with `patches` applied
/// (each must apply: a test tree, not a user's), and a stamp recording `origin`.
///
/// `full`: copy all of `src` (a tree for cmake: CMakeLists.txt, cmake/, ...), not only the
/// sources the `cc` build reads, and keep an existing copy whose stamp is the same (so that
/// a cmake build of it stays current).
pub fn stage_test_tree(
    src: &Path,
    name: &str,
    patches: &[PathBuf],
    origin: &str,
    full: bool,
) -> Result<PathBuf> {
    let root = util::workspace_root();
    let dest = root.join("target/kcm-trees").join(name);
    let tmp = root.join("target/kcm-trees").join(format!("{name}.tmp"));
    let stamp = format!("origin {origin}\nbuild-number 0\n{}", patch_lines(patches)?);
    if full && fs::read_to_string(dest.join(STAMP)).ok().as_deref() == Some(stamp.as_str()) {
        eprintln!("xtask: {} is up to date", dest.display());
        return Ok(dest);
    }
    remove_dir(&tmp)?;
    if full {
        copy_recursively(src, &tmp)?;
    } else {
        for sub in COPIED {
            if src.join(sub).exists() {
                copy_recursively(&src.join(sub), &tmp.join(sub))?;
            }
        }
    }
    for patch in patches {
        if !check_patch(&root, &tmp, patch)? {
            return Err(format!(
                "{} does not apply to {}",
                patch.display(),
                src.display()
            ));
        }
        apply_patch(&root, &tmp, patch)?;
    }
    fs::write(tmp.join(STAMP), stamp).map_err(|e| format!("cannot write the stamp: {e}"))?;
    remove_dir(&dest)?;
    fs::rename(&tmp, &dest)
        .map_err(|e| format!("cannot rename {} to {}: {e}", tmp.display(), dest.display()))?;
    Ok(dest)
}

/// The patches in `dir` (`*.patch`, name order).
pub fn patches_in(dir: &Path) -> Result<Vec<PathBuf>> {
    list_patches(dir)
}

/// llama.cpp's version as its top-level CMakeLists.txt sets it
/// (`LLAMA_VERSION_{MAJOR,MINOR,PATCH}`, `-dev` while `LLAMA_BUILD_IS_DEV` defaults to ON),
/// or `None` without that file. Same rule as crates/ggml-trace-sys/build/generated.rs.
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

/// How many trailing path components name a tree that is not a git checkout: two
/// (`<parent>/<name>`), three when the parent is `vendor` (a source package's
/// `<package>/vendor/llama.cpp`, e.g. llama-cpp-python's).
fn shown_components(tree: &Path) -> usize {
    let parent = tree.parent().and_then(|p| p.file_name());
    if parent.is_some_and(|n| n == "vendor") {
        3
    } else {
        2
    }
}
