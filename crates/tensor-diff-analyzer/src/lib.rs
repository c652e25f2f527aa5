//! `tensor-diff-analyzer`: compare a live llama.cpp run (the monitor's capture engine) or
//! a saved trace with a reference trace, tensor by tensor, matched by (role, layer,
//! step); print the seed's summary (or `--json`), optionally an SVG heatmap, and exit
//! 0 (all within tolerance), 1 (not) or 2 (usage or input error); steps from the first
//! one whose inputs (tokens, positions) differ from the reference's are left out unless
//! `--include-diverged`. What is comparable is decided from the tensors themselves; run flags they contradict, duplicated tensors, a
//! run whose `kqv_out` were all skipped are input errors (`trust`). docs/diff.md.

pub mod args;
pub mod breakdown;
pub mod compare;
pub mod devices;
pub mod import;
pub mod live;
pub mod output;
pub mod plot;
pub mod report;
pub mod trust;

use std::ffi::OsString;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use args::Options;
use compare::{le_data, Analyzer, Comparison};
use ggml_trace::capture::CaptureConfig;
use ggml_trace::session::{self, RunOptions, SessionError};
use kcm_cli::capture_args::SaveTarget;
use kcm_cli::tool::{is_broken_pipe, utf8_args, Failure, Tool};
use report::Outcome;
use trace_format::{Role, TraceError, TraceFile};
use trust::{shown, TrustError};

/// Documented exit codes.
pub mod exit {
    /// Every tensor compared and within tolerance.
    pub const OK: u8 = 0;
    /// Some tensor outside tolerance, a shape mismatch, or an unmatched tensor.
    pub const OUTSIDE: u8 = 1;
    /// Usage or input error (nothing to conclude).
    pub const ERROR: u8 = 2;
}

#[derive(Debug, thiserror::Error)]
pub enum AnalyzerError {
    #[error("{0} (try --help)")]
    Usage(#[from] args::UsageError),
    #[error("{what} {}: {source}", shown(&path.display().to_string()))]
    Trace {
        what: &'static str,
        path: PathBuf,
        source: Box<TraceError>,
    },
    /// The file's metadata contradicts its tensors, or a tensor is there twice.
    #[error("{what} {}: {source}", shown(&path.display().to_string()))]
    Untrusted {
        what: &'static str,
        path: PathBuf,
        source: TrustError,
    },
    /// The metadata says the runs cannot be compared.
    #[error("{0}")]
    Mismatch(String),
    /// Some (step, layer) group of a trace contradicts itself (trace_format's validation).
    #[error("{what} {}: malformed trace ({groups} group(s)): {problem}", path.display())]
    Malformed {
        what: &'static str,
        path: PathBuf,
        problem: String,
        groups: usize,
    },
    #[error("{0} (try --help)")]
    LlamaUsage(String),
    #[error("{0}")]
    Session(SessionError),
    #[error("nothing was compared: {0}")]
    NothingCompared(String),
    /// Pairs were compared, but none of the main tensor: no verdict on the output.
    #[error("no kqv_out was compared: {0}")]
    NoKqvOut(String),
    #[error("saving the current trace: {0}")]
    Save(String),
    #[error("--plot: {0}")]
    Plot(String),
    /// A `--compare-devices` side could not run (its devices, its run): nothing compared.
    #[error("--compare-devices side {side} ({selection}): {why}")]
    Side {
        side: &'static str,
        selection: String,
        why: String,
    },
    /// `--map`: the map or the safetensors reference could not be read or converted.
    #[error("{0}")]
    Import(#[from] import::ImportError),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The tool's name, help text and version.
pub const TOOL: Tool = Tool {
    name: "tensor-diff-analyzer",
    usage: args::USAGE,
    version: env!("CARGO_PKG_VERSION"),
};

/// The whole program: parse, run, one error line and a documented exit code.
pub fn main(args: Vec<OsString>) -> ExitCode {
    // One side of a --compare-devices run, started by the run itself.
    if args.first().is_some_and(|a| a == devices::SIDE_ARG) {
        return devices::side_main(args.into_iter().skip(1).collect());
    }
    TOOL.main(
        args,
        |a| match utf8_args(a) {
            Ok(a) => args::parse(a),
            Err(e) => Err(args::UsageError::NotUtf8(e)),
        },
        |opts| TOOL.exit(run(&opts)),
    )
}

impl Failure for AnalyzerError {
    fn exit_code(&self) -> u8 {
        exit::ERROR
    }
    fn is_closed_pipe(&self) -> bool {
        matches!(self, AnalyzerError::Io(e) if is_broken_pipe(e))
    }
}

/// Opens a trace for comparison. A (step, layer) group that the trace's own validation
/// finds malformed (a second attention record, strides that overflow, a duplicate role,
/// ...) refuses the whole comparison: the analyzer pairs whole traces, and a verdict over
/// a group whose claims contradict its data would rest on those claims.
fn open(what: &'static str, path: &Path) -> Result<TraceFile, AnalyzerError> {
    let trace = TraceFile::open(path).map_err(|source| AnalyzerError::Trace {
        what,
        path: path.to_owned(),
        source: Box::new(source),
    })?;
    if let Some(problem) = trace.first_problem() {
        let groups = trace.problems().len();
        return Err(AnalyzerError::Malformed {
            what,
            path: path.to_owned(),
            problem: problem.to_string(),
            groups,
        });
    }
    Ok(trace)
}

fn untrusted(what: &'static str, path: &Path) -> impl FnOnce(TrustError) -> AnalyzerError {
    let path = path.to_owned();
    move |source| AnalyzerError::Untrusted { what, path, source }
}

/// The analyzer for a reference trace (checked by [`trust::observe`]).
pub fn analyzer<'r>(
    reference: &'r TraceFile,
    path: &Path,
    layer: Option<i32>,
    tolerance: tensor_stats::Tolerance,
) -> Result<Analyzer<'r>, AnalyzerError> {
    Analyzer::new(reference, layer, tolerance).map_err(untrusted("reference", path))
}

/// Compare a saved trace (`current`, read from `path`) with the analyzer's reference.
/// The file is checked first ([`trust::observe`]); its bytes are read in its own byte
/// order.
pub fn compare_files(
    a: &mut Analyzer,
    current: &TraceFile,
    path: &Path,
) -> Result<(), AnalyzerError> {
    let seen = trust::observe(current).map_err(untrusted("current", path))?;
    let check = a.set_current_run(current.run.clone(), seen);
    if !check.fatal.is_empty() {
        return Err(AnalyzerError::Mismatch(check.fatal.join("; ")));
    }
    a.current_no_role = current.unknown.len();
    for s in &current.steps {
        a.add_current_step(s.clone());
    }
    for (side, unknown) in [
        ("reference", &a.reference.unknown),
        ("current", &current.unknown),
    ] {
        if !unknown.is_empty() {
            let names: Vec<String> = unknown.iter().take(8).map(|n| shown(n)).collect();
            a.late_notes.push(format!(
                "{} tensors of the {side} file have no trace role and are skipped: {}{}",
                unknown.len(),
                names.join(", "),
                if unknown.len() > 8 { ", ..." } else { "" }
            ));
        }
    }
    let mut last_step = None;
    for t in &current.tensors {
        // A new step: the pages of both files read so far leave the resident set (the
        // peak RSS stays about one step's data, not the files': GgufFile::release_pages).
        if last_step.replace(t.meta.step) != Some(t.meta.step) {
            current.gguf().release_pages();
            a.reference.gguf().release_pages();
        }
        a.compare_ordered(&t.meta, &t.name, &le_data(current, t), t.graph_order);
    }
    // Nodes (`--tensor-filter`) after the attention tensors, in graph order.
    for t in &current.nodes {
        if last_step.replace(t.meta.step) != Some(t.meta.step) {
            current.gguf().release_pages();
            a.reference.gguf().release_pages();
        }
        a.compare_ordered(&t.meta, &t.name, &le_data(current, t), t.graph_order);
    }
    let reference = a.reference;
    a.outputs.add_trace(reference, current);
    Ok(())
}

/// The main tensor must have been compared: pairs of intermediates alone are no verdict
/// on the attention output. Err(the reason) when no `kqv_out` was.
fn kqv_out_compared(a: &Analyzer) -> Result<(), String> {
    let main = |r: Role| r == Role::KqvOut;
    if a.comparisons
        .iter()
        .any(|c| main(c.role) || main(c.reference_role))
    {
        return Ok(());
    }
    let reference = a.reference_unpaired();
    let count = |v: &[compare::Unpaired]| v.iter().filter(|u| main(u.role)).count();
    let (r, c) = (count(&reference), count(&a.current_unpaired));
    let why = reference
        .iter()
        .chain(&a.current_unpaired)
        .filter(|u| main(u.role))
        .find_map(|u| {
            u.reason
                .as_ref()
                .map(|why| format!("{} {}: {why}", u.side, shown(&u.name)))
        });
    Err(match (r + c, why) {
        (0, _) => "neither file holds a kqv_out in the compared layers; only intermediates \
                   were paired, which is no verdict on the attention output"
            .into(),
        (_, Some(why)) => format!(
            "{r} reference and {c} current kqv_out were skipped as not comparable, e.g. {why}"
        ),
        (_, None) => format!(
            "{r} reference and {c} current kqv_out have no counterpart (matched by role, \
             layer and step)"
        ),
    })
}

/// The reference's steps, to decode again in a live run (the default; `--no-replay`
/// decodes the prompt and samples instead). A reference that records no tokens per step
/// (a seed tool's trace) cannot be replayed: `Ok(None)` with a note.
pub fn reference_replay(
    a: &mut Analyzer,
    opts: &Options,
) -> Result<Option<session::Replay>, AnalyzerError> {
    if opts.no_replay {
        return Ok(None);
    }
    let r = a.reference;
    if r.steps.is_empty() || r.steps.iter().all(|s| s.tokens.is_empty()) {
        a.late_notes.push(
            "the reference records no tokens per step (kqv_trace.step.tokens), so its tokens \
             could not be replayed: this run decoded its own prompt and samples"
                .into(),
        );
        return Ok(None);
    }
    session::Replay::from_steps(
        &r.steps,
        &r.run.prompt_tokens,
        opts.reference.display().to_string(),
    )
    .map(Some)
    .map_err(|e| {
        AnalyzerError::Mismatch(format!(
            "the reference's tokens cannot be replayed: {e} (--no-replay decodes the prompt \
             given instead)"
        ))
    })
}

/// Run llama.cpp once, comparing live; `save` also writes the run's trace there.
pub fn compare_live(
    a: &mut Analyzer,
    opts: &Options,
    save: Option<&Path>,
) -> Result<(), AnalyzerError> {
    let replay = reference_replay(a, opts)?;
    let save_opts = save.map(|p| {
        let mut o = opts.monitor.clone();
        o.save = Some(SaveTarget::Path(p.to_owned()));
        o.json = false;
        o.layer = a.layer;
        o
    });
    let run_opts = RunOptions {
        capture: CaptureConfig {
            layer: a.layer,
            from_step: 0,
            trace_sources: opts.monitor.trace_sources,
            keep: true,
            // The reference's logits are compared whenever it has them.
            logits: opts.monitor.logits || !a.reference.logits.is_empty(),
            kv_audit: opts.monitor.kv_audit,
            nodes: a.node_filter.clone(),
        },
        prefill_only: opts.monitor.prefill_only,
        verbose: opts.monitor.verbose,
        eval_callback: true,
    };
    let mut sink = live::LiveSink::new(a, save_opts.as_ref(), opts.monitor.quiet)
        .map_err(AnalyzerError::Save)?;
    let result = session::run_replay(
        &opts.monitor.llama_args,
        run_opts,
        replay.as_ref(),
        &mut sink,
    );
    sink.clear_progress();
    let saver = sink.save.take();
    match result {
        Err(_) if sink.fatal.is_some() => Err(AnalyzerError::Mismatch(
            sink.fatal.take().unwrap_or_default(),
        )),
        Err(SessionError::Usage(e)) => Err(AnalyzerError::LlamaUsage(e)),
        Err(e) => Err(AnalyzerError::Session(e)),
        Ok((info, outcome)) => match saver {
            Some(s) => s
                .finish(&info, &outcome)
                .map_err(|e| AnalyzerError::Save(e.to_string())),
            None => Ok(()),
        },
    }
}

/// What an import left out, as notes of the report.
fn import_notes(a: &mut Analyzer, imp: &import::Imported) {
    let list = |v: &[String]| {
        let names: Vec<String> = v.iter().take(6).map(|n| shown(n)).collect();
        format!(
            "{}{}",
            names.join(", "),
            if v.len() > 6 { ", ..." } else { "" }
        )
    };
    if !imp.unmapped.is_empty() {
        a.late_notes.push(format!(
            "{} reference tensor(s) match no --map entry and are not compared: {}",
            imp.unmapped.len(),
            list(&imp.unmapped)
        ));
    }
    if !imp.unused_entries.is_empty() {
        a.late_notes.push(format!(
            "{} --map entr(y/ies) matched no reference tensor: {}",
            imp.unused_entries.len(),
            list(&imp.unused_entries)
        ));
    }
    if imp.tokens_from.is_none() {
        a.late_notes.push(
            "the imported reference records no tokens (metadata kcm.steps): its steps' inputs \
             are not checked against this run's"
                .into(),
        );
    }
}

/// The whole analysis; returns the exit code of the verdict.
pub fn run(opts: &Options) -> Result<u8, AnalyzerError> {
    match &opts.compare_devices {
        Some(sides) => devices::run(opts, sides),
        None => analyze(opts, None),
    }
}

/// The analysis of a reference and a current run (live or saved); `devices`: the two
/// sides of a `--compare-devices` run, whose traces `opts` names.
pub fn analyze(opts: &Options, devices: Option<[devices::Side; 2]>) -> Result<u8, AnalyzerError> {
    let mut devices = devices;
    let tmp = tempfile::tempdir()?;
    // `--map`: the safetensors reference becomes a trace first (import.rs).
    let (reference_path, imported) = match &opts.map {
        Some(m) => {
            let map = import::Map::load(m)?;
            let dest = tmp.path().join("imported-reference.gguf");
            let imported = import::convert(&opts.reference, &map, &dest)?;
            (dest, Some(imported))
        }
        None => (opts.reference.clone(), None),
    };
    let reference = open("reference", &reference_path)?;
    // A live run against an imported reference traces the nodes it maps, unless
    // --tensor-filter says which.
    let derived;
    let opts = match &imported {
        Some(_) if opts.monitor.tensor_filter.is_empty() && !reference.nodes.is_empty() => {
            let names: std::collections::BTreeSet<String> = reference
                .nodes
                .iter()
                .map(|t| {
                    let (name, _) = import::split_occurrence(&t.meta.ggml_name);
                    format!("{}$", regex::escape(name))
                })
                .collect();
            let mut o = opts.clone();
            o.monitor.tensor_filter = names.into_iter().collect();
            derived = o;
            &derived
        }
        _ => opts,
    };
    if let Some(d) = devices.as_mut() {
        d[0].backends = devices::backends(&reference);
    }
    // A reference traced for one layer: compare that layer unless told otherwise.
    let layer = opts
        .monitor
        .layer
        .or((reference.run.target_layer >= 0).then_some(reference.run.target_layer));
    // Which nodes (role `node`) are compared: those --tensor-filter names; without it,
    // every node of two saved traces, none in a live run (which then traces none).
    let nodes = |a: &mut Analyzer| {
        a.node_filter = opts.monitor.node_filter();
        a.compare_nodes = opts.current.is_some();
    };
    let mut a = analyzer(&reference, &opts.reference, layer, opts.tolerance)?;
    a.include_diverged = opts.include_diverged;
    nodes(&mut a);
    if let Some(imp) = &imported {
        a.set_imported();
        import_notes(&mut a, imp);
    }
    if a.node_filter.is_none() && !a.compare_nodes && !reference.nodes.is_empty() {
        a.late_notes.push(format!(
            "the reference holds {} graph node(s) (role node); this live run traced none:              --tensor-filter REGEX traces and compares them",
            reference.nodes.len()
        ));
    }
    // The first live run's trace, when --noise-floor runs the configuration again.
    let first_run = match (&opts.monitor.save, opts.noise_floor) {
        (Some(SaveTarget::Path(p)), _) => Some(p.clone()),
        (_, true) => Some(tmp.path().join("first-run.gguf")),
        _ => None,
    };
    let current_label = match &opts.current {
        Some(path) => {
            let cur = open("current", path)?;
            compare_files(&mut a, &cur, path)?;
            if let Some(d) = devices.as_mut() {
                d[1].backends = devices::backends(&cur);
            }
            path.display().to_string()
        }
        None => {
            compare_live(&mut a, opts, first_run.as_deref())?;
            format!("live run ({})", opts.monitor.llama_args.join(" "))
        }
    };
    if a.comparisons.is_empty() {
        if let (Some(d), Some(x)) = (a.divergence(), a.inputs_differ()) {
            return Err(AnalyzerError::NothingCompared(format!(
                "the inputs differ from step {0} on ({1}), and steps from {0} on are not \
                 compared ({2} tensor pair(s)); --include-diverged compares them anyway",
                x.from_step,
                d.what(),
                x.pairs
            )));
        }
        let r = a.reference_unpaired();
        return Err(AnalyzerError::NothingCompared(format!(
            "{} reference and {} current tensors have no counterpart (matched by role, layer \
             and step{}); check the prompt, -n and --layer",
            r.len(),
            a.current_unpaired.len(),
            layer.map_or(String::new(), |l| format!(", layer {l} only")),
        )));
    }
    // An imported reference that maps no kqv_out (only nodes) asks about those only.
    let maps_kqv_out = reference
        .tensors
        .iter()
        .any(|t| t.meta.role == Role::KqvOut);
    if imported.is_none() || maps_kqv_out {
        kqv_out_compared(&a).map_err(AnalyzerError::NoKqvOut)?;
    }
    if !a.current_not_mapped.is_empty() {
        let roles: Vec<String> = a
            .current_not_mapped
            .iter()
            .map(|(r, n)| format!("{n} {r}"))
            .collect();
        a.late_notes.push(format!(
            "the current run's tensors of roles the imported reference does not map are not \
             compared: {}",
            roles.join(", ")
        ));
    }
    let mut noise_source = None;
    if let Some(p) = &opts.noise_reference {
        let second = open("noise reference", p)?;
        let mut n = analyzer(&reference, &opts.reference, layer, opts.tolerance)?;
        n.include_diverged = opts.include_diverged;
        nodes(&mut n);
        n.compare_nodes = true;
        compare_files(&mut n, &second, p)?;
        let noise: Vec<Comparison> = n.comparisons;
        a.attach_noise(&noise, true);
        noise_source = Some(format!("{} against the reference", p.display()));
    } else if opts.noise_floor {
        let path = first_run.as_deref().unwrap_or(tmp.path());
        let first = open("first run", path)?;
        let mut n = analyzer(&first, path, layer, opts.tolerance)?;
        n.include_diverged = opts.include_diverged;
        nodes(&mut n);
        compare_live(&mut n, opts, None)?;
        let noise: Vec<Comparison> = n.comparisons;
        a.attach_noise(&noise, false);
        noise_source = Some("the current configuration run twice".into());
    }
    let (reference_label, current_label) = match &devices {
        Some([da, db]) => (
            format!("side A, {} (a temporary trace)", da.selection),
            format!(
                "side B, {} (a temporary trace, side A's tokens replayed)",
                db.selection
            ),
        ),
        None => (opts.reference.display().to_string(), current_label),
    };
    let mut outcome = Outcome::new(reference_label, current_label, &a, noise_source);
    outcome.devices = devices;
    let code = if outcome.passed() {
        exit::OK
    } else {
        exit::OUTSIDE
    };
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    if opts.monitor.json {
        let doc = report::to_json(&outcome, &a.check, code);
        writeln!(out, "{doc}")?;
    } else {
        report::write_text(&outcome, &mut out)?;
    }
    out.flush()?;
    if let Some(p) = &opts.plot {
        plot::write_svg(&outcome, p).map_err(AnalyzerError::Plot)?;
        plot::write_heads_svg(&outcome, p).map_err(AnalyzerError::Plot)?;
    }
    Ok(code)
}
