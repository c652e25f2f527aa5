//! The capture's own options (`kqv-trace-monitor`'s, and the analyzer's live mode);
//! everything else goes to llama.cpp's parser untouched.

pub use crate::tool::Command;

/// Where the trace goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SaveTarget {
    Stdout,
    Path(std::path::PathBuf),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    pub layer: Option<i32>,
    /// `--from-step N`: trace steps N and later only (the earlier ones run untraced).
    pub from_step: u32,
    pub trace_sources: bool,
    pub save: Option<SaveTarget>,
    pub prefill_only: bool,
    pub json: bool,
    pub verbose: bool,
    /// Verify each (step, layer) while tracing.
    pub verify: bool,
    /// No progress display.
    pub quiet: bool,
    /// `--logits`: capture each step's output logits (saved with the trace).
    pub logits: bool,
    /// `--replay TRACE`: decode exactly that trace's steps and tokens.
    pub replay: Option<std::path::PathBuf>,
    /// `--kv-storage full|delta`: how a saved trace stores its tensors (version 1 or 2).
    pub kv_storage: trace_format::KvStorage,
    /// `--kv-audit N`: hash every kept K/V view whole every N steps (1: every step, no
    /// write tracking); between audits the capture reads only what the graph wrote.
    pub kv_audit: u32,
    /// `--tensor-filter REGEX` (repeatable): graph nodes to trace besides attention, by
    /// name (anchored at its start, as llama.cpp's `llama-debug`), role `node`; empty:
    /// attention only.
    pub tensor_filter: Vec<String>,
    /// Arguments for llama.cpp, in order.
    pub llama_args: Vec<String>,
}

/// What a command line with no monitor options means: all layers, with their inputs,
/// statistics as text, nothing saved.
impl Default for Options {
    fn default() -> Self {
        Options {
            layer: None,
            from_step: 0,
            trace_sources: true,
            save: None,
            prefill_only: false,
            json: false,
            verbose: false,
            verify: false,
            quiet: false,
            logits: false,
            replay: None,
            kv_storage: trace_format::KvStorage::default(),
            kv_audit: ggml_trace::capture::DEFAULT_KV_AUDIT,
            tensor_filter: Vec::new(),
            llama_args: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UsageError {
    #[error("{0} needs a value")]
    MissingValue(&'static str),
    #[error("--layer expects a layer number, got '{0}'")]
    BadLayer(String),
    #[error("--from-step expects a step number (0 or more), got '{0}'")]
    BadStep(String),
    #[error("--kv-storage expects full or delta, got '{0}'")]
    BadStorage(String),
    #[error("--kv-audit expects a step count of 1 or more, got '{0}'")]
    BadAudit(String),
    #[error("{0}")]
    BadFilter(#[from] ggml_trace::capture::FilterError),
    #[error("--verify needs the attention inputs: drop --no-trace-sources")]
    VerifyWithoutSources,
    #[error("{0}")]
    NotUtf8(#[from] crate::tool::NotUtf8),
}

impl Options {
    /// The compiled `--tensor-filter` patterns, None when there are none.
    pub fn node_filter(&self) -> Option<std::sync::Arc<ggml_trace::capture::NodeFilter>> {
        if self.tensor_filter.is_empty() {
            return None;
        }
        // Each pattern was checked when parsed.
        ggml_trace::capture::NodeFilter::new(&self.tensor_filter)
            .ok()
            .map(std::sync::Arc::new)
    }
}

/// Split the command line into the monitor's options and llama.cpp's.
pub fn parse(args: Vec<String>) -> Result<Command<Options>, UsageError> {
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
            "--from-step" => {
                let v = it.next().ok_or(UsageError::MissingValue("--from-step"))?;
                o.from_step = v.parse().map_err(|_| UsageError::BadStep(v.clone()))?;
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
            "--logits" => o.logits = true,
            "--replay" => {
                let v = it.next().ok_or(UsageError::MissingValue("--replay"))?;
                o.replay = Some(v.into());
            }
            "--kv-storage" => {
                let v = it.next().ok_or(UsageError::MissingValue("--kv-storage"))?;
                o.kv_storage =
                    trace_format::KvStorage::from_name(&v).ok_or(UsageError::BadStorage(v))?;
            }
            "--kv-audit" => {
                let v = it.next().ok_or(UsageError::MissingValue("--kv-audit"))?;
                o.kv_audit = v
                    .parse()
                    .ok()
                    .filter(|&n: &u32| n >= 1)
                    .ok_or(UsageError::BadAudit(v))?;
            }
            "--tensor-filter" => {
                let v = it
                    .next()
                    .ok_or(UsageError::MissingValue("--tensor-filter"))?;
                // Checked here, so a bad pattern is a usage error before anything loads.
                ggml_trace::capture::NodeFilter::new(std::slice::from_ref(&v))?;
                o.tensor_filter.push(v);
            }
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
        assert_eq!(
            run(&["-m", "m.gguf"]).kv_storage,
            trace_format::KvStorage::Delta
        );
        let o = run(&["--kv-storage", "full", "-m", "m.gguf"]);
        assert_eq!(o.kv_storage, trace_format::KvStorage::Full);
        assert_eq!(o.llama_args, ["-m", "m.gguf"]);
        assert_eq!(run(&["-m", "m.gguf"]).kv_audit, 16);
        assert_eq!(run(&["--kv-audit", "1", "-m", "m.gguf"]).kv_audit, 1);
        assert!(run(&["-m", "m.gguf"]).tensor_filter.is_empty());
        let o = run(&[
            "--tensor-filter",
            "ffn_out",
            "-m",
            "m.gguf",
            "--tensor-filter",
            ".",
        ]);
        assert_eq!(o.tensor_filter, ["ffn_out", "."]);
        assert_eq!(o.llama_args, ["-m", "m.gguf"]);
        assert!(o.node_filter().unwrap().matches("ffn_out-3"));
        assert!(run(&["-m", "m.gguf"]).node_filter().is_none());
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
            parse(vec!["--kv-storage".into(), "v1".into()]).unwrap_err(),
            UsageError::BadStorage("v1".into())
        );
        for bad in ["0", "-3", "x"] {
            assert_eq!(
                parse(vec!["--kv-audit".into(), bad.into()]).unwrap_err(),
                UsageError::BadAudit(bad.into())
            );
        }
        assert_eq!(
            parse(vec!["--tensor-filter".into()]).unwrap_err(),
            UsageError::MissingValue("--tensor-filter")
        );
        let e = parse(vec!["--tensor-filter".into(), "ffn_(".into()]).unwrap_err();
        assert!(
            matches!(&e, UsageError::BadFilter(f) if f.pattern == "ffn_("),
            "{e:?}"
        );
        assert!(e
            .to_string()
            .starts_with("--tensor-filter: invalid regex 'ffn_('"));
        assert_eq!(
            parse(vec!["--verify".into(), "--no-trace-sources".into()]).unwrap_err(),
            UsageError::VerifyWithoutSources
        );
    }
}
