//! Helpers more than one test module of this binary uses.

use std::path::Path;
use std::process::Command;

use test_support::storage::{self, KvStorage};
use trace_format::TraceFile;

/// Runs `kqv-trace-monitor ARGS --save-gguf OUT EXTRA`, asserts it succeeded, and opens
/// the trace.
pub fn trace_with(args: Vec<String>, out: &Path, extra: &[&str]) -> TraceFile {
    let args: Vec<String> = args
        .into_iter()
        .chain(["--save-gguf".to_string(), out.display().to_string()])
        .chain(extra.iter().map(|s| s.to_string()))
        .collect();
    let o = Command::new(env!("CARGO_BIN_EXE_kqv-trace-monitor"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{args:?}\nstderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    TraceFile::open(out).unwrap()
}

/// [`trace_with`] once per storage (issue 16: every trace test for both), `--kv-storage
/// full` then the default `delta`, each into `out` named for it
/// ([`test_support::storage::path_for`]): (storage, trace).
pub fn trace_both(args: Vec<String>, out: &Path, extra: &[&str]) -> Vec<(KvStorage, TraceFile)> {
    storage::BOTH
        .iter()
        .map(|&s| {
            let mut e = extra.to_vec();
            e.extend(storage::args(s));
            let t = trace_with(args.clone(), &storage::path_for(out, s), &e);
            assert_eq!(t.format_version, s.format_version());
            (s, t)
        })
        .collect()
}
