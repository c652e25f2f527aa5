//! Turning a [`Library`] into a static archive with the `cc` crate.

use std::path::{Path, PathBuf};

use crate::cache::{Cache, Fnv};

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
    /// Extra compiler flags (ggml-cpu: the SIMD flags of build/cpu.rs).
    pub flags: Vec<String>,
    /// Files that are not compiled directly but reach the compiler through an
    /// `#include` of a source (llama: the `src/models/*.cpp` that the unity
    /// batches include): fingerprinted by content like the sources.
    pub extra_inputs: Vec<PathBuf>,
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

/// Compiles every library that the cache does not have yet and returns the
/// directory holding each `lib<name>.a`, in `libs` order. The libraries are
/// built concurrently (one thread each) and `cc`'s `parallel` feature shares
/// cargo's jobserver among all of their files, so both cores stay busy until
/// the last file.
///
/// `roots` are (directory, placeholder) pairs: occurrences of these absolute
/// paths in file names, file contents and command lines are replaced by the
/// placeholder before hashing, so the fingerprint does not depend on where the
/// checkout lives (two worktrees with the same sources share cache entries).
pub fn compile_all(libs: &[Library], cache: &Cache, roots: &[(PathBuf, &str)]) -> Vec<PathBuf> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = libs
            .iter()
            .map(|lib| {
                scope.spawn(move || {
                    let key = format!("{}-{}", lib.name, fingerprint(lib, roots));
                    cache.get_or_build(&key, |dir| compile(lib, dir))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a library build panicked"))
            .collect()
    })
}

/// Everything that reaches the compiler for `lib`, by content: each source
/// file and extra input (path relative to its root, and content), every
/// header (`*.h`, `*.hpp`, `*.inc`) under each of its include directories
/// (recursively), and the complete C and C++ command lines (tool, flags,
/// defines, includes). Nothing else: a patch that only changes `src/` and
/// `common/` changes the fingerprints of `llama`, `common` (and `kcm_shim`,
/// whose include path has `common/`), not those of the ggml libraries.
fn fingerprint(lib: &Library, roots: &[(PathBuf, &str)]) -> String {
    let norm = |bytes: &[u8]| normalize(bytes, roots);
    let mut h = Fnv::new();
    h.field(CACHE_FORMAT.as_bytes());
    for src in lib.c.iter().chain(&lib.cpp).chain(&lib.extra_inputs) {
        h.field(&norm(src.as_os_str().as_encoded_bytes()));
        h.field(&norm(&std::fs::read(src).unwrap_or_default()));
    }
    for inc in &lib.includes {
        h.field(&norm(inc.as_os_str().as_encoded_bytes()));
        h.tree_files_with_extensions(inc, HEADER_EXTENSIONS);
    }
    let mut builds = vec![cpp_build(lib)];
    if !lib.c.is_empty() {
        builds.push(c_build(lib));
    }
    for build in builds {
        let tool = build.get_compiler();
        h.field(tool.path().as_os_str().as_encoded_bytes());
        for arg in tool.args() {
            h.field(&norm(arg.as_encoded_bytes()));
        }
    }
    h.hex()
}

/// What counts as a header when fingerprinting an include directory.
const HEADER_EXTENSIONS: &[&str] = &["h", "hpp", "inc"];

/// `bytes` with every occurrence of a root's path replaced by its placeholder.
fn normalize(bytes: &[u8], roots: &[(PathBuf, &str)]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for (root, placeholder) in roots {
        let needle = root.as_os_str().as_encoded_bytes();
        if needle.is_empty() {
            continue;
        }
        let mut replaced = Vec::with_capacity(out.len());
        let mut i = 0;
        while i < out.len() {
            if out[i..].starts_with(needle) {
                replaced.extend_from_slice(placeholder.as_bytes());
                i += needle.len();
            } else {
                replaced.push(out[i]);
                i += 1;
            }
        }
        out = replaced;
    }
    out
}

/// Bump when the cache layout or the way archives are produced changes.
const CACHE_FORMAT: &str = "kcm-llama-2";

fn compile(lib: &Library, dir: &Path) {
    let mut objects = Vec::new();
    if !lib.c.is_empty() {
        objects = c_build(lib)
            .out_dir(dir)
            .files(largest_first(&lib.c))
            .compile_intermediates();
    }
    cpp_build(lib)
        .out_dir(dir)
        .files(largest_first(&lib.cpp))
        .objects(&objects)
        .compile(lib.name);
}

/// Big files first, so that the last file to finish is a short one (cc
/// starts them in list order). Does not affect the fingerprint.
fn largest_first(files: &[PathBuf]) -> Vec<PathBuf> {
    let mut sorted = files.to_vec();
    sorted.sort_by_key(|p| std::cmp::Reverse(std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)));
    sorted
}

fn c_build(lib: &Library) -> cc::Build {
    let mut b = base_build(lib);
    b.std("c11");
    b
}

fn cpp_build(lib: &Library) -> cc::Build {
    let mut b = base_build(lib);
    b.cpp(true).std("c++17");
    b
}

/// Settings shared by C and C++ and by all libraries.
fn base_build(lib: &Library) -> cc::Build {
    let mut b = cc::Build::new();
    // ggml at -O0 is unusably slow, so always -O3, whatever the cargo profile.
    b.opt_level(3)
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
    for flag in &lib.flags {
        b.flag(flag);
    }
    b
}
