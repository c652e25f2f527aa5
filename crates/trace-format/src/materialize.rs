//! A format-version-1 copy of a trace (every tensor whole, rebuilt from a version-2
//! trace's deltas), written through [`TraceWriter`] with [`KvStorage::Full`]: the same
//! tensor names, in the same order, with the same descriptions, steps, attention records
//! and run facts. `gguf-reader --materialize` writes it; tests that patch a trace's bytes
//! in place patch it.

use std::io::Write;
use std::path::Path;

use crate::read::TraceFile;
use crate::write::{KvStorage, TraceWriter};
use crate::TraceError;

fn writer(trace: &TraceFile) -> Result<TraceWriter, TraceError> {
    if let Some(u) = trace.unknown.first() {
        return Err(TraceError::Format(format!(
            "tensor {} has no role this reader knows: not materialized",
            crate::escape(u)
        )));
    }
    let mut w = TraceWriter::with_storage(KvStorage::Full)?;
    for s in &trace.steps {
        w.add_step(s.clone());
        if let Some(tok) = trace.sampled_at(s.step) {
            w.set_sampled(s.step, tok);
        }
    }
    for a in &trace.attn {
        w.add_attn(a.clone());
    }
    let mut all: Vec<_> = trace
        .tensors
        .iter()
        .chain(&trace.logits)
        .chain(&trace.nodes)
        .collect();
    all.sort_by_key(|t| t.index);
    for t in all {
        w.add_tensor_named(t.meta.clone(), &t.name, &trace.data(t), t.graph_order)?;
    }
    Ok(w)
}

/// Write `trace` as version 1 to a sink.
pub fn materialize<W: Write>(trace: &TraceFile, out: W) -> Result<W, TraceError> {
    writer(trace)?.finish(&trace.run, out)
}

/// Write `trace` as version 1 to a path, atomically.
pub fn materialize_to_path(trace: &TraceFile, path: &Path) -> Result<(), TraceError> {
    writer(trace)?.finish_to_path(&trace.run, path)
}

/// The trace file at `path` as version-1 bytes: read as is when it is version 1,
/// materialized when it is version 2.
pub fn full_bytes(path: &Path) -> Result<Vec<u8>, TraceError> {
    let trace = TraceFile::open(path)?;
    if trace.format_version == crate::write::FORMAT_VERSION_FULL {
        return Ok(std::fs::read(path)?);
    }
    materialize(&trace, Vec::new())
}
