//! The monitor's own options; everything else goes to llama.cpp's parser untouched.

pub const USAGE: &str = "\
kqv-trace-monitor: run llama.cpp and trace each layer's attention

USAGE:
    kqv-trace-monitor [llama.cpp options] [monitor options]

MONITOR OPTIONS:
    --layer N            trace only layer N (0-based); -1 or absent: all layers
    --no-trace-sources   trace kqv_out only, not the attention op's inputs and output
    --save-gguf FILE     save the trace to FILE (written atomically); `-` writes it to
                         stdout, and the statistics then go to stderr
    --prefill-only       decode the prompt only, no generation
    --verify             recompute each traced attention in f64 from its captured q/k/v/mask
                         as it is traced (no --save-gguf needed) and compare with kqv_out:
                         one verdict line per (step, layer) after its statistics (NMSE, max
                         abs error at (position, head, dim), cosine, bound, ok/FAIL, and for
                         a failure the input that explains it), a summary line at the end;
                         exit 1 if any group failed (bounds: docs/verification.md)
    --json               statistics as JSON Lines (schema: docs/json.md)
    --quiet              no progress line on stderr (it is shown only when stderr is a
                         terminal and the statistics are not: stdout redirected); NO_COLOR
                         turns its colour off
    -v, --verbose        show llama.cpp's log on stderr (default: errors only); also
                         passed to llama.cpp
    -h, --help           this help
    -V, --version        version of the tool and of the pinned llama.cpp

LLAMA.CPP OPTIONS:
    Every other argument is parsed by llama.cpp's own `common_params_parse`, so all of
    llama.cpp's options work: -m -p -f -n -c -b -ub -t -ngl -ctk -ctv -fa on|off|auto
    --seed --temp ... A bare `-fa` (as older scripts write it) means `-fa on`.
    Differences from llama.cpp's tools: -n defaults to 0 (the prompt only); without -c
    the context holds the prompt plus -n tokens (rounded up to 256); no warm-up decode;
    the -fit dry run only with an explicit `-fit on`.

STEPS:
    step 0 is the first ubatch of the prompt; each later llama_decode call (the next
    prompt ubatch, then each generated token) is one more. Every step is traced.

EXIT CODES:
    0  success      1  the run or the save failed, or (--verify) an attention did not
                       verify      2  usage error

EXAMPLES:
    kqv-trace-monitor -m model.gguf -p \"Hello world\" --save-gguf traced_tensors.gguf
    kqv-trace-monitor -m model.gguf -p \"Hello world\" --layer 0 --save-gguf layer0.gguf
    kqv-trace-monitor -m model.gguf -n 4 -p \"Hello, world\" -ctk q4_0 -ctv q4_0 -fa --layer 0
    kqv-trace-monitor -m model.gguf -p \"Hi\" --save-gguf - | gguf-reader -
    kqv-trace-monitor -m model.gguf -p \"Hello world\" -n 4 -fa on --verify
";

/// Where the trace goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SaveTarget {
    Stdout,
    Path(std::path::PathBuf),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    pub layer: Option<i32>,
    pub trace_sources: bool,
    pub save: Option<SaveTarget>,
    pub prefill_only: bool,
    pub json: bool,
    pub verbose: bool,
    /// Verify each (step, layer) while tracing.
    pub verify: bool,
    /// No progress display.
    pub quiet: bool,
    /// Arguments for llama.cpp, in order.
    pub llama_args: Vec<String>,
}

/// What a command line with no monitor options means: all layers, with their inputs,
/// statistics as text, nothing saved.
impl Default for Options {
    fn default() -> Self {
        Options {
            layer: None,
            trace_sources: true,
            save: None,
            prefill_only: false,
            json: false,
            verbose: false,
            verify: false,
            quiet: false,
            llama_args: Vec::new(),
        }
    }
}

#[derive(Debug)]
pub enum Command {
    Run(Options),
    Help,
    Version,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UsageError {
    #[error("{0} needs a value")]
    MissingValue(&'static str),
    #[error("--layer expects a layer number, got '{0}'")]
    BadLayer(String),
    #[error("--verify needs the attention inputs: drop --no-trace-sources")]
    VerifyWithoutSources,
}

/// Split the command line into the monitor's options and llama.cpp's.
pub fn parse(args: Vec<String>) -> Result<Command, UsageError> {
    let mut o = Options::default();
    let mut it = args.into_iter().peekable();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--layer" => {
                let v = it.next().ok_or(UsageError::MissingValue("--layer"))?;
                let n: i32 = v.parse().map_err(|_| UsageError::BadLayer(v.clone()))?;
                o.layer = (n >= 0).then_some(n);
            }
            "--no-trace-sources" => o.trace_sources = false,
            "--save-gguf" => {
                let v = it.next().ok_or(UsageError::MissingValue("--save-gguf"))?;
                o.save = Some(if v == "-" {
                    SaveTarget::Stdout
                } else {
                    SaveTarget::Path(v.into())
                });
            }
            "--prefill-only" => o.prefill_only = true,
            "--json" => o.json = true,
            "--verify" => o.verify = true,
            "--quiet" => o.quiet = true,
            "-v" | "--verbose" | "--log-verbose" => {
                o.verbose = true;
                o.llama_args.push(a);
            }
            "-fa" | "--flash-attn" => {
                o.llama_args.push(a);
                let explicit = it
                    .peek()
                    .is_some_and(|v| matches!(v.as_str(), "on" | "off" | "auto"));
                if !explicit {
                    o.llama_args.push("on".to_owned());
                }
            }
            _ => o.llama_args.push(a),
        }
    }
    if o.verify && !o.trace_sources {
        return Err(UsageError::VerifyWithoutSources);
    }
    Ok(Command::Run(o))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Options {
        match parse(args.iter().map(|s| s.to_string()).collect()) {
            Ok(Command::Run(o)) => o,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn splits_monitor_and_llama_options() {
        let o = run(&[
            "-m",
            "m.gguf",
            "-n",
            "4",
            "-p",
            "Hello, world",
            "-ngl",
            "0",
            "-ctk",
            "q4_0",
            "-fa",
            "-t",
            "12",
            "--layer",
            "0",
            "--save-gguf",
            "out.gguf",
        ]);
        assert_eq!(o.layer, Some(0));
        assert_eq!(o.save, Some(SaveTarget::Path("out.gguf".into())));
        assert_eq!(
            o.llama_args,
            [
                "-m",
                "m.gguf",
                "-n",
                "4",
                "-p",
                "Hello, world",
                "-ngl",
                "0",
                "-ctk",
                "q4_0",
                "-fa",
                "on",
                "-t",
                "12"
            ]
        );
        let o = run(&[
            "-fa",
            "off",
            "--layer",
            "-1",
            "--save-gguf",
            "-",
            "--no-trace-sources",
        ]);
        assert_eq!(o.llama_args, ["-fa", "off"]);
        assert_eq!(o.layer, None);
        assert_eq!(o.save, Some(SaveTarget::Stdout));
        assert!(!o.trace_sources);
        assert_eq!(run(&["--flash-attn"]).llama_args, ["--flash-attn", "on"]);
        let o = run(&["--verify", "-m", "m.gguf"]);
        assert!(o.verify);
        assert_eq!(o.llama_args, ["-m", "m.gguf"]);
        assert!(!run(&["-m", "m.gguf"]).verify);
    }

    #[test]
    fn usage_errors() {
        assert_eq!(
            parse(vec!["--layer".into()]).unwrap_err(),
            UsageError::MissingValue("--layer")
        );
        assert_eq!(
            parse(vec!["--layer".into(), "x".into()]).unwrap_err(),
            UsageError::BadLayer("x".into())
        );
        assert_eq!(
            parse(vec!["--verify".into(), "--no-trace-sources".into()]).unwrap_err(),
            UsageError::VerifyWithoutSources
        );
    }
}
