//! A compile cache shared by every build of this crate in one target dir.
//!
//! Cargo gives each build-script run its own OUT_DIR, and `cargo clippy`,
//! `cargo build` and `cargo build --release` each get a different one. Since
//! llama.cpp is always compiled the same way (-O3, no debug info, whatever the
//! profile), that would mean one 10-minute compile per command. Instead the
//! cache lives in `<target-dir>/kcm-llama/`, at two levels (build/compile.rs):
//!
//! - objects, one file at a time: `obj/<lib>/<key>-<stem>.o`, where the key covers
//!   the source (path and content) and what every file of its library shares (the
//!   headers of its include directories by content, its extra inputs, its full
//!   compiler command line: CPU flags, CC/CFLAGS, KCM_LLAMA_DEBUG... all count).
//!   Editing one kernel recompiles that file only; editing a header recompiles the
//!   libraries that can see it.
//! - archives: `<lib>-<hash of its object keys>/lib<lib>.a`, re-archived (seconds)
//!   whenever one of its objects changes.
//!
//! A cold build therefore needs both `cargo clean -p ggml-trace-sys` and
//! `rm -rf <target-dir>/kcm-llama` (or a plain `cargo clean`).

use std::fs;
use std::path::{Path, PathBuf};

pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// `<target-dir>/kcm-llama`, found from OUT_DIR
    /// (`<target-dir>/[<triple>/]<profile>/build/<pkg>-<hash>/out`); with an
    /// unexpected layout, a private directory inside OUT_DIR (no sharing).
    pub fn new(out_dir: &Path) -> Cache {
        let shared = out_dir
            .ancestors()
            .nth(2)
            .filter(|build| build.file_name().is_some_and(|n| n == "build"))
            .and_then(|build| build.parent())
            .and_then(|profile| profile.parent())
            .map(|target| target.join("kcm-llama"));
        Cache {
            root: shared.unwrap_or_else(|| out_dir.join("kcm-llama")),
        }
    }

    /// `<target-dir>/kcm-llama` (or the private fallback).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory for generated sources, named after their content.
    pub fn generated_dir(&self, files: &[(String, String)]) -> PathBuf {
        let mut h = Fnv::new();
        for (name, text) in files {
            h.field(name.as_bytes());
            h.field(text.as_bytes());
        }
        self.root.join(format!("gen-{}", h.hex()))
    }

    /// Returns the directory for `key`, calling `build(dir)` to fill a fresh
    /// one first when there is none. The directory only appears once `build` returned
    /// (it is renamed into place), so an interrupted build is never reused.
    pub fn get_or_build(&self, key: &str, build: impl FnOnce(&Path)) -> PathBuf {
        let done = self.root.join(key);
        if done.join(COMPLETE).is_file() {
            return done;
        }
        self.remove_abandoned(key);
        let tmp = self.root.join(format!("{key}.tmp{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).unwrap_or_else(|e| panic!("cannot create {}: {e}", tmp.display()));
        build(&tmp);
        fs::write(tmp.join(COMPLETE), key).expect("write the completion marker");
        let _ = fs::remove_dir_all(&done);
        if fs::rename(&tmp, &done).is_err() && done.join(COMPLETE).is_file() {
            // Someone else finished the same fingerprint first.
            let _ = fs::remove_dir_all(&tmp);
        }
        done
    }

    /// Removes `<key>.tmp<pid>` directories left by build scripts that were
    /// killed (their process no longer exists).
    fn remove_abandoned(&self, key: &str) {
        let prefix = format!("{key}.tmp");
        let Ok(entries) = fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix(&prefix) else {
                continue;
            };
            if !Path::new("/proc").join(pid).exists() {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Marker file written last into a finished entry.
pub const COMPLETE: &str = "complete";

fn collect_files(dir: &Path, exts: &[&str], out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            collect_files(&path, exts, out);
        } else if kind.is_file()
            && path
                .extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| exts.contains(&x))
        {
            out.push(path);
        }
    }
}

/// FNV-1a (64 bit): a stable hash with no dependency. Fields are
/// length-prefixed so that concatenations cannot collide.
pub struct Fnv(u64);

impl Fnv {
    pub fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn bytes(&mut self, data: &[u8]) {
        for &b in data {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub fn field(&mut self, data: &[u8]) {
        self.bytes(&(data.len() as u64).to_le_bytes());
        self.bytes(data);
    }

    /// Every file under `dir` (recursively) whose extension is one of
    /// `exts`, by path relative to `dir` and content, in sorted order.
    pub fn tree_files_with_extensions(&mut self, dir: &Path, exts: &[&str]) {
        let mut files = Vec::new();
        collect_files(dir, exts, &mut files);
        files.sort();
        for file in files {
            let rel = file.strip_prefix(dir).unwrap_or(&file);
            self.field(rel.as_os_str().as_encoded_bytes());
            self.field(&fs::read(&file).unwrap_or_default());
        }
    }

    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}
