//! Trace tests for both storages (issue 16): every test that saves a trace and reads it
//! runs for `--kv-storage full` (format version 1) and the default `delta` (version 2).
//!
//! - A cheap run (the tiny model) is traced once per storage: loop over [`BOTH`] and add
//!   [`args`] (or [`crate::LlamaArgs::storage`]) to the monitor's command line.
//! - An expensive run (gemma-3-270m, long contexts) is traced once, in the default delta
//!   storage, and read in both: [`as_storage`] gives the version-1 file of the same run by
//!   materializing it (crates/gguf-reader/tests/it/storage.rs proves that a materialized
//!   file is the `--kv-storage full` file of the same run, byte for byte).

use std::path::{Path, PathBuf};

pub use trace_format::KvStorage;

/// Both storages: version 1 (`full`) first, then the default version 2 (`delta`).
pub const BOTH: [KvStorage; 2] = [KvStorage::Full, KvStorage::Delta];

/// `--kv-storage NAME`, for a monitor or analyzer command line.
pub fn args(s: KvStorage) -> [&'static str; 2] {
    ["--kv-storage", s.name()]
}

/// `path` with `-full` or `-delta` before its extension (`trace.gguf` ->
/// `trace-delta.gguf`): one file per storage in a test's directory.
pub fn path_for(path: &Path, s: KvStorage) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|x| x.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = path
        .extension()
        .map(|x| format!(".{}", x.to_string_lossy()))
        .unwrap_or_default();
    path.with_file_name(format!("{stem}-{}{ext}", s.name()))
}

/// The trace at `path`, written in the default storage (delta, version 2), as storage
/// `s`: `path` itself for delta, for full a version-1 copy beside it
/// ([`path_for`]), materialized once. Panics when `path` is not a version-2 trace.
pub fn as_storage(path: &Path, s: KvStorage) -> PathBuf {
    let t = trace_format::TraceFile::open(path).expect("a trace");
    assert_eq!(
        t.format_version,
        KvStorage::Delta.format_version(),
        "{}: as_storage converts a trace written in the default (delta) storage",
        path.display()
    );
    match s {
        KvStorage::Delta => path.to_path_buf(),
        KvStorage::Full => {
            let out = path_for(path, KvStorage::Full);
            if !out.exists() {
                trace_format::materialize::materialize_to_path(&t, &out)
                    .expect("materialize the version-1 copy");
            }
            out
        }
    }
}
