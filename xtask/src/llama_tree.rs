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
fn locate_pinned_source(root: &Path) -> Result<(String, PathBuf)> {
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
    let mut text = format!("{PACKAGE} {version}\n");
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
