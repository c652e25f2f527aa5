//! Turning a [`Library`] into a static archive with the `cc` crate.

use std::path::{Path, PathBuf};

/// `KCM_LLAMA_DEBUG=1` compiles llama.cpp with `-g` (off by default: debug
/// info makes the objects several times larger and the build slower).
pub const DEBUG_ENV: &str = "KCM_LLAMA_DEBUG";

#[derive(Debug, Default)]
pub struct Library {
    pub name: &'static str,
    pub c: Vec<PathBuf>,
    pub cpp: Vec<PathBuf>,
    pub includes: Vec<PathBuf>,
    pub defines: Vec<(&'static str, Option<&'static str>)>,
    /// Target-feature flags (ggml-cpu only).
    pub arch_flags: Vec<String>,
    /// Append `-mno-amx-*` (ggml-cpu only; see build/cpu.rs).
    pub no_amx: bool,
}

impl Library {
    pub fn new(name: &'static str) -> Library {
        Library {
            name,
            ..Library::default()
        }
    }

    /// Adds `dir/name` for each name, as C or C++ by extension.
    pub fn add(&mut self, dir: &Path, names: &[&str]) {
        for name in names {
            let path = dir.join(name);
            if name.ends_with(".c") {
                self.c.push(path);
            } else {
                self.cpp.push(path);
            }
        }
    }

    pub fn source_count(&self) -> usize {
        self.c.len() + self.cpp.len()
    }
}

/// Where `lib`'s objects and archive go.
pub fn lib_dir(out_dir: &Path, name: &str) -> PathBuf {
    out_dir.join("lib").join(name)
}

/// Compiles every library; the libraries are built concurrently (one thread
/// each) and `cc`'s `parallel` feature shares cargo's jobserver among all of
/// their files, so both cores stay busy until the last file.
pub fn compile_all(libs: &[Library], out_dir: &Path) {
    std::thread::scope(|scope| {
        for lib in libs {
            scope.spawn(move || compile(lib, out_dir));
        }
    });
}

fn compile(lib: &Library, out_dir: &Path) {
    let dir = lib_dir(out_dir, lib.name);
    std::fs::create_dir_all(&dir).expect("create the library directory");
    let mut objects = Vec::new();
    if !lib.c.is_empty() {
        let mut c = base_build(lib, &dir);
        c.std("c11").files(&lib.c);
        objects = c.compile_intermediates();
    }
    let mut cpp = base_build(lib, &dir);
    cpp.cpp(true).std("c++17").files(&lib.cpp).objects(&objects);
    cpp.compile(lib.name);
}

/// Settings shared by C and C++ and by all libraries.
fn base_build(lib: &Library, dir: &Path) -> cc::Build {
    let mut b = cc::Build::new();
    b.out_dir(dir)
        // ggml at -O0 is unusably slow, so always -O3, whatever the cargo profile.
        .opt_level(3)
        .debug(std::env::var(DEBUG_ENV).is_ok_and(|v| v == "1"))
        .define("NDEBUG", None)
        // Vendored code: its warnings are not ours to fix.
        .warnings(false)
        .extra_warnings(false)
        .flag("-pthread")
        // Link directives are emitted by build.rs in dependency order.
        .cargo_metadata(false);
    for inc in &lib.includes {
        b.include(inc);
    }
    for (key, value) in &lib.defines {
        b.define(key, *value);
    }
    for flag in &lib.arch_flags {
        b.flag(flag);
    }
    if lib.no_amx {
        for flag in crate::cpu::NO_AMX {
            b.flag_if_supported(flag);
        }
    }
    b
}
