//! The long-run benchmarks (issue "Long runs"): gemma-3-270m with a ~2,000-token prompt,
//! traced (all layers, sources, F16 cache, flash attention) for 64, 128 and 256
//! generated tokens. Trace bytes in both storages, the monitor's wall time and peak RSS,
//! `gguf-reader --verify-attention` on both storages, and decode tokens/s with the
//! monitor against no callback at that context and at a short prompt. Written to
//! docs/performance-long-runs.md (ratios only between figures of this same run).
//!
//! `cargo xtask bench --only long-runs` runs this section alone; `cargo xtask bench`
//! runs it with the others.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::fetch_model;
use crate::util::{self, Result};

/// Generated tokens of the three traced runs.
const GENERATED: [u32; 3] = [64, 128, 256];
/// Characters of docs/design.md taken as the prompt (~2,000 gemma tokens).
const PROMPT_CHARS: usize = 8_600;

/// One measured command: wall time and the peak resident set of the process.
struct Measured {
    wall: Duration,
    max_rss_kib: u64,
}

/// Run `cmd` (stdout discarded) and measure it; an error when it fails.
fn measure(what: &str, cmd: &mut Command) -> Result<Measured> {
    eprintln!("xtask: {what}");
    let child = cmd
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("{what}: cannot start: {e}"))?;
    let start = Instant::now();
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting on our own child, with valid out-pointers.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = start.elapsed();
    if r != pid {
        return Err(format!(
            "{what}: wait4 failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(format!("{what}: failed (wait status {status})"));
    }
    Ok(Measured {
        wall,
        max_rss_kib: usage.ru_maxrss.max(0) as u64,
    })
}

/// What one traced run gave.
struct TracedRun {
    generated: u32,
    steps: usize,
    prompt_tokens: usize,
    monitor: Measured,
    v2_bytes: u64,
    v1_bytes: u64,
    verify_v2: Option<Measured>,
    verify_v1: Option<Measured>,
    read_v1: Option<Duration>,
}

pub struct LongRuns {
    runs: Vec<TracedRun>,
    overhead_long: Value,
    overhead_short: Value,
    prompt_chars: usize,
}

/// Run the section; `quick` shortens the runs (for checking the harness).
pub fn run(quick: bool) -> Result<LongRuns> {
    let root = util::workspace_root();
    let target = util::target_dir();
    let out = target.join("kcm-bench/long");
    fs::create_dir_all(&out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let model = fetch_model::gemma()?;
    let design = fs::read_to_string(root.join("docs/design.md"))
        .map_err(|e| format!("cannot read docs/design.md: {e}"))?;
    let prompt: String = design.chars().take(PROMPT_CHARS).collect();
    let prompt_file = out.join("prompt.txt");
    fs::write(&prompt_file, &prompt).map_err(|e| format!("cannot write the prompt: {e}"))?;

    let mut cmd = util::cargo();
    cmd.args([
        "build",
        "--release",
        "-p",
        "kqv-trace-monitor",
        "-p",
        "gguf-reader",
    ]);
    util::run(&mut cmd)?;
    let monitor = target.join("release/kqv-trace-monitor");
    let reader = target.join("release/gguf-reader");

    let generated: &[u32] = if quick { &GENERATED[..1] } else { &GENERATED };
    let mut runs = Vec::new();
    for &n in generated {
        let trace = out.join(format!("gemma-2k-{n}.gguf"));
        let mut cmd = Command::new(&monitor);
        cmd.arg("-m")
            .arg(&model)
            .arg("-f")
            .arg(&prompt_file)
            .args([
                "-n",
                &n.to_string(),
                "--ignore-eos",
                "--temp",
                "0",
                "-t",
                "2",
            ])
            .args(["-fa", "on", "-c", "4096", "--quiet", "--save-gguf"])
            .arg(&trace);
        let m = measure(&format!("monitor, 2k prompt + {n} tokens"), &mut cmd)?;
        let t = trace_format::TraceFile::open(&trace)
            .map_err(|e| format!("{}: {e}", trace.display()))?;
        let v1_bytes_data: u64 = t
            .tensors
            .iter()
            .map(|x| x.meta.layout.n_bytes().unwrap_or(0))
            .sum();
        let prompt_tokens = t
            .steps
            .iter()
            .filter(|s| s.step < t.steps.len() as u32 - n)
            .map(|s| s.tokens.len())
            .sum();
        let steps = t.steps.len();
        drop(t);
        let v2_bytes = file_size(&trace)?;
        let last = n == *generated.last().unwrap_or(&0);
        let mut run = TracedRun {
            generated: n,
            steps,
            prompt_tokens,
            monitor: m,
            v2_bytes,
            v1_bytes: v1_bytes_data,
            verify_v2: None,
            verify_v1: None,
            read_v1: None,
        };
        // The version-1 file: written for its size (and, for the longest run, verified).
        let v1 = out.join(format!("gemma-2k-{n}-v1.gguf"));
        measure(
            &format!("materialize {n}"),
            Command::new(&reader)
                .arg(&trace)
                .arg("--materialize")
                .arg(&v1),
        )?;
        run.v1_bytes = file_size(&v1)?;
        if last {
            run.verify_v2 = Some(measure(
                &format!("verify-attention, version 2, {n}"),
                Command::new(&reader).arg(&trace).arg("--verify-attention"),
            )?);
            let start = Instant::now();
            let mut f = fs::File::open(&v1).map_err(|e| format!("{}: {e}", v1.display()))?;
            std::io::copy(&mut f, &mut std::io::sink())
                .map_err(|e| format!("{}: {e}", v1.display()))?;
            run.read_v1 = Some(start.elapsed());
            run.verify_v1 = Some(measure(
                &format!("verify-attention, version 1, {n}"),
                Command::new(&reader).arg(&v1).arg("--verify-attention"),
            )?);
        }
        let _ = fs::remove_file(&v1);
        runs.push(run);
    }

    // Decode speed with the monitor at 2k context and at a short prompt.
    let overhead = |prompt: Option<&Path>, tokens: &str, name: &str| -> Result<Value> {
        let json = out.join(format!("overhead-{name}.json"));
        let _ = fs::remove_file(&json);
        let mut cmd = util::cargo();
        cmd.args(["bench", "-p", "kqv-trace-monitor", "--bench", "overhead"])
            .env("KCM_BENCH_TOKENS", tokens)
            .env("KCM_BENCH_RUNS", if quick { "1" } else { "3" })
            .env("KCM_BENCH_MODES", "0,1,2")
            .env("KCM_BENCH_JSON", &json);
        if let Some(p) = prompt {
            cmd.env("KCM_BENCH_PROMPT_FILE", p);
        }
        util::run(&mut cmd)?;
        read_json(&json)
    };
    let tokens = if quick { "16" } else { "64" };
    let overhead_long = overhead(Some(&prompt_file), tokens, "long")?;
    let overhead_short = overhead(None, if quick { "16" } else { "128" }, "short")?;
    Ok(LongRuns {
        runs,
        overhead_long,
        overhead_short,
        prompt_chars: prompt.chars().count(),
    })
}

fn file_size(p: &Path) -> Result<u64> {
    fs::metadata(p)
        .map(|m| m.len())
        .map_err(|e| format!("{}: {e}", p.display()))
}

fn read_json(p: &PathBuf) -> Result<Value> {
    let text = fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn mib_rss(m: &Measured) -> String {
    format!("{:.0} MiB", m.max_rss_kib as f64 / 1024.0)
}

fn goal(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

/// The overhead bench's ratio for a mode, from its JSON.
fn ratio(v: &Value, mode: &str) -> Option<(f64, f64)> {
    let m = v["modes"]
        .as_array()?
        .iter()
        .find(|m| m["mode"].as_str() == Some(mode))?;
    Some((m["tokens_per_s"].as_f64()?, m["ratio"].as_f64()?))
}

impl LongRuns {
    pub fn render(&self, machine_line: &str, quick: bool) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# Performance: long runs\n\nGenerated by `cargo xtask bench` (this section alone: `cargo xtask bench --only long-runs`)\n\
             — do not edit by hand. Every ratio compares two figures measured in this same run.{}\n\n{machine_line}\n",
            if quick { " **--quick run: shortened, not for judging goals.**" } else { "" }
        );
        let _ = writeln!(
            s,
            "gemma-3-270m Q4_K_M, prompt: the first {} characters of docs/design.md, `--ignore-eos --temp 0\n\
             -t 2 -fa on -c 4096`, all layers with their sources, F16 cache, `--save-gguf` (version 2, the\n\
             default). The version-1 size is that of `gguf-reader TRACE --materialize` (the same run's\n\
             trace written as version 1). Peak RSS is the process's (`wait4`'s ru_maxrss).\n",
            self.prompt_chars
        );
        let _ = writeln!(
            s,
            "## Trace bytes and the monitor's cost\n\n\
             | generated tokens | prompt tokens | steps | version 2 | version 1 | v2 ÷ v1 (goal ≤ 1/8) | monitor wall | monitor peak RSS (goal < 500 MiB) |\n|---|---|---|---|---|---|---|---|"
        );
        for r in &self.runs {
            let q = r.v2_bytes as f64 / r.v1_bytes.max(1) as f64;
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {:.4} = 1/{:.0}: {} | {:.1} s | {}: {} |",
                r.generated,
                r.prompt_tokens,
                r.steps,
                mb(r.v2_bytes),
                mb(r.v1_bytes),
                q,
                1.0 / q.max(1e-12),
                goal(q <= 0.125),
                r.monitor.wall.as_secs_f64(),
                mib_rss(&r.monitor),
                goal(r.monitor.max_rss_kib < 500 * 1024)
            );
        }
        if self.runs.len() >= 3 {
            let per = |a: &TracedRun, b: &TracedRun| {
                (b.v2_bytes as f64 - a.v2_bytes as f64) / f64::from(b.generated - a.generated)
            };
            let (x, y) = (
                per(&self.runs[0], &self.runs[1]),
                per(&self.runs[1], &self.runs[2]),
            );
            let _ = writeln!(
                s,
                "\nGrowth (version 2): {:.1} KB per generated token from 64 to 128, {:.1} KB from 128 to 256\n\
                 (linear when these agree; steps × context would double the second).\n",
                x / 1e3,
                y / 1e3
            );
        }
        if let Some(r) = self.runs.last() {
            if let (Some(v2), Some(v1), Some(read)) = (&r.verify_v2, &r.verify_v1, r.read_v1) {
                let _ = writeln!(
                    s,
                    "## `gguf-reader --verify-attention` on the {}-token trace\n\n\
                     | storage | wall | peak RSS (goal < 300 MiB) |\n|---|---|---|\n\
                     | version 2 ({}) | {:.1} s | {}: {} |\n| version 1 ({}) | {:.1} s | {}: {} |\n\n\
                     Reading the version-1 file once (page cache as the run left it): {:.1} s.\n",
                    r.generated,
                    mb(r.v2_bytes),
                    v2.wall.as_secs_f64(),
                    mib_rss(v2),
                    goal(v2.max_rss_kib < 300 * 1024),
                    mb(r.v1_bytes),
                    v1.wall.as_secs_f64(),
                    mib_rss(v1),
                    goal(v1.max_rss_kib < 300 * 1024),
                    read.as_secs_f64()
                );
            }
        }
        let _ = writeln!(
            s,
            "## Decode tokens/s with the monitor\n\n\
             The overhead bench (`crates/kqv-trace-monitor/benches/overhead.rs`): modes alternate in one process,\n\
             median of the runs; all layers with sources, statistics; `--save-gguf` spools the trace.\n\
             Reproduce: `KCM_BENCH_PROMPT_FILE=PROMPT KCM_BENCH_TOKENS=64 KCM_BENCH_RUNS=3 cargo bench -p kqv-trace-monitor --bench overhead`.\n\n\
             | prompt | generated | no callback tokens/s | monitor ÷ no callback (goal ≥ 0.95) | + --save-gguf ÷ no callback (goal ≥ 0.9) |\n|---|---|---|---|---|"
        );
        for (name, v) in [
            ("~2,000 tokens", &self.overhead_long),
            ("short (\"The capital of France is\")", &self.overhead_short),
        ] {
            let base = ratio(v, "no callback");
            let mon = ratio(v, "monitor (all layers, stats)");
            let save = ratio(v, "monitor + --save-gguf");
            if let (Some(b), Some(m), Some(sv)) = (base, mon, save) {
                let _ = writeln!(
                    s,
                    "| {name} | {} | {:.2} | {:.3}: {} | {:.3}: {} |",
                    v["tokens"],
                    b.0,
                    m.1,
                    goal(m.1 >= 0.95),
                    sv.1,
                    goal(sv.1 >= 0.9)
                );
            }
        }
        s
    }
}
