//! `--materialize OUT`: a format-version-1 copy of a trace (every tensor whole), written
//! through the trace writer; a version-1 trace is copied byte for byte.

use std::io::{self, Read, Write};
use std::path::Path;

use gguf_io::GgufFile;
use trace_format::{TraceError, TraceFile};

use crate::args::Input;
use crate::RunError;

/// Write `dest` from the trace at `input` and say so on `out`.
pub fn run(input: &Input, dest: &Path, out: &mut impl Write) -> Result<(), RunError> {
    let name = input.display();
    let wrap = |source: TraceError| RunError::Trace {
        input: name.clone(),
        source,
    };
    // Stdin is kept in memory (twice for a version-1 copy).
    let mut stdin = Vec::new();
    let file = match input {
        Input::Path(p) => GgufFile::open(p),
        Input::Stdin => {
            io::stdin().lock().read_to_end(&mut stdin)?;
            GgufFile::from_bytes(stdin.clone())
        }
    }
    .map_err(|e| wrap(e.into()))?;
    let trace = TraceFile::from_gguf(file).map_err(wrap)?;
    let n = if trace.format_version == trace_format::FORMAT_VERSION_FULL {
        copy(input, &stdin, dest).map_err(wrap)?;
        trace.gguf().tensors().len()
    } else {
        materialize(&trace, dest).map_err(wrap)?
    };
    writeln!(
        out,
        "{}: {n} tensors (format version {} read, version 1 written)",
        trace_format::escape(&dest.display().to_string()),
        trace.format_version
    )?;
    Ok(())
}

/// A version-1 trace, copied as it is (atomically).
fn copy(input: &Input, stdin: &[u8], dest: &Path) -> Result<(), TraceError> {
    let mut f = gguf_io::AtomicFile::create(dest)?;
    match input {
        Input::Path(p) => {
            io::copy(&mut std::fs::File::open(p)?, f.file())?;
        }
        Input::Stdin => f.file().write_all(stdin)?,
    }
    f.commit()?;
    Ok(())
}

/// Write `trace` to `dest` as version 1 through the trace writer, every tensor under its
/// own name in its place in the table; returns the tensor count.
pub fn materialize(trace: &TraceFile, dest: &Path) -> Result<usize, TraceError> {
    trace_format::materialize::materialize_to_path(trace, dest)?;
    Ok(trace.gguf().tensors().len())
}
