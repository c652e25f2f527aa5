//! Helpers more than one test module of this binary uses.

use std::path::Path;
use std::process::Command;

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
