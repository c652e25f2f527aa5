//! `gguf-reader`: inspect any GGUF file, from a path (memory-mapped) or from stdin
//! (read sequentially, so `kqv-trace-monitor ... --save-gguf - | gguf-reader -` works).
//!
//! The work is split in three: [`args`] parses the command line, [`report`] turns a GGUF
//! into a [`report::Report`] (one description serving text and JSON alike), and the
//! renderers in [`text`] and [`report`] print it.

pub mod args;
pub mod data;
pub mod export;
pub mod materialize;
pub mod report;
pub mod text;
pub mod verify;

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::process::ExitCode;

use args::{Input, Options};
use gguf_io::{GgufError, GgufFile, StreamReader};
use kcm_cli::tool::{is_broken_pipe, Failure, Tool};

/// Documented exit codes.
pub mod exit {
    pub const OK: u8 = 0;
    pub const BAD_INPUT: u8 = 1;
    pub const USAGE: u8 = 2;
    /// `--verify-attention`: some group failed its check.
    pub const FAILED: u8 = 1;
    /// `--verify-attention` / `--shapes`: the trace is malformed (unreadable, invalid, or
    /// a group that cannot be checked), inputs are missing, or nothing matches.
    pub const CANNOT_CHECK: u8 = 2;
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{}: {}", trace_format::escape(.input), trace_format::escape(&.source.to_string()))]
    Gguf {
        input: String,
        #[source]
        source: GgufError,
    },
    #[error("{}", trace_format::escape(&.0.to_string()))]
    Io(#[from] io::Error),
    #[error("{}: {}", trace_format::escape(.input), trace_format::escape(&.source.to_string()))]
    Trace {
        input: String,
        #[source]
        source: trace_format::TraceError,
    },
    #[error("{}: {}", trace_format::escape(.input), trace_format::escape(&.source.to_string()))]
    Export {
        input: String,
        #[source]
        source: export::ExportError,
    },
}

/// One stderr line: `gguf-reader: <name>: <message>`, everything from the file escaped.
fn error_line(name: &str, message: impl std::fmt::Display) -> String {
    format!(
        "gguf-reader: {}: {}",
        trace_format::escape(name),
        trace_format::escape(&message.to_string())
    )
}

/// The tool's name, help text and version.
pub const TOOL: Tool = Tool {
    name: "gguf-reader",
    usage: args::USAGE,
    version: env!("CARGO_PKG_VERSION"),
};

/// Entry point shared by `main.rs` and the tests: parse, run, map errors to exit codes.
pub fn main(args: Vec<OsString>) -> ExitCode {
    TOOL.main(args, args::parse, |opts| {
        let stdout = io::stdout();
        let mut out = io::BufWriter::new(stdout.lock());
        if let Some(dest) = &opts.materialize {
            let result = materialize::run(&opts.input, dest, &mut out)
                .and_then(|()| out.flush().map_err(RunError::from));
            return TOOL.exit(result.map(|()| exit::OK));
        }
        if let Some(dest) = &opts.export {
            let result = export::run(&opts.input, dest, opts.export_raw, &mut out)
                .and_then(|()| out.flush().map_err(RunError::from));
            return TOOL.exit(result.map(|()| exit::OK));
        }
        if opts.verify || opts.shapes {
            let code = run_verify(&opts, &mut out);
            let _ = out.flush();
            return code;
        }
        let result = run(&opts, &mut out).and_then(|()| out.flush().map_err(RunError::from));
        TOOL.exit(result.map(|()| exit::OK))
    })
}

impl Failure for RunError {
    fn exit_code(&self) -> u8 {
        exit::BAD_INPUT
    }
    /// A closed pipe (`gguf-reader x | head`) is how a reader says "enough": not an error.
    fn is_closed_pipe(&self) -> bool {
        matches!(self, RunError::Io(e) if is_broken_pipe(e))
    }
}

/// `--verify-attention` and `--shapes`: exit 0 all verified (or shapes shown), 1 some
/// group failed, 2 the trace is malformed or some group cannot be checked (unreadable,
/// invalid, a malformed group, over the work budget, inputs missing), not a trace, or no
/// group matches. Every stderr message is one line.
fn run_verify(opts: &Options, out: &mut impl Write) -> ExitCode {
    let name = opts.input.display();
    let file = match &opts.input {
        Input::Path(p) => GgufFile::open(p),
        Input::Stdin => {
            let mut bytes = Vec::new();
            match io::stdin().lock().read_to_end(&mut bytes) {
                Ok(_) => GgufFile::from_bytes(bytes),
                Err(e) => Err(e.into()),
            }
        }
    };
    let trace = match file
        .map_err(trace_format::TraceError::from)
        .and_then(trace_format::TraceFile::from_gguf)
    {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}", error_line(&name, e));
            return ExitCode::from(exit::CANNOT_CHECK);
        }
    };
    let limits = attn_verify::Limits {
        max_work: opts.max_work,
    };
    let rows = match verify::run(&trace, opts.step, opts.layer, opts.verify, &limits) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{}", error_line(&name, e));
            return ExitCode::from(exit::CANNOT_CHECK);
        }
    };
    match verify::render(&rows, opts.json, opts.shapes, out) {
        Ok(n) => {
            if n.malformed > 0 {
                let first = rows.iter().find_map(|r| match &r.result {
                    Some(verify::GroupResult::Malformed(why)) => Some(why.as_str()),
                    _ => None,
                });
                eprintln!(
                    "{}",
                    error_line(
                        &name,
                        format!(
                            "{} group(s) malformed or not checkable, the first: {}",
                            n.malformed,
                            first.unwrap_or_default()
                        )
                    )
                );
                ExitCode::from(exit::CANNOT_CHECK)
            } else if n.missing > 0 {
                let first = rows.iter().find_map(|r| match &r.result {
                    Some(verify::GroupResult::Outcome(attn_verify::Outcome::Missing(m))) => Some(m),
                    _ => None,
                });
                let missing: std::collections::BTreeSet<&str> = rows
                    .iter()
                    .filter_map(|r| match &r.result {
                        Some(verify::GroupResult::Outcome(attn_verify::Outcome::Missing(m))) => {
                            Some(m.0.iter().copied())
                        }
                        _ => None,
                    })
                    .flatten()
                    .collect();
                let missing: Vec<&str> = missing.into_iter().collect();
                eprintln!(
                    "{}",
                    error_line(
                        &name,
                        format!(
                            "{} group(s) cannot be verified, missing {}: {}",
                            n.missing,
                            missing.join(", "),
                            first.map(|m| m.hint(Some(&trace.run))).unwrap_or_default()
                        )
                    )
                );
                ExitCode::from(exit::CANNOT_CHECK)
            } else if !opts.verify && rows.iter().any(|r| !r.problems.is_empty()) {
                // --shapes alone: the layouts are shown, and the trace is malformed.
                let first = rows.iter().find_map(|r| r.problems.first());
                eprintln!(
                    "{}",
                    error_line(&name, format!("malformed: {}", first.map_or("", |p| p)))
                );
                ExitCode::from(exit::CANNOT_CHECK)
            } else if n.failed > 0 {
                ExitCode::from(exit::FAILED)
            } else {
                ExitCode::from(exit::OK)
            }
        }
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::from(exit::OK),
        Err(e) => {
            eprintln!("gguf-reader: {}", trace_format::escape(&e.to_string()));
            ExitCode::from(exit::BAD_INPUT)
        }
    }
}

/// Read the input named in `opts` and write the report to `out`.
pub fn run(opts: &Options, out: &mut impl Write) -> Result<(), RunError> {
    let name = opts.input.display();
    let wrap = |source| RunError::Gguf {
        input: name.clone(),
        source,
    };
    let report = match &opts.input {
        Input::Path(p) => {
            let file = GgufFile::open(p).map_err(wrap)?;
            report::Report::from_file(&name, &file, opts).map_err(wrap)?
        }
        Input::Stdin => {
            let stdin = io::stdin();
            let mut reader = StreamReader::new(stdin.lock()).map_err(wrap)?;
            report::Report::from_stream(&name, &mut reader, opts).map_err(wrap)?
        }
    };
    if opts.json {
        serde_json::to_writer_pretty(&mut *out, &report.to_json(opts)).map_err(io::Error::from)?;
        writeln!(out)?;
    } else {
        text::render(&report, opts, out)?;
    }
    Ok(())
}
