//! Command-line options of `gguf-reader`.

use std::ffi::OsString;

use regex::Regex;

pub const USAGE: &str = "\
gguf-reader: inspect a GGUF file (a kv-cache-monitor trace or a model)

USAGE:
    gguf-reader <FILE|-> [OPTIONS]

    FILE             path of a GGUF file; `-` reads it from standard input (a pipe)

OPTIONS:
    --show-data      per tensor: the first N values (dequantized whatever the type) and
                     mean, std, min, max, NaN and Inf counts over the whole tensor
    --count N        how many values --show-data prints per tensor [default: 10]
    --tensor REGEX   only tensors whose name matches REGEX (Rust regex syntax)
    --json           one JSON document on stdout instead of text (schema: docs/json.md)
    --full-arrays    print metadata arrays in full [default: first 8 elements and the count]
    --verify-attention
                     for a kv-cache-monitor trace: recompute every traced attention in f64
                     from its traced q/k/v/mask (with the recorded layouts) and compare with
                     its kqv_out: per (step, layer) NMSE, max abs error at (position,
                     head, dim), cosine and a verdict against the bound of its KV type
                     (docs/verification.md); for a group that fails, the input that
                     explains it (the tensor named, and the mistake: wrong read order,
                     permuted heads, transposed V, shifted mask rows, stale data, wrong
                     scale); attn, kq and kq_soft_max checked against what they
                     are documented to equal; a group the trace contradicts itself
                     about, or one over the work budget, is a \"malformed\" row and the
                     others are still checked; a summary line; exit codes below
    --shapes         for a kv-cache-monitor trace: per (step, layer) each traced tensor's
                     role, type, ne, original nb (the strides it had in ggml), memory
                     order (dims by increasing stride) and layout; alone or with
                     --verify-attention (then under each group's verdict)
    --max-work N     with --verify-attention: refuse a group whose recomputation takes
                     more than N multiply-adds (heads x tokens x cells x (D_k + D_v),
                     twice when the kernel is modelled: faithful and exact references)
                     [default: 8589934592]; a failed group's diagnosis may spend 128x
    --materialize OUT
                     for a kv-cache-monitor trace: write OUT as a format-version-1 trace
                     (every tensor whole, each rebuilt from the deltas of a version-2
                     trace; a version-1 trace is copied as is), for tools that read the
                     GGUF tensors directly
    --export FILE.safetensors
                     for a kv-cache-monitor trace: write every traced tensor (and logits
                     row) to a safetensors file, named step{S}/layer{L}/{role} (logits:
                     step{S}/logits; nodes: step{S}/{ggml name}), in logical layout (shape: ggml's ne reversed, numpy
                     order), dequantized to F32; the trace's metadata and a per-tensor
                     table as safetensors metadata (docs/trace-format.md, \"Export\")
    --export FILE.npz
                     the same as numpy's savez (np.load), F32; the metadata as the
                     UTF-8 JSON bytes of a uint8 array __metadata__
    --export-raw     with --export FILE.safetensors: F32/F16/BF16 tensors as they are,
                     quantized ones as their raw blocks (U8, the row in bytes last)
    --step N         with --verify-attention / --shapes: only step N
    --layer N        with --verify-attention / --shapes: only layer N
    -h, --help       print this help
    -V, --version    print the version

EXIT CODES:
    0  success (with --verify-attention: every group verified)
    1  bad input (unreadable or malformed GGUF); with --verify-attention: some group
       failed (and every group could be checked)
    2  usage error; with --verify-attention / --shapes: the trace cannot be checked:
       unreadable, not a trace, malformed (its metadata and tensors contradict each
       other), a group malformed or over --max-work, inputs missing (stderr says which
       and how to re-trace), or no group matches --step/--layer; stderr has one line

EXAMPLES:
    gguf-reader traced_tensors.gguf --show-data
    gguf-reader model.gguf --tensor 'blk\\.0\\.' --show-data --count 4
    kqv-trace-monitor -m model.gguf -p \"Hello\" --save-gguf - | gguf-reader -
    gguf-reader trace.gguf --verify-attention --shapes --step 1 --layer 0
    gguf-reader trace.gguf --materialize trace-v1.gguf
    gguf-reader trace.gguf --export trace.safetensors
";

/// Where the GGUF comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    Stdin,
    Path(std::path::PathBuf),
}

impl Input {
    pub fn display(&self) -> String {
        match self {
            Input::Stdin => "<stdin>".to_owned(),
            Input::Path(p) => p.display().to_string(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    pub input: Input,
    pub show_data: bool,
    pub count: usize,
    pub tensor_filter: Option<Regex>,
    pub json: bool,
    pub full_arrays: bool,
    pub verify: bool,
    pub shapes: bool,
    pub step: Option<u32>,
    pub layer: Option<i32>,
    /// `--max-work`: the work budget of one group's recomputation.
    pub max_work: u64,
    /// `--materialize OUT`: write a version-1 copy of the trace.
    pub materialize: Option<std::path::PathBuf>,
    /// `--export FILE.safetensors`: write the traced tensors for Python.
    pub export: Option<std::path::PathBuf>,
    /// `--export-raw`: keep F16/BF16 and quantized blocks as they are.
    pub export_raw: bool,
}

/// What the command line asks for.
pub type Command = kcm_cli::Command<Options>;

#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("{0}")]
    Args(#[from] pico_args::Error),
    #[error("missing input: give a GGUF file path or `-` for stdin")]
    MissingInput,
    #[error("unexpected argument '{0}'")]
    Unexpected(String),
    #[error("{0} needs {1}")]
    Requires(&'static str, &'static str),
    #[error("--tensor: invalid regex '{pattern}': {problem}")]
    BadRegex { pattern: String, problem: String },
}

pub fn parse(args: Vec<OsString>) -> Result<Command, UsageError> {
    let mut p = pico_args::Arguments::from_vec(args);
    if p.contains(["-h", "--help"]) {
        return Ok(Command::Help);
    }
    if p.contains(["-V", "--version"]) {
        return Ok(Command::Version);
    }
    let show_data = p.contains("--show-data");
    let json = p.contains("--json");
    let full_arrays = p.contains("--full-arrays");
    let verify = p.contains("--verify-attention");
    let shapes = p.contains("--shapes");
    let step = p.opt_value_from_fn("--step", |s| {
        s.parse::<u32>()
            .map_err(|_| "--step expects a step number".to_owned())
    })?;
    let layer = p.opt_value_from_fn("--layer", |s| {
        s.parse::<i32>()
            .map_err(|_| "--layer expects a layer number".to_owned())
    })?;
    let max_work = p
        .opt_value_from_fn("--max-work", |s| {
            s.parse::<u64>()
                .map_err(|_| "--max-work expects a whole number of multiply-adds".to_owned())
        })?
        .unwrap_or(attn_verify::DEFAULT_MAX_WORK);
    let materialize = p.opt_value_from_os_str("--materialize", |s| {
        Ok::<_, String>(std::path::PathBuf::from(s))
    })?;
    let export =
        p.opt_value_from_os_str("--export", |s| Ok::<_, String>(std::path::PathBuf::from(s)))?;
    let export_raw = p.contains("--export-raw");
    if export_raw && export.is_none() {
        return Err(UsageError::Requires("--export-raw", "--export"));
    }
    let count = p
        .opt_value_from_fn("--count", |s| {
            s.parse::<usize>()
                .map_err(|_| "--count expects a whole number".to_owned())
        })?
        .unwrap_or(10);
    let tensor_filter = p
        .opt_value_from_str::<_, String>("--tensor")?
        .map(|s| {
            Regex::new(&s).map_err(|e| {
                // regex's message spans lines (pattern, caret, problem): keep the problem.
                let text = e.to_string();
                let problem = text.lines().last().unwrap_or_default().trim();
                UsageError::BadRegex {
                    problem: problem.trim_start_matches("error: ").to_owned(),
                    pattern: s.clone(),
                }
            })
        })
        .transpose()?;
    let mut rest = p.finish().into_iter();
    let input = match rest.next() {
        None => return Err(UsageError::MissingInput),
        Some(a) if a == "-" => Input::Stdin,
        Some(a) => {
            let s = a.to_string_lossy();
            if s.starts_with('-') && s.len() > 1 {
                return Err(UsageError::Unexpected(s.into_owned()));
            }
            Input::Path(a.into())
        }
    };
    if let Some(extra) = rest.next() {
        return Err(UsageError::Unexpected(extra.to_string_lossy().into_owned()));
    }
    Ok(Command::Run(Options {
        input,
        show_data,
        count,
        tensor_filter,
        json,
        full_arrays,
        verify,
        shapes,
        step,
        layer,
        max_work,
        materialize,
        export,
        export_raw,
    }))
}
