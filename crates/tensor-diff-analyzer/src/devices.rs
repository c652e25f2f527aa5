//! `--compare-devices A B`: the same configuration run twice, once on each device
//! selection, and the two traces compared tensor by tensor (docs/diff.md, "Comparing
//! devices").
//!
//! llama.cpp keeps its backends in process-global state (the device registry, the RPC
//! servers `--rpc` registered, each backend's threads), so the two runs are two child
//! processes: this binary again, started with the internal first argument
//! [`SIDE_ARG`], which makes it run the monitor's capture (`kcm_cli::trace::run`) and
//! save the side's trace in a temporary directory. Side A decodes the prompt (and
//! samples); side B replays side A's trace (its prompt in the same ubatches, then its
//! tokens one per step), so both compute the same thing at every step. This process then
//! compares the two traces as `--reference A --current B` would, and removes them.
//!
//! A selection is written in llama.cpp's `--device` vocabulary (`--list-devices` names
//! the devices): `cpu` (or llama.cpp's `none`: nothing offloaded), a comma-separated list
//! of device names (`CUDA0`, `Vulkan0,Vulkan1`), and RPC servers as `rpc:HOST:PORT`
//! (later endpoints of the same list may drop the `rpc:`). A server's devices get the
//! names llama.cpp gives them (`RPC0`, `RPC1`, ... in list order), learnt by asking each
//! server its device count before the side starts.

use std::ffi::OsString;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};

use kcm_cli::capture_args::{self, Options as CaptureOptions};
use kcm_cli::tool::{utf8_args, Tool};

use crate::args::Options;
use crate::AnalyzerError;

/// The internal first argument of a side's child process (never typed by a user).
pub const SIDE_ARG: &str = "--compare-devices-side";

/// llama.cpp's environment variable for `--device` (the children do not see it, nor
/// `LLAMA_ARG_RPC`: each side's devices are its selection's).
pub const DEVICE_ENV: &str = "LLAMA_ARG_DEVICE";

/// One item of a selection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// An RPC server, `host:port`.
    Rpc(String),
    /// A llama.cpp device name (`CUDA0`, `Vulkan1`, `RPC0` of a server given elsewhere).
    Device(String),
}

/// One side's devices, as written on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSelection {
    /// As given (for the report).
    pub text: String,
    /// Empty: `cpu` (llama.cpp's `--device none`, nothing offloaded).
    pub items: Vec<Item>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--compare-devices {text:?}: {why}")]
pub struct SelectionError {
    pub text: String,
    pub why: String,
}

fn is_cpu(item: &str) -> bool {
    item.eq_ignore_ascii_case("cpu") || item == "none"
}

/// `host:port` with a non-empty host and a port number (ggml-rpc's own split: the host
/// up to the first colon).
fn endpoint_ok(e: &str) -> bool {
    e.split_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
}

impl DeviceSelection {
    pub fn parse(text: &str) -> Result<Self, SelectionError> {
        let bad = |why: String| SelectionError {
            text: text.to_owned(),
            why,
        };
        let t = text.trim();
        if t.is_empty() {
            return Err(bad(
                "an empty device selection (cpu, device names as --list-devices shows them, \
                 or rpc:HOST:PORT)"
                    .into(),
            ));
        }
        if is_cpu(t) {
            return Ok(Self {
                text: t.to_owned(),
                items: Vec::new(),
            });
        }
        let mut items = Vec::new();
        let mut in_rpc = false;
        for raw in t.split(',') {
            let item = raw.trim();
            if item.is_empty() {
                return Err(bad("an empty item in the list".into()));
            }
            if is_cpu(item) {
                return Err(bad(format!(
                    "{item} stands alone (it means nothing offloaded; what a device list does \
                     not take runs on the CPU anyway)"
                )));
            }
            let endpoint = match item.strip_prefix("rpc:") {
                Some(e) => Some(e),
                None if item.contains(':') && in_rpc => Some(item),
                None if item.contains(':') => {
                    return Err(bad(format!(
                        "{item}: an RPC server is written rpc:HOST:PORT"
                    )))
                }
                None => None,
            };
            match endpoint {
                Some(e) => {
                    if !endpoint_ok(e) {
                        return Err(bad(format!("rpc:{e}: not HOST:PORT")));
                    }
                    if items.contains(&Item::Rpc(e.to_owned())) {
                        return Err(bad(format!("rpc:{e} is given twice")));
                    }
                    in_rpc = true;
                    items.push(Item::Rpc(e.to_owned()));
                }
                None => {
                    if !item
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
                    {
                        return Err(bad(format!(
                            "{item:?} is not a device name (as --list-devices shows them)"
                        )));
                    }
                    in_rpc = false;
                    items.push(Item::Device(item.to_owned()));
                }
            }
        }
        Ok(Self {
            text: t.to_owned(),
            items,
        })
    }

    /// Nothing offloaded.
    pub fn is_cpu(&self) -> bool {
        self.items.is_empty()
    }

    /// The RPC servers, in order.
    pub fn endpoints(&self) -> Vec<&str> {
        self.items
            .iter()
            .filter_map(|i| match i {
                Item::Rpc(e) => Some(e.as_str()),
                Item::Device(_) => None,
            })
            .collect()
    }

    /// The llama.cpp options that select these devices, given how many devices each of
    /// [`Self::endpoints`] serves (llama.cpp names them `RPC0`, `RPC1`, ... in order).
    pub fn llama_args(&self, device_counts: &[u32]) -> Vec<String> {
        if self.is_cpu() {
            return vec!["-dev".into(), "none".into()];
        }
        let mut args = Vec::new();
        let endpoints = self.endpoints();
        if !endpoints.is_empty() {
            args.push("--rpc".into());
            args.push(endpoints.join(","));
        }
        let (mut names, mut next, mut server) = (Vec::new(), 0u32, 0usize);
        for item in &self.items {
            match item {
                Item::Device(d) => names.push(d.clone()),
                Item::Rpc(_) => {
                    let n = device_counts.get(server).copied().unwrap_or(1);
                    server += 1;
                    for _ in 0..n {
                        names.push(format!("RPC{next}"));
                        next += 1;
                    }
                }
            }
        }
        args.push("-dev".into());
        args.push(names.join(","));
        args
    }
}

/// What the report says about one side.
#[derive(Clone, Debug)]
pub struct Side {
    /// `A` (the reference) or `B` (the current run).
    pub name: &'static str,
    pub selection: String,
    /// The llama.cpp options the selection became.
    pub llama_args: Vec<String>,
    /// Which backend ran each layer's attention (from the side's trace), e.g.
    /// `RPC0[127.0.0.1:50052] (layers 0-3)`.
    pub backends: String,
}

/// The capture options a side's child gets: the user's (layer, sources, logits, ...),
/// with the side's trace saved to `save`, no progress line, and side B replaying A.
fn side_args(
    opts: &Options,
    devices: &[String],
    save: &Path,
    replay: Option<&Path>,
) -> Vec<String> {
    let m: &CaptureOptions = &opts.monitor;
    let mut a = m.llama_args.clone();
    a.extend(devices.iter().cloned());
    if let Some(l) = m.layer {
        a.extend(["--layer".into(), l.to_string()]);
    }
    if !m.trace_sources {
        a.push("--no-trace-sources".into());
    }
    if m.prefill_only {
        a.push("--prefill-only".into());
    }
    if m.logits {
        a.push("--logits".into());
    }
    if m.kv_audit != ggml_trace::capture::DEFAULT_KV_AUDIT {
        a.extend(["--kv-audit".into(), m.kv_audit.to_string()]);
    }
    a.extend([
        "--quiet".into(),
        "--save-gguf".into(),
        save.display().to_string(),
    ]);
    if let Some(r) = replay {
        a.extend(["--replay".into(), r.display().to_string()]);
    }
    a
}

/// A child's error line without the tool's name (its own `main` prefixes it).
fn reason(line: &str) -> &str {
    ["tensor-diff-analyzer: ", "kqv-trace-monitor: "]
        .iter()
        .find_map(|p| line.strip_prefix(p))
        .unwrap_or(line)
}

/// Runs one side: its devices resolved (each RPC server asked its device count), the
/// child started, its trace saved at `save`. Err: one line, nothing concluded.
pub fn run_side(
    opts: &Options,
    name: &'static str,
    sel: &DeviceSelection,
    save: &Path,
    replay: Option<&Path>,
) -> Result<Vec<String>, AnalyzerError> {
    let failed = |why: String| AnalyzerError::Side {
        side: name,
        selection: sel.text.clone(),
        why,
    };
    // A device name llama.cpp would reject (with its usage text): one line here instead.
    let local = ggml_trace::rpc::local_devices();
    for item in &sel.items {
        if let Item::Device(d) = item {
            if !local.contains(d) {
                let have = if local.is_empty() {
                    "this build has none besides the CPU".to_owned()
                } else {
                    format!("this build has {}", local.join(", "))
                };
                return Err(failed(format!(
                    "no device {d} ({have}; an RPC server is written rpc:HOST:PORT)"
                )));
            }
        }
    }
    let mut counts = Vec::new();
    for e in sel.endpoints() {
        match ggml_trace::rpc::device_count(e) {
            Ok(0) => return Err(failed(format!("--rpc {e}: the server serves no device"))),
            Ok(n) => counts.push(n),
            Err(err) => return Err(failed(err.to_string())),
        }
    }
    let devices = sel.llama_args(&counts);
    let exe = std::env::current_exe()?;
    let out = Command::new(exe)
        .arg(SIDE_ARG)
        .args(side_args(opts, &devices, save, replay))
        .env_remove(ggml_trace::rpc::RPC_ENV)
        .env_remove(DEVICE_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    let mut lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    let last = if out.status.success() {
        None
    } else {
        lines.pop()
    };
    // What the side said besides its error (warnings; llama.cpp's log with -v).
    for l in &lines {
        eprintln!("tensor-diff-analyzer: side {name}: {}", reason(l));
    }
    if out.status.success() {
        return Ok(devices);
    }
    let why = match (last, out.status.code()) {
        // The monitor's line after a server died mid-run says it saved what was traced:
        // here that trace was the side's temporary one.
        (Some(l), _) => reason(l).replace(
            ", what was traced is saved (marked incomplete)",
            " (the side's trace was a temporary one; nothing is compared)",
        ),
        (None, Some(c)) => format!("its run ended with exit code {c}"),
        (None, None) => {
            #[cfg(unix)]
            {
                use std::os::unix::process::ExitStatusExt;
                format!(
                    "its run was ended by signal {}",
                    out.status.signal().unwrap_or(0)
                )
            }
            #[cfg(not(unix))]
            {
                "its run was ended by a signal".to_owned()
            }
        }
    };
    Err(failed(why))
}

/// The backends that ran each layer's attention in a trace: `CPU (layers 0-1),
/// RPC0[127.0.0.1:50052] (layers 2-3)`; `not recorded` for a trace without them.
pub fn backends(trace: &trace_format::TraceFile) -> String {
    let mut by: std::collections::BTreeMap<&str, std::collections::BTreeSet<u32>> =
        Default::default();
    for a in &trace.attn {
        if let Ok(l) = u32::try_from(a.layer) {
            by.entry(a.backend.as_str()).or_default().insert(l);
        }
    }
    if by.is_empty() || by.keys().all(|b| b.is_empty()) {
        return "not recorded".into();
    }
    let mut v: Vec<(&str, Vec<u32>)> = by
        .into_iter()
        .map(|(b, l)| (b, l.into_iter().collect()))
        .collect();
    v.sort_by_key(|(_, l)| l.first().copied());
    v.iter()
        .map(|(b, l)| {
            let b = if b.is_empty() { "unknown" } else { b };
            let word = if l.len() == 1 { "layer" } else { "layers" };
            format!("{b} ({word} {})", crate::report::step_ranges(l))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The child: the monitor's run with the capture options (`kcm_cli::trace::run`),
/// statistics to stdout (the parent discards them), errors as one line and the monitor's
/// exit codes.
pub fn side_main(args: Vec<OsString>) -> ExitCode {
    let tool = Tool {
        name: crate::TOOL.name,
        usage: "tensor-diff-analyzer --compare-devices-side: internal (one side of --compare-devices)\n",
        version: crate::TOOL.version,
    };
    tool.main(
        args,
        |a| match utf8_args(a) {
            Ok(a) => capture_args::parse(a),
            Err(e) => Err(capture_args::UsageError::NotUtf8(e)),
        },
        |opts| tool.exit(kcm_cli::trace::run(&opts).map(|()| kcm_cli::tool::OK)),
    )
}

/// The whole `--compare-devices` run: side A, side B replaying A, then the comparison of
/// B against A with the usual report (and its exit code).
pub fn run(opts: &Options, sides: &[DeviceSelection; 2]) -> Result<u8, AnalyzerError> {
    let tmp = tempfile::tempdir()?;
    // The same sampler seed on both sides (llama.cpp's default is a random one per run),
    // so that side B's own choices, recorded beside the replayed tokens, are comparable.
    let mut opts = opts.clone();
    let args = &mut opts.monitor.llama_args;
    if !args
        .iter()
        .any(|a| a == "-s" || a == "--seed" || a.starts_with("--seed="))
    {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.subsec_nanos() % 0x7fff_ffff);
        args.extend(["--seed".into(), seed.to_string()]);
    }
    let opts = &opts;
    let (a_path, b_path) = (
        tmp.path().join("side-a.gguf"),
        tmp.path().join("side-b.gguf"),
    );
    let a_args = run_side(opts, "A", &sides[0], &a_path, None)?;
    let b_args = run_side(opts, "B", &sides[1], &b_path, Some(&a_path))?;
    let mut compare = opts.clone();
    compare.reference = a_path;
    compare.current = Some(b_path);
    compare.compare_devices = None;
    let sides = [
        Side {
            name: "A",
            selection: sides[0].text.clone(),
            llama_args: a_args,
            backends: String::new(),
        },
        Side {
            name: "B",
            selection: sides[1].text.clone(),
            llama_args: b_args,
            backends: String::new(),
        },
    ];
    let code = crate::analyze(&compare, Some(sides));
    // The temporary traces go with `tmp`; a failure to remove them is not the verdict's.
    drop(tmp);
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(t: &str) -> DeviceSelection {
        DeviceSelection::parse(t).unwrap()
    }

    #[test]
    fn selections_become_llama_cpp_device_options() {
        assert_eq!(sel("cpu").llama_args(&[]), ["-dev", "none"]);
        assert_eq!(sel("none").llama_args(&[]), ["-dev", "none"]);
        assert_eq!(sel(" CPU ").llama_args(&[]), ["-dev", "none"]);
        assert_eq!(
            sel("rpc:127.0.0.1:50052").llama_args(&[1]),
            ["--rpc", "127.0.0.1:50052", "-dev", "RPC0"]
        );
        // Later endpoints of an rpc list may drop the prefix; a server with two devices
        // takes two names.
        let s = sel("rpc:10.0.0.2:1,10.0.0.3:2");
        assert_eq!(s.endpoints(), ["10.0.0.2:1", "10.0.0.3:2"]);
        assert_eq!(
            s.llama_args(&[2, 1]),
            ["--rpc", "10.0.0.2:1,10.0.0.3:2", "-dev", "RPC0,RPC1,RPC2"]
        );
        assert_eq!(sel("CUDA0").llama_args(&[]), ["-dev", "CUDA0"]);
        assert_eq!(
            sel("CUDA0,rpc:h:3,Vulkan0").llama_args(&[1]),
            ["--rpc", "h:3", "-dev", "CUDA0,RPC0,Vulkan0"]
        );
    }

    #[test]
    fn bad_selections_are_named() {
        for (t, why) in [
            ("", "an empty device selection"),
            ("cpu,rpc:h:1", "cpu stands alone"),
            ("h:1", "written rpc:HOST:PORT"),
            ("rpc:h", "not HOST:PORT"),
            ("rpc:h:99999", "not HOST:PORT"),
            ("rpc::1", "not HOST:PORT"),
            ("rpc:h:1,rpc:h:1", "given twice"),
            ("CUDA0,,CUDA1", "an empty item"),
            ("CUDA 0", "not a device name"),
            ("CUDA0,h:1", "written rpc:HOST:PORT"),
        ] {
            let e = DeviceSelection::parse(t).unwrap_err();
            assert!(e.to_string().contains(why), "{t:?}: {e}");
            assert!(e.to_string().starts_with("--compare-devices "), "{e}");
        }
    }

    #[test]
    fn a_childs_error_line_loses_its_tool_name() {
        assert_eq!(
            reason("tensor-diff-analyzer: invalid device"),
            "invalid device"
        );
        assert_eq!(reason("kqv-trace-monitor: a server died"), "a server died");
        assert_eq!(reason("something else"), "something else");
    }
}
