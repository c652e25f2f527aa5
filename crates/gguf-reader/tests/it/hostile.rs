//! Hostile traces (issue 14): files derived from an honest trace whose metadata and
//! tensors contradict each other (`test_support::hostile::cases`), and the fuzz target's
//! findings (`tests/data/hostile/`), through every reader command:
//! `gguf-reader` plain, `--show-data`, `--json`, `--shapes`, `--verify-attention`, and
//! `tensor-diff-analyzer --reference/--current` with the honest original both ways.
//!
//! Each command runs in its own process under a time limit and a memory limit
//! (`ulimit -v`), and must: not panic (exit 101), not abort or die by a signal, finish in
//! time, exit with a documented code (0, 1, 2), print at most one stderr line when it
//! fails (exactly one with exit 2), never echo a raw control character or a raw newline
//! from the file, and exit non-zero wherever the file's data contradicts its claims
//! (the commands that interpret the trace: `--verify-attention`, `--shapes` and the
//! analyzer). An honest file, and its big-endian rewrite, exit 0 everywhere.
//!
//! Every failing (file, command) pair is collected and reported in one assertion.
//! `KCM_HOSTILE_KEEP=DIR` keeps the generated files in DIR.
//!
//! The analyzer is a binary of another crate; this test binary links its library and
//! runs `tensor_diff_analyzer::main` when re-executed with `KCM_HOSTILE_ANALYZER_ARGS`
//! set (the `analyzer_entry` test), so it runs in its own process like the reader.

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use test_support::hostile::{self, Expect};
use test_support::LlamaArgs;

const READER: &str = env!("CARGO_BIN_EXE_gguf-reader");
/// Set in a re-executed test binary: the analyzer's arguments, separated by 0x1f.
const CHILD: &str = "KCM_HOSTILE_ANALYZER_ARGS";
const SEP: char = '\u{1f}';
/// Per command. The honest files take well under a second each.
pub const TIME_LIMIT: Duration = Duration::from_secs(20);
/// `ulimit -v`, in KiB: 2 GB of address space per command.
pub const MEMORY_KIB: u64 = 2_000_000;
/// Output kept per stream: its first and last halves (the middle is read and dropped).
const KEEP: usize = 1 << 20;

/// How one command ended.
#[derive(Debug)]
pub struct Ran {
    pub code: Option<i32>,
    pub timed_out: bool,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub secs: f64,
}

impl Ran {
    fn stderr_lines(&self) -> usize {
        String::from_utf8_lossy(&self.stderr).lines().count()
    }

    fn first_stderr_line(&self) -> String {
        let s = String::from_utf8_lossy(&self.stderr);
        let l = s.lines().next().unwrap_or("").to_owned();
        let l: String = l.escape_debug().collect();
        l.chars().take(160).collect()
    }
}

fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        // The first and the last KEEP / 2 bytes: the head for what a command printed
        // first, the tail for its summary line.
        let half = KEEP / 2;
        let mut head = Vec::new();
        let mut tail = std::collections::VecDeque::<u8>::new();
        let mut dropped = false;
        let mut buf = [0u8; 65536];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            let to_head = half.saturating_sub(head.len()).min(n);
            head.extend_from_slice(&buf[..to_head]);
            tail.extend(&buf[to_head..n]);
            while tail.len() > half {
                tail.pop_front();
                dropped = true;
            }
        }
        if dropped {
            head.extend_from_slice(b"\n[...]\n");
        }
        head.extend(tail);
        head
    })
}

/// Run `program args` under `ulimit -v MEMORY_KIB`, killed after `limit`.
pub fn run_limited(
    program: &Path,
    args: &[OsString],
    env: Option<(&str, OsString)>,
    limit: Duration,
) -> Ran {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("ulimit -v {MEMORY_KIB} && exec \"$@\""))
        .arg("sh")
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some((k, v)) = env {
        cmd.env(k, v);
    }
    let start = Instant::now();
    let mut child = cmd.spawn().expect("spawn sh");
    let out = drain(child.stdout.take().expect("stdout"));
    let err = drain(child.stderr.take().expect("stderr"));
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > limit {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("wait after kill");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let secs = start.elapsed().as_secs_f64();
    Ran {
        code: status.code(),
        timed_out,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        secs,
    }
}

/// Run the analyzer with these arguments in a child process (this binary, re-executed).
pub fn analyzer(args: &[OsString], limit: Duration) -> Ran {
    let joined = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(&SEP.to_string());
    let exe = std::env::current_exe().expect("current_exe");
    let harness: Vec<OsString> = [
        "--exact",
        "hostile::analyzer_entry",
        "--nocapture",
        "--quiet",
        "--color=never",
        "--test-threads=1",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    run_limited(&exe, &harness, Some((CHILD, joined.into())), limit)
}

pub fn reader(args: &[OsString], limit: Duration) -> Ran {
    run_limited(Path::new(READER), args, None, limit)
}

/// The analyzer's entry point when re-executed by [`analyzer`]; run normally, it checks
/// that the re-execution works (`--version` through a child process).
#[test]
fn analyzer_entry() {
    if let Some(args) = std::env::var_os(CHILD) {
        let args = args.to_string_lossy().into_owned();
        let args: Vec<OsString> = args.split(SEP).map(OsString::from).collect();
        let code = tensor_diff_analyzer::main(args);
        let n = (0..=255u8)
            .find(|&c| ExitCode::from(c) == code)
            .unwrap_or(255);
        std::process::exit(i32::from(n));
    }
    let r = analyzer(&["--version".into()], Duration::from_secs(60));
    let out = String::from_utf8_lossy(&r.stdout);
    assert_eq!(
        r.code,
        Some(0),
        "{out} {}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(out.contains("tensor-diff-analyzer"), "{out}");
}

/// An honest trace of the tiny model: flash attention on, a 21-token prompt in ubatches of
/// 8 (8, 8, 5), then two generated tokens (one token each): 5 steps x 2 layers. Stored
/// full (format version 1): the hostile cases rewrite its GGUF tensor table.
pub fn honest_trace(dir: &Path) -> PathBuf {
    honest_trace_as(dir, "full")
}

/// [`honest_trace`] in the storage given (`full`, `delta`).
pub fn honest_trace_as(dir: &Path, storage: &str) -> PathBuf {
    let model = dir.join("tiny.gguf");
    tiny_llama::write_model(&model, &tiny_llama::TinyLlamaConfig::default()).expect("model");
    let path = dir.join(format!("honest-{storage}.gguf"));
    let args = LlamaArgs::new(&model, "The quick brown fox")
        .n(2)
        .ubatch(8)
        .threads(2)
        .greedy()
        .flash(true)
        .arg("--kv-storage")
        .arg(storage)
        .arg("--save-gguf")
        .arg(path.to_string_lossy())
        .build();
    match kcm_cli::capture_args::parse(args).expect("arguments") {
        kcm_cli::capture_args::Command::Run(o) => kcm_cli::trace::run(&o).expect("trace"),
        c => panic!("{c:?}"),
    }
    path
}

/// The commands every file goes through: a label, whether the command interprets the
/// trace (so must refuse a contradiction), and how to run it on (file, honest original).
type Runner = fn(&Path, &Path) -> Ran;

fn os(a: &[&str]) -> Vec<OsString> {
    a.iter().map(OsString::from).collect()
}

fn with_file(f: &Path, extra: &[&str]) -> Vec<OsString> {
    let mut v = vec![f.as_os_str().to_owned()];
    v.extend(os(extra));
    v
}

pub const COMMANDS: [(&str, bool, Runner); 7] = [
    ("gguf-reader", false, |f, _| {
        reader(&with_file(f, &[]), TIME_LIMIT)
    }),
    ("gguf-reader --show-data", false, |f, _| {
        reader(&with_file(f, &["--show-data"]), TIME_LIMIT)
    }),
    ("gguf-reader --json", false, |f, _| {
        reader(&with_file(f, &["--json"]), TIME_LIMIT)
    }),
    ("gguf-reader --shapes", true, |f, _| {
        reader(&with_file(f, &["--shapes"]), TIME_LIMIT)
    }),
    ("gguf-reader --verify-attention", true, |f, _| {
        reader(&with_file(f, &["--verify-attention"]), TIME_LIMIT)
    }),
    (
        "tensor-diff-analyzer --reference honest --current F",
        true,
        |f, h| {
            let mut a = os(&["--reference"]);
            a.push(h.into());
            a.push("--current".into());
            a.push(f.into());
            analyzer(&a, TIME_LIMIT)
        },
    ),
    (
        "tensor-diff-analyzer --reference F --current honest",
        true,
        |f, h| {
            let mut a = os(&["--reference"]);
            a.push(f.into());
            a.push("--current".into());
            a.push(h.into());
            analyzer(&a, TIME_LIMIT)
        },
    ),
];

/// What is wrong with how a command ended, if anything.
pub fn problems(r: &Ran, expect: Expect, interprets: bool) -> Vec<String> {
    let mut p = Vec::new();
    let first = r.first_stderr_line();
    if r.timed_out {
        p.push(format!("timed out after {} s", TIME_LIMIT.as_secs()));
        return p;
    }
    match r.code {
        None => p.push(format!(
            "killed by a signal (an abort: allocation failure or stack overflow?) [{first}]"
        )),
        Some(101) => p.push(format!("panicked [{first}]")),
        Some(c) if !(0..=2).contains(&c) => p.push(format!("undocumented exit {c} [{first}]")),
        Some(c) => {
            let lines = r.stderr_lines();
            if c != 0 && lines > 1 {
                p.push(format!("exit {c} with {lines} stderr lines [{first}]"));
            }
            if c == 2 && lines == 0 {
                p.push("exit 2 without an error line".into());
            }
            if expect == Expect::Success && c != 0 {
                p.push(format!("exit {c} on an honest file [{first}]"));
            }
            if expect == Expect::Refuse && interprets && c == 0 {
                p.push("exit 0 on a file whose data contradicts its claims".into());
            }
        }
    }
    for (stream, bytes) in [("stdout", &r.stdout), ("stderr", &r.stderr)] {
        for found in hostile::raw_controls(bytes) {
            p.push(format!("{found} on {stream}"));
        }
    }
    p
}

/// The fuzz target's findings, kept as regression files: each must be handled like any
/// hostile file (no crash, documented exit, one error line), whatever the verdict.
fn regression_files() -> Vec<(String, PathBuf)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/hostile");
    let mut v: Vec<(String, PathBuf)> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
                .map(|p| {
                    let name = p.file_stem().unwrap_or_default().to_string_lossy();
                    (format!("regression/{name}"), p)
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn every_reader_command_survives_every_hostile_trace() {
    let dir = tempfile::tempdir().unwrap();
    let honest = honest_trace(dir.path());
    let bytes = std::fs::read(&honest).unwrap();
    let mut cases = hostile::cases(&bytes).expect("the generator rewrites the honest trace");
    // Format version 2's storage lies, from the same run stored as deltas.
    let v2 = std::fs::read(honest_trace_as(dir.path(), "delta")).unwrap();
    let delta_cases = hostile::delta_cases(&v2).expect("the generator rewrites the v2 trace");
    assert_eq!(delta_cases.len(), 10);
    // Each class of the issue is there, and each file really differs from the original
    // (except the honest control).
    assert!(cases.len() >= 30, "{} cases", cases.len());
    assert_eq!(cases[0].name, "honest");
    for c in &cases[1..] {
        assert_ne!(c.bytes, bytes, "{} is the honest file", c.name);
    }
    for c in &delta_cases[1..] {
        assert_ne!(c.bytes, v2, "{} is the honest file", c.name);
    }
    cases.extend(delta_cases);

    // KCM_HOSTILE_KEEP=DIR keeps the files (to try a tool on one by hand).
    let keep = std::env::var_os("KCM_HOSTILE_KEEP").map(PathBuf::from);
    let mut files: Vec<(String, PathBuf, Expect)> = Vec::new();
    for c in &cases {
        let p = dir.path().join(format!("{}.gguf", c.name));
        std::fs::write(&p, &c.bytes).unwrap();
        if let Some(k) = &keep {
            std::fs::create_dir_all(k).unwrap();
            std::fs::write(k.join(format!("{}.gguf", c.name)), &c.bytes).unwrap();
        }
        files.push((c.name.to_string(), p, c.expect));
    }
    for (name, p) in regression_files() {
        files.push((name, p, Expect::Any));
    }

    let jobs: Vec<(usize, usize)> = (0..files.len())
        .flat_map(|f| (0..COMMANDS.len()).map(move |c| (f, c)))
        .collect();
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, usize, Ran)>> = Mutex::new(Vec::new());
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 8);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let j = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(f, c)) = jobs.get(j) else { break };
                let r = (COMMANDS[c].2)(&files[f].1, &honest);
                results.lock().unwrap().push((f, c, r));
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|(f, c, _)| (*f, *c));

    let mut failures = Vec::new();
    for (f, c, r) in &results {
        let (name, _, expect) = &files[*f];
        let (label, interprets, _) = COMMANDS[*c];
        let code = r.code.map_or("signal".into(), |c| c.to_string());
        eprintln!("{name:34} {label:52} exit {code:>6} {:6.2} s", r.secs);
        for p in problems(r, *expect, interprets) {
            failures.push(format!("{name} | {label} | {p}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failing (file, command) pairs of {}:\n{}",
        failures.len(),
        results.len(),
        failures.join("\n")
    );
}
