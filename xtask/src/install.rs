//! `cargo xtask install --prefix DIR [--debug]`: the binaries under `DIR/bin`, the
//! three tools each also under the `llama-*` name the seed's scripts call, and
//! `kcm-rpc-server` (no alias: it is not llama.cpp's `rpc-server`).

use std::fs;
use std::path::{Path, PathBuf};

use crate::build_llama;
use crate::util::{self, Result};

/// (installed name, llama.cpp-style alias).
pub const NAMES: [(&str, &str); 3] = [
    ("kqv-trace-monitor", "llama-kqv-trace-monitor"),
    ("gguf-reader", "llama-kqv-gguf-reader"),
    ("tensor-diff-analyzer", "llama-tensor-diff-analyzer"),
];

/// Installed under their own name only.
pub const UNALIASED: [&str; 1] = ["kcm-rpc-server"];

pub fn run(mut args: pico_args::Arguments) -> Result {
    let prefix: PathBuf = args
        .value_from_os_str("--prefix", |s| Ok::<_, String>(PathBuf::from(s)))
        .map_err(|e| format!("--prefix DIR is required ({e})"))?;
    let debug = args.contains("--debug");
    util::no_more_args(args)?;
    let release = !debug;

    build_llama::build(release, false)?;
    let mut cmd = util::cargo();
    cmd.arg("build");
    if release {
        cmd.arg("--release");
    }
    for p in util::BINARY_PACKAGES {
        cmd.args(["-p", p]);
    }
    cmd.arg("--bins");
    util::run(&mut cmd)?;

    let built = util::target_dir().join(if release { "release" } else { "debug" });
    let bin = prefix.join("bin");
    fs::create_dir_all(&bin).map_err(|e| format!("cannot create {}: {e}", bin.display()))?;
    for (name, alias) in NAMES {
        install_file(&built.join(name), &bin.join(name))?;
        link(name, &bin.join(alias))?;
        println!("{}", bin.join(name).display());
        println!("{} -> {name}", bin.join(alias).display());
    }
    for name in UNALIASED {
        install_file(&built.join(name), &bin.join(name))?;
        println!("{}", bin.join(name).display());
    }
    Ok(())
}

/// Copies to a temporary name beside `dest`, then renames: a running copy of
/// the old binary keeps working and an interrupted install leaves no half file.
fn install_file(src: &Path, dest: &Path) -> Result {
    let tmp = dest.with_extension("kcm-install-tmp");
    fs::copy(src, &tmp)
        .map_err(|e| format!("cannot copy {} to {}: {e}", src.display(), tmp.display()))?;
    fs::rename(&tmp, dest).map_err(|e| format!("cannot install {}: {e}", dest.display()))
}

/// A relative symbolic link `alias -> target` (replacing an existing entry).
fn link(target: &str, alias: &Path) -> Result {
    match fs::symlink_metadata(alias) {
        Ok(_) => fs::remove_file(alias)
            .map_err(|e| format!("cannot replace {}: {e}", alias.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot inspect {}: {e}", alias.display())),
    }
    std::os::unix::fs::symlink(target, alias)
        .map_err(|e| format!("cannot link {} -> {target}: {e}", alias.display()))
}
