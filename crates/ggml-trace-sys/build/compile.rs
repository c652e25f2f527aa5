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

    /// Adds sources, as C or C++ by extension.
    pub fn add_sources(&mut self, sources: Vec<PathBuf>) {
        for path in sources {
            if path.extension().is_some_and(|e| e == "c") {
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

/// Compiles every source file that the object store does not have yet, archives each
/// library whose set of objects the cache does not have yet, and returns the directory
/// holding each `lib<name>.a`, in `libs` order. The libraries are built concurrently (one
/// thread each) and `cc`'s `parallel` feature shares cargo's jobserver among all of their
/// files, so both cores stay busy until the last file.
///
/// Objects are cached one file at a time (`<cache>/obj/<lib>/<key>-<stem>.o`, see
/// [`object_key`]): editing one kernel recompiles that file only, then re-archives its
/// library (issue 18: users iterate on kernels). The archive of a library is cached under
/// `<lib>-<hash of its object keys>`.
///
/// `roots` are (directory, placeholder) pairs: occurrences of these absolute
/// paths in file names, file contents and command lines are replaced by the
/// placeholder before hashing, so the keys do not depend on where the
/// checkout lives (two worktrees with the same sources share cache entries).
pub fn compile_all(libs: &[Library], cache: &Cache, roots: &[(PathBuf, &str)]) -> Vec<PathBuf> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = libs
            .iter()
            .map(|lib| {
                scope.spawn(move || {
                    let objects = planned_objects(lib, cache, roots);
                    let mut h = Fnv::new();
                    h.field(CACHE_FORMAT.as_bytes());
                    for obj in &objects {
                        h.field(obj.path.file_name().unwrap_or_default().as_encoded_bytes());
                    }
                    let key = format!("{}-{}", lib.name, h.hex());
                    cache.get_or_build(&key, |dir| build_library(lib, &objects, cache, dir))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a library build panicked"))
            .collect()
    })
}

/// One translation unit and where its object lives in the store.
struct PlannedObject {
    source: PathBuf,
    is_c: bool,
    path: PathBuf,
}

/// The store path of every source's object, in the library's source order (C, then C++).
fn planned_objects(lib: &Library, cache: &Cache, roots: &[(PathBuf, &str)]) -> Vec<PlannedObject> {
    let shared = shared_inputs(lib, roots);
    let dir = object_dir(cache, lib);
    let c = lib.c.iter().map(|s| (s, true));
    let cpp = lib.cpp.iter().map(|s| (s, false));
    c.chain(cpp)
        .map(|(source, is_c)| {
            let key = object_key(&shared, source, is_c, roots);
            let stem = source
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            PlannedObject {
                source: source.clone(),
                is_c,
                path: dir.join(format!("{key}-{stem}.o")),
            }
        })
        .collect()
}

/// `<cache>/obj/<lib>`: the object store of one library.
fn object_dir(cache: &Cache, lib: &Library) -> PathBuf {
    cache.root().join("obj").join(lib.name)
}

/// What every translation unit of a library shares, per language: its command line (tool,
/// flags, defines, includes) and every header (`*.h`, `*.hpp`, `*.inc`) under each include
/// directory (recursively, by content), and its extra inputs. A header edit therefore
/// recompiles every file of the libraries that can see it; a source edit only that source.
struct SharedInputs {
    c: String,
    cpp: String,
}

fn shared_inputs(lib: &Library, roots: &[(PathBuf, &str)]) -> SharedInputs {
    let norm = |bytes: &[u8]| normalize(bytes, roots);
    let mut files = Fnv::new();
    files.field(CACHE_FORMAT.as_bytes());
    for extra in &lib.extra_inputs {
        files.field(&norm(extra.as_os_str().as_encoded_bytes()));
        files.field(&norm(&std::fs::read(extra).unwrap_or_default()));
    }
    for inc in &lib.includes {
        files.field(&norm(inc.as_os_str().as_encoded_bytes()));
        files.tree_files_with_extensions(inc, HEADER_EXTENSIONS);
    }
    let files = files.hex();
    let command = |build: cc::Build| {
        let mut h = Fnv::new();
        h.field(files.as_bytes());
        let tool = build.get_compiler();
        h.field(tool.path().as_os_str().as_encoded_bytes());
        for arg in tool.args() {
            h.field(&norm(arg.as_encoded_bytes()));
        }
        h.hex()
    };
    SharedInputs {
        c: command(c_build(lib)),
        cpp: command(cpp_build(lib)),
    }
}

/// The key of one object: its library's shared inputs for its language, the source's path
/// (relative to its root) and its content.
fn object_key(
    shared: &SharedInputs,
    source: &Path,
    is_c: bool,
    roots: &[(PathBuf, &str)],
) -> String {
    let mut h = Fnv::new();
    h.field(if is_c { &shared.c } else { &shared.cpp }.as_bytes());
    h.field(&normalize(source.as_os_str().as_encoded_bytes(), roots));
    h.field(&normalize(
        &std::fs::read(source).unwrap_or_default(),
        roots,
    ));
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

/// Bump when the cache layout or the way objects and archives are produced changes.
const CACHE_FORMAT: &str = "kcm-llama-3";

/// Compiles the objects the store lacks (into a private directory, then renamed into the
/// store one by one, so a killed build never leaves a partial object under its key) and
/// archives all of the library's objects into `dir/lib<name>.a`.
fn build_library(lib: &Library, objects: &[PlannedObject], cache: &Cache, dir: &Path) {
    let store = object_dir(cache, lib);
    std::fs::create_dir_all(&store)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", store.display()));
    let scratch = dir.join("objects");
    for is_c in [true, false] {
        let missing: Vec<&PlannedObject> = objects
            .iter()
            .filter(|o| o.is_c == is_c && !o.path.is_file())
            .collect();
        if missing.is_empty() {
            continue;
        }
        let sources: Vec<PathBuf> = missing.iter().map(|o| o.source.clone()).collect();
        let order = largest_first(&sources);
        let build = if is_c { c_build(lib) } else { cpp_build(lib) };
        let compiled = build
            .clone()
            .out_dir(&scratch)
            .files(&order)
            .compile_intermediates();
        for (source, object) in order.iter().zip(compiled) {
            let Some(planned) = missing.iter().find(|o| &o.source == source) else {
                continue;
            };
            if std::fs::rename(&object, &planned.path).is_err() && !planned.path.is_file() {
                panic!(
                    "cannot store {} as {}",
                    object.display(),
                    planned.path.display()
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    cpp_build(lib)
        .out_dir(dir)
        .create_archive(lib.name, objects.iter().map(|o| &o.path));
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
