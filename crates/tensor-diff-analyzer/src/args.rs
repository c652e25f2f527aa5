//! The analyzer's own options. The monitor's options that make sense here (`--layer`,
//! `--no-trace-sources`, `--prefill-only`, `--json`, `-v`, `--save-gguf`, a bare `-fa`)
//! are parsed by `kcm_cli::capture_args::parse`, and every other argument goes to
//! llama.cpp's own parser untouched.

use std::path::PathBuf;

use kcm_cli::capture_args::{self as monitor_args, SaveTarget};

use crate::devices::{DeviceSelection, SelectionError};
use tensor_stats::{Tolerance, ToleranceMode};

pub const USAGE: &str = "\
tensor-diff-analyzer: compare a live llama.cpp run, or a saved trace, with a reference trace

USAGE:
    tensor-diff-analyzer [llama.cpp options] --reference FILE [analysis options]   (live)
    tensor-diff-analyzer --reference FILE --current FILE [analysis options]        (offline)
    tensor-diff-analyzer [llama.cpp options] --compare-devices A B [analysis options]

ANALYSIS OPTIONS:
    --reference FILE        reference trace (kqv-trace-monitor --save-gguf); required
                            unless --compare-devices
    --current FILE          compare this saved trace instead of running llama.cpp
    --map MAP.toml          the reference is a .safetensors file of activations recorded
                            elsewhere (a transformers model with forward hooks:
                            python/record_reference.py; numpy; gguf-reader --export); the
                            map says which traced tensor each of its names is and how its
                            layout becomes ours (docs/reference-import.md). Live, the
                            tokens the file records are replayed and the nodes it maps
                            are traced
    --compare-devices A B   run the llama.cpp options twice, on device selection A (the
                            reference) and on B (replaying A's tokens), each in a process of
                            its own, and compare B with A tensor by tensor; the report says
                            where each side's attention ran and whether the two are
                            bit-identical. A selection, in llama.cpp's --device vocabulary:
                            cpu (or none: nothing offloaded), device names as
                            --list-devices shows them (CUDA0, Vulkan0,Vulkan1), RPC servers
                            as rpc:HOST:PORT[,HOST:PORT...] (their devices become RPC0,
                            RPC1, ...). -ngl, -ts, -sm apply to both sides; --rpc and
                            --device are the selections' (refused beside it). A device the
                            build lacks or a server that is down: one line, exit 2.
                            Not with --reference, --current, --save-gguf, --no-replay,
                            --noise-floor, --noise-reference
    --layer N               compare only layer N (0-based); -1 or absent: every layer the
                            reference holds
    --tolerance-abs F       absolute tolerance (default 1e-6)
    --tolerance-rel F       relative tolerance (default 1e-4)
    --tolerance-mode MODE   elementwise (default): every element |c-r| <= abs + rel*|r|;
                            either: an element fails only if |c-r| > abs and > rel*|r|;
                            mean: mean abs diff <= abs and mean rel diff <= rel
    --max-mismatch PCT      share of elements (percent) allowed outside tolerance (default 0)
    --json                  one JSON document with every comparison (docs/json.md)
    --plot FILE.svg         heatmap of the worst NMSE per layer (rows) and step (columns),
                            out-of-tolerance cells marked; more than 120 steps or 64
                            layers are binned (each cell the worst of its bin)
    --tensor-filter REGEX   also compare graph nodes whose ggml name matches (anchored at
                            its start, as llama.cpp's llama-debug; repeatable; '.' is every
                            node): live, they are traced (slow: the graph stops at each);
                            offline, only the traces' nodes it names are compared (without
                            it, every node both traces hold)
    --include-diverged      also compare the steps from the first one whose inputs differ
                            from the reference's (other tokens: generation diverged; other
                            positions: another ubatch split) on; by default they are listed
                            as \"not compared: inputs differ\" and left out of the verdict
    --noise-floor           live: run the current configuration twice and report the
                            run-to-run difference beside the measured one
    --noise-reference FILE  a second reference (the reference configuration run again):
                            the noise floor is its difference from --reference
    --no-replay             live: decode the prompt given (-p) and this run's own samples
                            instead of the reference's tokens (the default replays them:
                            every step then compares the same computation)
    --logits                live: capture each step's output logits; with a reference that
                            has them (kqv-trace-monitor --logits), report per step the KL
                            divergence of the next-token distributions, top-1 agreement
                            and the reference token's probability change (always on when
                            the reference has logits)
    --no-trace-sources      live: compare kqv_out only
    --prefill-only          live: decode the prompt only
    --save-gguf FILE        live: also save the current run's trace to FILE
    --kv-storage full|delta live, with --save-gguf: how the trace is stored (as
                            kqv-trace-monitor's option; default delta)
    --kv-audit N            live: hash every K/V view whole every N steps (default 16;
                            1: every step), as kqv-trace-monitor's option
    --quiet                 live: no progress line on stderr (shown only when stderr is a
                            terminal; NO_COLOR turns its colour off)
    -v, --verbose           show llama.cpp's log on stderr
    -h, --help              this help
    -V, --version           version of the tool and of the pinned llama.cpp

LLAMA.CPP OPTIONS (live mode):
    Every other argument is parsed by llama.cpp's own `common_params_parse`, as in
    kqv-trace-monitor: -m -p -f -n -c -b -ub -t -ngl -ctk -ctv -fa on|off|auto --seed ...
    --rpc HOST:PORT,... runs it across RPC servers (kcm-rpc-server), e.g. against a
    local CPU reference: each endpoint is checked first (one line, exit 2). The RPC
    protocol has no authentication: keep servers off untrusted networks.
    The reference's prompt and tokens are replayed (no -p or -n needed; -p, when given,
    must be the reference's prompt; -n limits the generated steps replayed). With
    --no-replay, use the reference's prompt and -n: tensors are matched by (role, layer,
    step).

EXIT CODES:
    0  every tensor compared and within tolerance
    1  some tensor outside tolerance, a shape mismatch, or a tensor without counterpart
    2  usage or input error: bad option, unreadable trace, run metadata its tensors
       contradict, a duplicated tensor, different prompt or model shape, nothing or no
       kqv_out compared (also when the inputs differ from the first step on);
       --compare-devices: a side that could not run (a device the build does not have,
       a server down, its run failed)
    Steps whose inputs differ (and every later step) are left out of the verdict unless
    --include-diverged is given.

EXAMPLES:
    kqv-trace-monitor -m model.gguf -n 4 -p \"Hello, world\" --layer 0 --save-gguf base.gguf
    tensor-diff-analyzer -m model.gguf -n 4 -p \"Hello, world\" --reference base.gguf --layer 0
    tensor-diff-analyzer -m model.gguf -p \"Test prompt\" -ctk q4_0 -ctv q4_0 \\
        --reference golden.gguf --tolerance-abs 1e-3
    tensor-diff-analyzer --reference golden.gguf --current q4.gguf --json
    tensor-diff-analyzer -m model.gguf -p \"Hello\" -n 8 --temp 0 -ngl 99 \\
        --compare-devices cpu rpc:127.0.0.1:50052
";

#[derive(Clone, Debug)]
pub struct Options {
    /// The reference trace (empty with `--compare-devices`: side A's trace, made by the
    /// run).
    pub reference: PathBuf,
    /// `--map`: the reference is a safetensors file read through this map.
    pub map: Option<PathBuf>,
    pub current: Option<PathBuf>,
    pub tolerance: Tolerance,
    pub plot: Option<PathBuf>,
    pub noise_floor: bool,
    pub noise_reference: Option<PathBuf>,
    /// `--no-replay`: a live run decodes the prompt given and its own samples instead of
    /// the reference's tokens.
    pub no_replay: bool,
    /// `--include-diverged`: compare the steps from the divergence on as well.
    pub include_diverged: bool,
    /// `--compare-devices A B`: run the configuration on each device selection and
    /// compare B with A (no `--reference`).
    pub compare_devices: Option<[DeviceSelection; 2]>,
    /// `--layer`, `--json`, `-v`, the capture switches and llama.cpp's arguments.
    pub monitor: monitor_args::Options,
}

/// What a command line asks for (options boxed: they are large).
pub type Command = kcm_cli::Command<Box<Options>>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UsageError {
    #[error("{0} needs a value")]
    MissingValue(&'static str),
    #[error("{0} expects a number >= 0, got '{1}'")]
    BadNumber(&'static str, String),
    #[error("--max-mismatch expects a percentage from 0 to 100, got '{0}'")]
    BadPercent(String),
    #[error("--tolerance-mode expects elementwise, either or mean, got '{0}'")]
    BadMode(String),
    #[error("--reference FILE is required")]
    NoReference,
    /// `--map` and a `.safetensors` reference go together.
    #[error("{0}")]
    Map(&'static str),
    #[error("{0}")]
    Monitor(#[from] monitor_args::UsageError),
    #[error("--current compares two saved traces: {0} cannot be used with it")]
    NotOffline(String),
    #[error("--save-gguf - would mix the trace with the summary on stdout: give a file")]
    SaveToStdout,
    /// A kqv-trace-monitor option that means nothing here: refused rather than ignored.
    #[error("{0} is a kqv-trace-monitor option, not an analyzer one: {1}")]
    MonitorOnly(&'static str, &'static str),
    #[error("{0}")]
    NotUtf8(#[from] kcm_cli::tool::NotUtf8),
    #[error("{0}")]
    Devices(#[from] SelectionError),
    /// An option that a `--compare-devices` run sets itself, or that means nothing there.
    #[error("--compare-devices runs both sides itself: {0} cannot be used with it")]
    NotWithDevices(String),
}

/// llama.cpp options that choose devices: with `--compare-devices` each side's selection
/// does that.
const DEVICE_OPTIONS: [&str; 4] = ["--rpc", "-dev", "--device", "--list-devices"];

fn is_device_option(a: &str) -> bool {
    DEVICE_OPTIONS
        .iter()
        .any(|o| a == *o || a.strip_prefix(o).is_some_and(|v| v.starts_with('=')))
}

fn number(flag: &'static str, v: String) -> Result<f64, UsageError> {
    match v.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(UsageError::BadNumber(flag, v)),
    }
}

pub fn parse(args: Vec<String>) -> Result<Command, UsageError> {
    let mut reference = None;
    let mut map = None;
    let mut current = None;
    let mut tol = Tolerance::default();
    let mut plot = None;
    let mut noise_floor = false;
    let mut noise_reference = None;
    let mut no_replay = false;
    let mut include_diverged = false;
    let mut compare_devices = None;
    let mut rest = Vec::new();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut value = |flag: &'static str| it.next().ok_or(UsageError::MissingValue(flag));
        match a.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--reference" => reference = Some(PathBuf::from(value("--reference")?)),
            "--current" => current = Some(PathBuf::from(value("--current")?)),
            "--map" => map = Some(PathBuf::from(value("--map")?)),
            "--tolerance-abs" => tol.abs = number("--tolerance-abs", value("--tolerance-abs")?)?,
            "--tolerance-rel" => tol.rel = number("--tolerance-rel", value("--tolerance-rel")?)?,
            "--tolerance-mode" => {
                let v = value("--tolerance-mode")?;
                tol.mode = ToleranceMode::from_name(&v).ok_or(UsageError::BadMode(v))?;
            }
            "--max-mismatch" => {
                let v = value("--max-mismatch")?;
                tol.max_mismatch_pct = match v.trim_end_matches('%').parse::<f64>() {
                    Ok(x) if (0.0..=100.0).contains(&x) => x,
                    _ => return Err(UsageError::BadPercent(v)),
                };
            }
            // The monitor's parser would accept it and the analyzer would ignore it; refused
            // here, before that parser can reject it with a monitor-specific message.
            "--verify" => {
                return Err(UsageError::MonitorOnly(
                    "--verify",
                    "run kqv-trace-monitor --verify, or gguf-reader --verify-attention on a trace",
                ))
            }
            "--plot" => plot = Some(PathBuf::from(value("--plot")?)),
            "--no-replay" => no_replay = true,
            "--replay" => {
                return Err(UsageError::MonitorOnly(
                    "--replay",
                    "a live analyzer replays the reference's tokens by default",
                ))
            }
            "--noise-floor" => noise_floor = true,
            "--compare-devices" => {
                let a = value("--compare-devices")?;
                let b = it.next().ok_or(UsageError::MissingValue(
                    "--compare-devices (two selections)",
                ))?;
                compare_devices = Some([DeviceSelection::parse(&a)?, DeviceSelection::parse(&b)?]);
            }
            "--include-diverged" => include_diverged = true,
            "--noise-reference" => {
                noise_reference = Some(PathBuf::from(value("--noise-reference")?))
            }
            _ => rest.push(a),
        }
    }
    let monitor = match monitor_args::parse(rest)? {
        kcm_cli::Command::Run(o) => o,
        kcm_cli::Command::Help => return Ok(Command::Help),
        kcm_cli::Command::Version => return Ok(Command::Version),
    };
    if compare_devices.is_some() {
        let conflicts = [
            (
                reference.is_some(),
                "--reference (side A's run is the reference)",
            ),
            (current.is_some(), "--current"),
            (map.is_some(), "--map"),
            (noise_floor, "--noise-floor"),
            (noise_reference.is_some(), "--noise-reference"),
            (monitor.save.is_some(), "--save-gguf"),
            (no_replay, "--no-replay (side B replays side A's tokens)"),
        ];
        if let Some((_, what)) = conflicts.iter().find(|(used, _)| *used) {
            return Err(UsageError::NotWithDevices((*what).to_owned()));
        }
        if let Some(a) = monitor.llama_args.iter().find(|a| is_device_option(a)) {
            return Err(UsageError::NotWithDevices(format!(
                "{} (each side's devices are its selection)",
                a.split('=').next().unwrap_or(a)
            )));
        }
    }
    let reference = match (reference, &compare_devices) {
        (Some(r), _) => r,
        (None, Some(_)) => PathBuf::new(),
        (None, None) => return Err(UsageError::NoReference),
    };
    if monitor.save == Some(SaveTarget::Stdout) {
        return Err(UsageError::SaveToStdout);
    }
    let safetensors = reference
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    match (safetensors, map.is_some()) {
        (true, false) => {
            return Err(UsageError::Map(
                "a .safetensors reference needs --map MAP.toml (which traced tensor each of \
                 its names is: docs/reference-import.md)",
            ))
        }
        (false, true) if compare_devices.is_none() => {
            return Err(UsageError::Map(
                "--map reads a .safetensors reference; this --reference is a trace (no map \
                 needed)",
            ))
        }
        _ => {}
    }
    if current.is_some() {
        let live_only = [
            (!monitor.llama_args.is_empty(), "llama.cpp options"),
            (noise_floor, "--noise-floor (use --noise-reference FILE)"),
            (monitor.save.is_some(), "--save-gguf"),
            (monitor.prefill_only, "--prefill-only"),
            (!monitor.trace_sources, "--no-trace-sources"),
            (no_replay, "--no-replay"),
            (
                monitor.logits,
                "--logits (offline, the logits the traces hold are compared)",
            ),
        ];
        if let Some((_, what)) = live_only.iter().find(|(used, _)| *used) {
            let what = if *what == "llama.cpp options" {
                format!("llama.cpp options ({})", monitor.llama_args.join(" "))
            } else {
                (*what).to_owned()
            };
            return Err(UsageError::NotOffline(what));
        }
    }
    Ok(Command::Run(Box::new(Options {
        reference,
        map,
        current,
        tolerance: tol,
        plot,
        noise_floor,
        noise_reference,
        no_replay,
        include_diverged,
        compare_devices,
        monitor,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn run(v: &[&str]) -> Options {
        match parse(args(v)) {
            Ok(Command::Run(o)) => *o,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn own_options_and_llama_options_are_split() {
        let o = run(&[
            "-m",
            "m.gguf",
            "-p",
            "Hello",
            "-ctk",
            "q4_0",
            "-fa",
            "--reference",
            "golden.gguf",
            "--tolerance-abs",
            "1e-3",
            "--layer",
            "0",
            "--max-mismatch",
            "0.5%",
            "--tolerance-mode",
            "either",
        ]);
        assert_eq!(o.reference, PathBuf::from("golden.gguf"));
        assert_eq!(o.tolerance.abs, 1e-3);
        assert_eq!(o.tolerance.rel, 1e-4);
        assert_eq!(o.tolerance.mode, ToleranceMode::Either);
        assert_eq!(o.tolerance.max_mismatch_pct, 0.5);
        assert_eq!(o.monitor.layer, Some(0));
        assert_eq!(
            o.monitor.llama_args,
            ["-m", "m.gguf", "-p", "Hello", "-ctk", "q4_0", "-fa", "on"]
        );
        let o = run(&["--reference", "a", "--current", "b", "--json"]);
        assert_eq!(o.current, Some(PathBuf::from("b")));
        assert!(o.monitor.json);
        assert!(!o.include_diverged);
        // Offline and live alike; not passed on to llama.cpp.
        let o = run(&["--reference", "a", "--current", "b", "--include-diverged"]);
        assert!(o.include_diverged);
        let o = run(&["-m", "m.gguf", "--include-diverged", "--reference", "a"]);
        assert!(o.include_diverged);
        assert_eq!(o.monitor.llama_args, ["-m", "m.gguf"]);
    }

    #[test]
    fn usage_errors() {
        let e = |v: &[&str]| parse(args(v)).unwrap_err();
        assert_eq!(e(&["-m", "x"]), UsageError::NoReference);
        assert_eq!(e(&["--reference"]), UsageError::MissingValue("--reference"));
        assert_eq!(
            e(&["--reference", "a", "--tolerance-abs", "-1"]),
            UsageError::BadNumber("--tolerance-abs", "-1".into())
        );
        assert_eq!(
            e(&["--reference", "a", "--tolerance-rel", "nan"]),
            UsageError::BadNumber("--tolerance-rel", "nan".into())
        );
        assert_eq!(
            e(&["--reference", "a", "--max-mismatch", "101"]),
            UsageError::BadPercent("101".into())
        );
        assert_eq!(
            e(&["--reference", "a", "--tolerance-mode", "max"]),
            UsageError::BadMode("max".into())
        );
        assert!(matches!(
            e(&["--reference", "a", "--current", "b", "-m", "x"]),
            UsageError::NotOffline(_)
        ));
        assert!(matches!(
            e(&["--reference", "a", "--current", "b", "--noise-floor"]),
            UsageError::NotOffline(_)
        ));
        assert_eq!(
            e(&["--reference", "a", "--save-gguf", "-"]),
            UsageError::SaveToStdout
        );
        assert!(matches!(
            e(&["--reference", "a", "--layer", "x"]),
            UsageError::Monitor(_)
        ));
    }

    #[test]
    fn compare_devices_takes_two_selections_and_no_reference() {
        let o = run(&[
            "-m",
            "m.gguf",
            "-ngl",
            "99",
            "--compare-devices",
            "cpu",
            "rpc:127.0.0.1:50052",
            "--layer",
            "1",
        ]);
        let [a, b] = o.compare_devices.expect("two sides");
        assert!(a.is_cpu());
        assert_eq!(b.endpoints(), ["127.0.0.1:50052"]);
        assert_eq!(o.monitor.llama_args, ["-m", "m.gguf", "-ngl", "99"]);
        assert_eq!(o.monitor.layer, Some(1));
        let e = |v: &[&str]| parse(args(v)).unwrap_err();
        assert_eq!(
            e(&["-m", "x", "--compare-devices", "cpu"]),
            UsageError::MissingValue("--compare-devices (two selections)")
        );
        assert!(matches!(
            e(&["-m", "x", "--compare-devices", "cpu", "h:1"]),
            UsageError::Devices(_)
        ));
        for extra in [
            &["--reference", "r.gguf"][..],
            &["--current", "c.gguf"],
            &["--noise-floor"],
            &["--noise-reference", "n.gguf"],
            &["--save-gguf", "s.gguf"],
            &["--no-replay"],
            &["--rpc", "h:1"],
            &["--rpc=h:1"],
            &["-dev", "none"],
            &["--device=CUDA0"],
            &["--list-devices"],
        ] {
            let mut v = vec!["-m", "x", "--compare-devices", "cpu", "cpu"];
            v.extend_from_slice(extra);
            assert!(
                matches!(e(&v), UsageError::NotWithDevices(_)),
                "{extra:?}: {:?}",
                e(&v)
            );
        }
        // Without --compare-devices the device options are llama.cpp's, as before.
        let o = run(&["-m", "x", "--rpc", "h:1", "--reference", "r"]);
        assert_eq!(o.monitor.llama_args, ["-m", "x", "--rpc", "h:1"]);
        assert!(o.compare_devices.is_none());
    }

    #[test]
    fn a_safetensors_reference_and_map_go_together() {
        let o = run(&[
            "--reference",
            "r.safetensors",
            "--map",
            "m.toml",
            "--current",
            "c",
        ]);
        assert_eq!(o.map, Some(PathBuf::from("m.toml")));
        let o = run(&["-m", "x", "--reference", "R.SafeTensors", "--map", "m.toml"]);
        assert_eq!(o.monitor.llama_args, ["-m", "x"]);
        let e = |v: &[&str]| parse(args(v)).unwrap_err();
        assert!(matches!(
            e(&["--reference", "r.safetensors", "--current", "c"]),
            UsageError::Map(_)
        ));
        assert!(matches!(
            e(&["--reference", "r.gguf", "--map", "m.toml"]),
            UsageError::Map(_)
        ));
        assert_eq!(
            e(&["--reference", "r.safetensors", "--map"]),
            UsageError::MissingValue("--map")
        );
        assert!(matches!(
            e(&[
                "-m",
                "x",
                "--compare-devices",
                "cpu",
                "cpu",
                "--map",
                "m.toml"
            ]),
            UsageError::NotWithDevices(_)
        ));
    }

    #[test]
    fn the_monitors_verify_flag_is_refused() {
        let e = |v: &[&str]| parse(args(v)).unwrap_err();
        for v in [
            &["--reference", "a", "--current", "b", "--verify"][..],
            &["-m", "m.gguf", "--verify", "--reference", "a"],
            &["--verify", "--no-trace-sources", "--reference", "a"],
        ] {
            let err = e(v);
            assert!(
                matches!(err, UsageError::MonitorOnly("--verify", _)),
                "{v:?}: {err:?}"
            );
            assert!(err.to_string().contains("kqv-trace-monitor --verify"));
        }
    }
}
