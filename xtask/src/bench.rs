//! `cargo xtask bench [--quick] [--skip-cold-build] [--no-write] [--only long-runs|kv-caches|rebuild]`:
//! every benchmark of the project in one run, then docs/performance.md (and
//! docs/performance-long-runs.md, see `bench_long`) rewritten from the results.
//!
//! Ratios are only ever computed between figures measured in this same run. Each
//! section of the generated file names the command that reproduces it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Instant, SystemTime};

use serde_json::Value;

use crate::build_llama;
use crate::fetch_model;
use crate::util::{self, Result};

/// Criterion benchmarks: (package, bench target).
const CRITERION: &[(&str, &str)] = &[
    ("gguf-io", "gguf_io"),
    ("ggml-trace-sys", "dequant_vs_ggml"),
    ("tensor-diff-analyzer", "throughput"),
    ("tensor-stats", "summary"),
    ("kcm-cli", "sink"),
];

pub fn run(mut args: pico_args::Arguments) -> Result {
    let quick = args.contains("--quick");
    let skip_cold = args.contains("--skip-cold-build");
    let no_write = args.contains("--no-write");
    let reuse = args.contains("--reuse-json");
    let only: Option<String> = args
        .opt_value_from_str("--only")
        .map_err(|e| format!("bench: {e}"))?;
    util::no_more_args(args)?;
    match only.as_deref() {
        None => {}
        Some("long-runs") => {
            build_llama::build(true, false)?;
            let machine = Machine::probe();
            let long = crate::bench_long::run(quick)?;
            return write_long(&long, &machine, quick, no_write);
        }
        Some("kv-caches") => {
            let machine = Machine::probe();
            let v = if reuse {
                // Render what the last run of the bench left (its JSON), without running it.
                read_json(&target_out().join("kv_quality.json"))?
            } else {
                build_llama::build(true, false)?;
                kv_caches(&target_out(), quick)?
            };
            return write_kv_caches(&v, &machine, quick, no_write);
        }
        Some("rebuild") => {
            build_llama::build(false, false)?;
            let machine = Machine::probe();
            let r = crate::bench_rebuild::run()?;
            return write_rebuild(&r, &machine, no_write);
        }
        Some(other) => {
            return Err(format!(
                "bench: --only expects long-runs, kv-caches or rebuild, got '{other}'"
            ))
        }
    }

    let root = util::workspace_root();
    let target = util::target_dir();
    let out = target.join("kcm-bench");
    fs::create_dir_all(&out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let started = SystemTime::now();
    let machine = Machine::probe();

    build_llama::build(true, false)?;
    let mut report = Report::default();

    // 1. Criterion micro-benchmarks.
    for (pkg, bench) in CRITERION {
        if !has_bench(&root, pkg, bench) {
            report
                .skipped
                .push(format!("{pkg}/{bench}: no such benchmark in this checkout"));
            continue;
        }
        let mut cmd = util::cargo();
        cmd.args(["bench", "-p", pkg, "--bench", bench]);
        util::run(&mut cmd)?;
    }
    report.criterion = read_criterion(&target.join("criterion"), started)?;

    // 2. Monitor overhead on real decoding (gemma-3-270m).
    let overhead_json = out.join("overhead.json");
    let _ = fs::remove_file(&overhead_json);
    let (tokens, runs) = if quick { ("16", "1") } else { ("128", "7") };
    let mut cmd = util::cargo();
    cmd.args(["bench", "-p", "kqv-trace-monitor", "--bench", "overhead"])
        .env("KCM_BENCH_TOKENS", tokens)
        .env("KCM_BENCH_RUNS", runs)
        .env("KCM_BENCH_JSON", &overhead_json);
    util::run(&mut cmd)?;
    report.overhead = Some(read_json(&overhead_json)?);

    // 2b. The mixed KV cache against the plain F16 cache (memory and decode speed).
    let mixed_json = out.join("mixed_kv.json");
    let _ = fs::remove_file(&mixed_json);
    let mut cmd = util::cargo();
    cmd.args(["bench", "-p", "ggml-trace", "--bench", "mixed_kv"])
        .env("KCM_BENCH_RUNS", if quick { "1" } else { "3" })
        .env("KCM_BENCH_JSON", &mixed_json);
    util::run(&mut cmd)?;
    report.mixed = Some(read_json(&mixed_json)?);

    // 2c. The monitor across two loopback RPC servers: speed and the capture's RPC bytes.
    let rpc_json = out.join("rpc.json");
    let _ = fs::remove_file(&rpc_json);
    let mut cmd = util::cargo();
    cmd.args(["bench", "-p", "kqv-trace-monitor", "--bench", "rpc"])
        .env("KCM_BENCH_TOKENS", tokens)
        .env("KCM_BENCH_RUNS", runs)
        .env("KCM_BENCH_JSON", &rpc_json);
    util::run(&mut cmd)?;
    report.rpc = Some(read_json(&rpc_json)?);

    // 3. gguf-reader against gguf-py's gguf-dump on the same model.
    let model = fetch_model::gemma()?;
    let mut cmd = util::cargo();
    cmd.args(["build", "--release", "-p", "gguf-reader"]);
    util::run(&mut cmd)?;
    let reader = target.join("release/gguf-reader");
    let python = bench_venv(&target.join("bench-venv"))?;
    let reps = if quick { 1 } else { 3 };
    report.reader = vec![
        time_cmd(
            "python -m gguf.scripts.gguf_dump MODEL",
            Command::new(&python)
                .args(["-m", "gguf.scripts.gguf_dump"])
                .arg(&model),
            if quick { 1 } else { 2 },
        )?,
        time_cmd("gguf-reader MODEL", Command::new(&reader).arg(&model), reps)?,
        time_cmd(
            "gguf-reader MODEL --show-data",
            Command::new(&reader).arg(&model).arg("--show-data"),
            reps,
        )?,
    ];

    // 4. Cold build of the vendored llama.cpp in a scratch target directory.
    if skip_cold {
        report.skipped.push("cold build: --skip-cold-build".into());
    } else {
        report.cold_build = Some(cold_build(&target.join("bench-cold-build"))?);
    }

    // 4b. Rebuild after editing one llama.cpp source (per-file object cache).
    let r = crate::bench_rebuild::run()?;
    write_rebuild(&r, &machine, no_write)?;

    // 5. Long runs (trace bytes, memory and speed at ~2,000 tokens of context).
    let long = crate::bench_long::run(quick)?;
    write_long(&long, &machine, quick, no_write)?;

    // 6. KV caches on gemma-3-270m: bytes, speed and output quality against F16.
    let v = kv_caches(&out, quick)?;
    write_kv_caches(&v, &machine, quick, no_write)?;

    let load_after = Machine::load();
    let text = report.render(&machine, load_after, quick);
    if no_write {
        print!("{text}");
    } else {
        let path = root.join("docs/performance.md");
        fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("xtask: wrote {}", path.display());
    }
    Ok(())
}

fn target_out() -> PathBuf {
    util::target_dir().join("kcm-bench")
}

/// The `kv_quality` bench (crates/ggml-trace/benches/kv_quality.rs), its JSON.
fn kv_caches(out: &Path, quick: bool) -> Result<Value> {
    fs::create_dir_all(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let json = out.join("kv_quality.json");
    let _ = fs::remove_file(&json);
    let mut cmd = util::cargo();
    cmd.args(["bench", "-p", "ggml-trace", "--bench", "kv_quality"])
        .env("KCM_BENCH_TOKENS", if quick { "32" } else { "256" })
        .env("KCM_BENCH_JSON", &json);
    util::run(&mut cmd)?;
    read_json(&json)
}

/// Write docs/performance-kv-caches.md (or print it with --no-write).
fn write_kv_caches(v: &Value, m: &Machine, quick: bool, no_write: bool) -> Result {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Performance: KV caches on gemma-3-270m\n\n\
         Generated by `cargo xtask bench` (this section alone: `cargo xtask bench --only kv-caches`)\n\
         — do not edit by hand. Every ratio compares two figures measured in this same run.{}\n\n\
         Machine: {}, {} cores, {:.0} GiB; load average {} when the bench started, {} when it ended\n\
         (speed ratios are only meaningful on a quiet machine; KV bytes and KLD do not depend on load).\n",
        if quick { " **--quick run: shortened, not for judging goals.**" } else { "" },
        m.cpu,
        m.cores,
        m.mem_gib,
        v["load_start"].as_str().unwrap_or("?"),
        v["load_end"].as_str().unwrap_or("?"),
    );
    let _ = writeln!(
        s,
        "{}, `-c 4096 -t {} -fa on -ub 32 -b 32`, a prompt of {} tokens (the first 8,600 characters of\n\
         docs/design.md), then {} tokens: the F16 cache samples them greedily (`--ignore-eos`) with its output\n\
         logits, and every cache replays that run (`--replay`: the same tokens in the same steps) with its own\n\
         logits. KLD is KL(p_F16 ‖ p_cache) of each step's next-token distribution in nats, over the {} steps\n\
         that predict a token, with llama-perplexity's definitions (`tensor_stats::kld`); \"same top\" is top-1\n\
         agreement. KV bytes are ggml's buffer sizes of the context's KV cache; decode tokens/s are those of the\n\
         replayed generation steps. Reproduce: `KCM_BENCH_TOKENS={} cargo bench -p ggml-trace --bench kv_quality`.\n",
        v["model"].as_str().unwrap_or("?"),
        v["threads"],
        v["prompt_tokens"],
        v["tokens"],
        v["rows"][0]["steps"],
        v["tokens"]
    );
    let _ = writeln!(
        s,
        "| cache | KV bytes | ÷ F16 | decode tokens/s | ÷ F16 | mean KLD | 99% KLD | max KLD | same top |\n\
         |---|---|---|---|---|---|---|---|---|"
    );
    for r in v["rows"].as_array().into_iter().flatten() {
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        let _ = writeln!(
            s,
            "| {} | {} | {:.3} | {:.2} | {:.3} | {:.6} ± {:.6} | {:.6} | {:.6} | {:.2} ± {:.2} % |",
            r["cache"].as_str().unwrap_or("?"),
            r["kv_bytes"],
            f("kv_ratio"),
            f("tokens_per_s"),
            f("speed_ratio"),
            f("mean_kld"),
            f("mean_kld_uncertainty"),
            f("p99_kld"),
            f("max_kld"),
            100.0 * f("same_top"),
            100.0 * f("same_top_uncertainty"),
        );
    }
    let _ = writeln!(
        s,
        "\nGoals (issue 21): mixed with cold q4_0: KV bytes ≤ 0.4 of F16, mean KLD below plain q4_0's. The two\n\
         F16 rows replay the same computation: their KLD is exactly 0, and their speed ratio shows the run's\n\
         noise. At `-c 4096` gemma's 15 sliding-window layers (768 cells each) hold about half of the F16\n\
         cache's bytes: kept F16 (`mixed: window 256, cold q4_0`) they bound what the mixed cache saves; the\n\
         `mixed + SWA` rows quantize them too (`--mixed-swa-type`, llama.cpp's own quantized cache and flash\n\
         attention in those layers).\n"
    );
    for line in kv_goals(v) {
        let _ = writeln!(s, "- {line}");
    }
    if no_write {
        print!("{s}");
        return Ok(());
    }
    let path = util::workspace_root().join("docs/performance-kv-caches.md");
    fs::write(&path, s).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    eprintln!("xtask: wrote {}", path.display());
    Ok(())
}

/// Write docs/performance-rebuild.md (or print it with --no-write).
fn write_rebuild(r: &crate::bench_rebuild::Rebuild, m: &Machine, no_write: bool) -> Result {
    let line = format!(
        "Machine: {}, {} cores, {:.0} GiB",
        m.cpu, m.cores, m.mem_gib
    );
    let text = r.render(&line);
    if no_write {
        print!("{text}");
        return Ok(());
    }
    let path = util::workspace_root().join("docs/performance-rebuild.md");
    fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    eprintln!("xtask: wrote {}", path.display());
    Ok(())
}

/// The goals for the mixed KV cache with a cold q4_0 store, judged on each such
/// row of the kv_quality JSON against its F16 bytes and plain q4_0's mean KLD.
fn kv_goals(v: &Value) -> Vec<String> {
    let rows: Vec<&Value> = v["rows"].as_array().into_iter().flatten().collect();
    let name = |r: &Value| r["cache"].as_str().unwrap_or("").to_string();
    let q4_kld = rows
        .iter()
        .find(|r| name(r) == "q4_0")
        .and_then(|r| r["mean_kld"].as_f64());
    let verdict = |ok: bool| if ok { "met" } else { "**not met**" };
    let mut out = Vec::new();
    for r in rows.iter().filter(|r| {
        let n = name(r);
        n.starts_with("mixed") && n.contains("cold q4_0")
    }) {
        let (ratio, kld) = (
            r["kv_ratio"].as_f64().unwrap_or(f64::NAN),
            r["mean_kld"].as_f64().unwrap_or(f64::NAN),
        );
        let kld_part = match q4_kld {
            Some(q) => format!(
                "mean KLD {kld:.6} vs plain q4_0's {q:.6} (goal: below): {}",
                verdict(kld < q)
            ),
            None => "mean KLD: no plain q4_0 row to compare with".to_string(),
        };
        out.push(format!(
            "{}: KV bytes {ratio:.3} of F16 (goal ≤ 0.4): {}; {kld_part}.",
            name(r),
            verdict(ratio <= 0.4)
        ));
    }
    out
}

/// Write docs/performance-long-runs.md (or print it with --no-write).
fn write_long(
    long: &crate::bench_long::LongRuns,
    m: &Machine,
    quick: bool,
    no_write: bool,
) -> Result {
    let line = format!(
        "Machine: {}, {} cores, {:.0} GiB; load average {} at the start of the run, {} at the end of this section.",
        m.cpu,
        m.cores,
        m.mem_gib,
        m.load,
        Machine::load()
    );
    let text = long.render(&line, quick);
    if no_write {
        print!("{text}");
        return Ok(());
    }
    let path = util::workspace_root().join("docs/performance-long-runs.md");
    fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    eprintln!("xtask: wrote {}", path.display());
    Ok(())
}

fn has_bench(root: &Path, pkg: &str, bench: &str) -> bool {
    let manifest = root.join("crates").join(pkg).join("Cargo.toml");
    fs::read_to_string(manifest)
        .map(|s| s.contains(&format!("name = \"{bench}\"")))
        .unwrap_or(false)
}

pub(crate) struct Machine {
    cpu: String,
    cores: usize,
    mem_gib: f64,
    load: String,
}

impl Machine {
    fn probe() -> Machine {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_else(|| "unknown CPU".into());
        let mem_kib: f64 = fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            mem_gib: mem_kib / (1024.0 * 1024.0),
            load: Machine::load(),
        }
    }

    pub(crate) fn load() -> String {
        fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next().map(str::to_owned))
            .unwrap_or_else(|| "?".into())
    }
}

/// One criterion result: median time per iteration and its throughput.
struct Crit {
    median_ns: f64,
    bytes: Option<f64>,
}

impl Crit {
    fn gib_s(&self) -> Option<f64> {
        self.bytes
            .map(|b| b / (self.median_ns * 1e-9) / (1u64 << 30) as f64)
    }
}

/// group -> id (function/value) -> result, for every benchmark written after `since`.
fn read_criterion(
    dir: &Path,
    since: SystemTime,
) -> Result<BTreeMap<String, BTreeMap<String, Crit>>> {
    let mut out: BTreeMap<String, BTreeMap<String, Crit>> = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n == "new") {
                    if let Some((group, id, crit)) = read_one(&p, since)? {
                        out.entry(group).or_default().insert(id, crit);
                    }
                } else {
                    stack.push(p);
                }
            }
        }
    }
    Ok(out)
}

fn read_one(new: &Path, since: SystemTime) -> Result<Option<(String, String, Crit)>> {
    let est = new.join("estimates.json");
    let fresh = fs::metadata(&est)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t >= since);
    if !fresh {
        return Ok(None);
    }
    let b = read_json(&new.join("benchmark.json"))?;
    let e = read_json(&est)?;
    let group = b["group_id"].as_str().unwrap_or("?").to_owned();
    let id = [b["function_id"].as_str(), b["value_str"].as_str()]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join("/");
    let median_ns = e["median"]["point_estimate"].as_f64().unwrap_or(f64::NAN);
    let bytes = b["throughput"]["Bytes"]
        .as_f64()
        .or_else(|| b["throughput"]["BytesDecimal"].as_f64());
    Ok(Some((group, id, Crit { median_ns, bytes })))
}

fn read_json(p: &Path) -> Result<Value> {
    let text = fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))
}

struct Timed {
    what: String,
    secs: Vec<f64>,
}

/// Runs `cmd` `reps` times (output discarded), failing if it fails.
fn time_cmd(what: &str, cmd: &mut Command, reps: usize) -> Result<Timed> {
    let mut secs = Vec::new();
    for _ in 0..reps {
        eprintln!("xtask: timing {what}");
        let t = Instant::now();
        let status = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("cannot run {what}: {e}"))?;
        if !status.success() {
            return Err(format!("{what} failed: {status}"));
        }
        secs.push(t.elapsed().as_secs_f64());
    }
    Ok(Timed {
        what: what.to_owned(),
        secs,
    })
}

/// A venv with gguf-py 0.19.0 for the gguf-dump comparison.
fn bench_venv(dir: &Path) -> Result<PathBuf> {
    let python = dir.join("bin/python");
    let marker = dir.join("kcm-gguf-0.19.0");
    if marker.is_file() {
        return Ok(python);
    }
    let _ = fs::remove_dir_all(dir);
    util::run(Command::new("python3").args(["-m", "venv"]).arg(dir))?;
    util::run(Command::new(&python).args(["-m", "pip", "install", "--quiet", "gguf==0.19.0"]))?;
    fs::write(&marker, "").map_err(|e| format!("cannot write {}: {e}", marker.display()))?;
    Ok(python)
}

struct ColdBuild {
    secs: f64,
    load_before: String,
}

/// `cargo build --release -p ggml-trace-sys` into an empty target directory (so nothing is
/// cached), timed, then removed.
fn cold_build(dir: &Path) -> Result<ColdBuild> {
    let _ = fs::remove_dir_all(dir);
    let load_before = Machine::load();
    eprintln!(
        "xtask: cold build of llama.cpp into {} (minutes)",
        dir.display()
    );
    let t = Instant::now();
    let mut cmd = util::cargo();
    cmd.args(["build", "--release", "-p", "ggml-trace-sys"])
        .env("CARGO_TARGET_DIR", dir);
    util::run(&mut cmd)?;
    let secs = t.elapsed().as_secs_f64();
    let _ = fs::remove_dir_all(dir);
    Ok(ColdBuild { secs, load_before })
}

#[derive(Default)]
struct Report {
    criterion: BTreeMap<String, BTreeMap<String, Crit>>,
    overhead: Option<Value>,
    mixed: Option<Value>,
    rpc: Option<Value>,
    reader: Vec<Timed>,
    cold_build: Option<ColdBuild>,
    skipped: Vec<String>,
}

fn memcpy_entry(g: &BTreeMap<String, Crit>) -> Option<&Crit> {
    g.iter()
        .find(|(id, _)| id.starts_with("memcpy"))
        .map(|(_, c)| c)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn fmt_secs(s: f64) -> String {
    if s >= 60.0 {
        format!("{} min {:02.0} s", (s / 60.0).floor(), s % 60.0)
    } else {
        format!("{s:.2} s")
    }
}

impl Report {
    fn render(&self, m: &Machine, load_after: String, quick: bool) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# Performance\n");
        let _ = writeln!(
            s,
            "Generated by `cargo xtask bench{}` — do not edit by hand (hand-written analysis lives in\n\
             [performance-notes.md](performance-notes.md)). Every ratio below compares two figures\n\
             measured in this same run.\n",
            if quick { " --quick" } else { "" }
        );
        let _ = writeln!(
            s,
            "Machine: {}, {} cores, {:.0} GiB; load average {} at the start, {} at the end\n\
             (other work on a shared machine makes figures noisy; compare ratios, not absolutes).\n",
            m.cpu, m.cores, m.mem_gib, m.load, load_after
        );
        self.render_overhead(&mut s);
        self.render_mixed(&mut s);
        self.render_rpc(&mut s);
        self.render_reader(&mut s);
        self.render_dequant(&mut s);
        self.render_diff(&mut s);
        self.render_cold(&mut s);
        self.render_other_groups(&mut s);
        let _ = writeln!(
            s,
            "## Long runs and KV caches\n\n\
             Trace bytes, memory and decode speed at ~2,000 tokens of context (64/128/256 generated\n\
             tokens): [performance-long-runs.md](performance-long-runs.md); F16, q8_0, q4_0 and mixed caches on\n\
             gemma-3-270m (bytes, speed, KL divergence): [performance-kv-caches.md](performance-kv-caches.md); the\n\
             rebuild after editing one llama.cpp source: [performance-rebuild.md](performance-rebuild.md).\n\
             Each is written by `cargo xtask bench` or alone by `cargo xtask bench --only long-runs|kv-caches|rebuild`.\n"
        );
        if !self.skipped.is_empty() {
            let _ = writeln!(s, "## Not measured in this run\n");
            for k in &self.skipped {
                let _ = writeln!(s, "- {k}");
            }
            s.push('\n');
        }
        s
    }

    fn render_overhead(&self, s: &mut String) {
        let Some(o) = &self.overhead else { return };
        let _ = writeln!(s, "## Monitor overhead on real decoding\n");
        let _ = writeln!(
            s,
            "{}, -t {}, -fa {}, {} generated tokens, median of {} runs; the modes alternate in one\n\
             process. Reproduce: `KCM_BENCH_TOKENS={} KCM_BENCH_RUNS={} cargo bench -p kqv-trace-monitor --bench overhead`.\n",
            o["model"].as_str().unwrap_or("?"),
            o["threads"],
            o["flash_attn"].as_str().unwrap_or("?"),
            o["tokens"],
            o["runs"],
            o["tokens"],
            o["runs"],
        );
        let _ = writeln!(
            s,
            "| mode | tokens/s | ratio to no callback | goal | median of per-round ratios | sink ms/token |\n|---|---|---|---|---|---|"
        );
        let runs_of = |mode: &Value| -> Vec<f64> {
            mode["runs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_f64)
                .collect()
        };
        let modes: Vec<&Value> = o["modes"].as_array().into_iter().flatten().collect();
        let base_runs = modes
            .iter()
            .find(|m| m["mode"].as_str() == Some("no callback"))
            .map(|m| runs_of(m))
            .unwrap_or_default();
        for mode in &modes {
            let name = mode["mode"].as_str().unwrap_or("?");
            let ratio = mode["ratio"].as_f64().unwrap_or(f64::NAN);
            // Round r runs every mode once, one after another: the ratio within a round
            // is the least exposed to drift in the machine's speed.
            let per_round: Vec<f64> = runs_of(mode)
                .iter()
                .zip(&base_runs)
                .map(|(r, b)| r / b)
                .collect();
            let per_round = if per_round.is_empty() {
                String::new()
            } else {
                format!("{:.3}", median(&per_round))
            };
            let sink = mode["sink_ms_per_token"]
                .as_f64()
                .map_or(String::new(), |x| format!("{x:.3}"));
            let goal = match name {
                // Issue 19: every node traced and summarised at half the speed or better.
                "--tensor-filter . (every node, stats)" => Some(0.5),
                n if n.starts_with("--tensor-filter") || n.starts_with("llama.cpp") => None,
                n if n.starts_with("monitor (") => Some(0.95),
                n if n.contains("--save-gguf") => Some(0.85),
                _ => None,
            };
            let goal = goal.map_or(String::new(), |g| {
                format!("≥ {g}: {}", if ratio >= g { "met" } else { "**not met**" })
            });
            let _ = writeln!(
                s,
                "| {name} | {:.2} | {ratio:.3} | {goal} | {per_round} | {sink} |",
                mode["tokens_per_s"].as_f64().unwrap_or(f64::NAN)
            );
        }
        let _ = writeln!(
            s,
            "\nThe goal is judged on the ratio of the medians. Tokens/s of every run, in order:\n"
        );
        for mode in &modes {
            let runs: Vec<String> = runs_of(mode).iter().map(|r| format!("{r:.2}")).collect();
            let _ = writeln!(
                s,
                "- {}: {}",
                mode["mode"].as_str().unwrap_or("?"),
                runs.join(", ")
            );
        }
        s.push('\n');
    }

    fn render_rpc(&self, s: &mut String) {
        let Some(o) = &self.rpc else { return };
        let _ = writeln!(s, "## The monitor across RPC servers\n");
        let _ = writeln!(
            s,
            "{} split over {} loopback `kcm-rpc-server`s ({}, each server --threads {}), the client\n\
             -t {}, -fa {}, {} generated tokens ({} steps with the prompt's), median of {} runs; the\n\
             modes alternate in one process. Bytes are counted by a forwarding proxy in front of\n\
             each server, both directions. Reproduce: `KCM_BENCH_TOKENS={} KCM_BENCH_RUNS={} cargo\n\
             bench -p kqv-trace-monitor --bench rpc`.\n",
            o["model"].as_str().unwrap_or("?"),
            o["servers"],
            o["split"].as_str().unwrap_or("?"),
            o["server_threads"],
            o["threads"],
            o["flash_attn"].as_str().unwrap_or("?"),
            o["tokens"],
            o["steps"],
            o["runs"],
            o["tokens"],
            o["runs"],
        );
        let _ = writeln!(
            s,
            "| mode | tokens/s | ratio to no callback | bytes to the servers | bytes from the servers |\n|---|---|---|---|---|"
        );
        for mode in o["modes"].as_array().into_iter().flatten() {
            let f = |k: &str| mode[k].as_f64().unwrap_or(f64::NAN);
            let _ = writeln!(
                s,
                "| {} | {:.2} | {:.3} | {:.0} | {:.0} |",
                mode["mode"].as_str().unwrap_or("?"),
                f("tokens_per_s"),
                f("ratio"),
                f("bytes_to_servers"),
                f("bytes_from_servers"),
            );
        }
        let f = |k: &str| o[k].as_f64().unwrap_or(f64::NAN);
        let _ = writeln!(
            s,
            "\nThe capture's own RPC traffic (the monitor's run minus the run without callback, per\n\
             step): {:.0} bytes from the servers, {:.0} to them.\n",
            f("capture_bytes_from_servers_per_step"),
            f("capture_bytes_to_servers_per_step"),
        );
        if o.get("capture_counted_bytes_per_token").is_some() {
            let _ = writeln!(
                s,
                "As the capture counts its own reads from the servers (`ggml_backend_tensor_get`,\n\
                 the stderr line and `kqv_trace.run.rpc_read_bytes`): {:.0} bytes in the prompt's\n\
                 step, {:.0} bytes per generated token (median; the K/V views read where written).\n",
                f("capture_counted_bytes_prompt_step"),
                f("capture_counted_bytes_per_token"),
            );
        }
    }

    fn render_mixed(&self, s: &mut String) {
        let Some(o) = &self.mixed else { return };
        let _ = writeln!(s, "## Mixed KV cache against the plain F16 cache\n");
        let _ = writeln!(
            s,
            "tiny-llama `larger()` (8 layers, n_embd 1024, 16 heads over 4 KV heads), -c 4096, -t {},\n\
             a {}-token prompt then {} greedy tokens, runs alternating ({} each). KV bytes are\n\
             ggml's buffer sizes of the context's KV cache. Reproduce: `KCM_BENCH_RUNS={} cargo bench\n\
             -p ggml-trace --bench mixed_kv`.\n",
            o["threads"], o["prompt_tokens"], o["tokens"], o["runs"], o["runs"]
        );
        let _ = writeln!(
            s,
            "| cache | KV bytes | ÷ F16 (goal ≤ 0.35) | decode tokens/s, median | ÷ F16 | best run | ÷ F16 (goal ≥ 0.9) |\n|---|---|---|---|---|---|---|"
        );
        for mode in o["modes"].as_array().into_iter().flatten() {
            let f = |k: &str| mode[k].as_f64().unwrap_or(f64::NAN);
            let _ = writeln!(
                s,
                "| {} | {} | {:.3} | {:.2} | {:.3} | {:.2} | {:.3} |",
                mode["mode"].as_str().unwrap_or("?"),
                mode["kv_bytes"],
                f("kv_ratio"),
                f("median_tokens_per_s"),
                f("median_ratio"),
                f("best_tokens_per_s"),
                f("best_ratio"),
            );
        }
        s.push('\n');
        // issue 21: the same at long context (mixed_kv's second prompt length)
        let long = &o["long"];
        if let Some(modes) = long["modes"].as_array() {
            let _ = writeln!(
                s,
                "At long context: a {}-token prompt at -c {} (goal: mixed ÷ F16 decode ≥ 1.0 at 8k).\n",
                long["prompt_tokens"], long["ctx"]
            );
            let _ = writeln!(
                s,
                "| cache | KV bytes | ÷ F16 | decode tokens/s, median | ÷ F16 (goal ≥ 1.0) | best run | ÷ F16 |\n|---|---|---|---|---|---|---|"
            );
            for mode in modes {
                let f = |k: &str| mode[k].as_f64().unwrap_or(f64::NAN);
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.3} | {:.2} | {:.3} | {:.2} | {:.3} |",
                    mode["mode"].as_str().unwrap_or("?"),
                    mode["kv_bytes"],
                    f("kv_ratio"),
                    f("median_tokens_per_s"),
                    f("median_ratio"),
                    f("best_tokens_per_s"),
                    f("best_ratio"),
                );
            }
            s.push('\n');
        }
    }

    fn render_reader(&self, s: &mut String) {
        if self.reader.is_empty() {
            return;
        }
        let _ = writeln!(
            s,
            "## gguf-reader vs gguf-py's gguf-dump (gemma-3-270m Q4_K_M, 253 MB)\n"
        );
        let _ = writeln!(
            s,
            "MODEL = `$(cargo xtask fetch-model gemma3-270m)`; gguf-dump from PyPI `gguf` 0.19.0;\n\
             gguf-reader built with `cargo build --release -p gguf-reader`. Median wall time.\n"
        );
        let base = median(&self.reader[0].secs);
        let _ = writeln!(
            s,
            "| command | runs | median | speed-up vs gguf-dump |\n|---|---|---|---|"
        );
        for t in &self.reader {
            let m = median(&t.secs);
            let _ = writeln!(
                s,
                "| `{}` | {} | {} | {:.0}× |",
                t.what,
                t.secs.len(),
                fmt_secs(m),
                base / m
            );
        }
        if let Some(show) = self.reader.get(2) {
            let m = median(&show.secs);
            let _ = writeln!(
                s,
                "\nGoal for `--show-data` on this model: < 2 s — {}.",
                if m < 2.0 { "met" } else { "**not met**" }
            );
        }
        s.push('\n');
    }

    fn render_dequant(&self, s: &mut String) {
        let Some(g) = self.criterion.get("dequant_vs_ggml") else {
            return;
        };
        let _ = writeln!(
            s,
            "## Dequantization: gguf-io against ggml's own `to_float`\n"
        );
        let _ = writeln!(
            s,
            "1M elements per type, one thread each side, GiB/s of f32 output (median).\n\
             Reproduce: `cargo bench -p ggml-trace-sys --bench dequant_vs_ggml`.\n"
        );
        let _ = writeln!(
            s,
            "| type | gguf-io GiB/s | ggml GiB/s | gguf-io ÷ ggml |\n|---|---|---|---|"
        );
        for (id, ours) in g {
            let Some(ty) = id.strip_prefix("gguf-io/") else {
                continue;
            };
            let Some(theirs) = g.get(&format!("ggml/{ty}")) else {
                continue;
            };
            let (a, b) = (
                ours.gib_s().unwrap_or(f64::NAN),
                theirs.gib_s().unwrap_or(f64::NAN),
            );
            let _ = writeln!(s, "| {ty} | {a:.2} | {b:.2} | {:.2} |", a / b);
        }
        if let Some(d) = self.criterion.get("dequantize") {
            let _ = writeln!(
                s,
                "\nAll types gguf-io dequantizes (`cargo bench -p gguf-io --bench gguf_io`), GiB/s:\n"
            );
            let cells: Vec<String> = d
                .iter()
                .map(|(ty, c)| format!("{ty} {:.1}", c.gib_s().unwrap_or(f64::NAN)))
                .collect();
            let _ = writeln!(s, "{}", cells.join(" · "));
        }
        if let Some(c) = self
            .criterion
            .get("parse")
            .and_then(|p| p.get("model_header"))
        {
            let _ = writeln!(
                s,
                "\nParsing a gemma-shaped header from memory (262,144 token strings, 236 tensors): {:.1} ms.",
                c.median_ns / 1e6
            );
        }
        s.push('\n');
    }

    /// Groups with a `memcpy…` entry: every other entry's throughput against it.
    fn render_diff(&self, s: &mut String) {
        for (group, g) in &self.criterion {
            let Some(base) = memcpy_entry(g).and_then(Crit::gib_s) else {
                continue;
            };
            let _ = writeln!(s, "## {group}: throughput against memcpy\n");
            let _ = writeln!(
                s,
                "Two f32 traces compared as `tensor-diff-analyzer --reference A --current B` does it\n\
                 (memory-mapped, every metric, all cores), beside a memcpy of the same bytes.\n\
                 Reproduce: `cargo bench -p tensor-diff-analyzer --bench throughput`. GiB/s of input\n\
                 (both files' tensor bytes), median. Goal: ≥ 0.5 of memcpy.\n"
            );
            let _ = writeln!(s, "| benchmark | GiB/s | ÷ memcpy |\n|---|---|---|");
            for (id, c) in g {
                let r = c.gib_s().unwrap_or(f64::NAN);
                let _ = writeln!(s, "| {id} | {r:.2} | {:.3} |", r / base);
            }
            s.push('\n');
        }
    }

    fn render_cold(&self, s: &mut String) {
        let Some(c) = &self.cold_build else { return };
        let _ = writeln!(
            s,
            "## Cold build of the vendored llama.cpp (`cc`, no cmake)\n"
        );
        let _ = writeln!(
            s,
            "`CARGO_TARGET_DIR=<empty dir> cargo build --release -p ggml-trace-sys` (122 translation units\n\
             plus the Rust side; load average {} at its start): **{}**. Upstream's cmake build of\n\
             comparable targets took about 9 minutes on this kind of machine.\n",
            c.load_before,
            fmt_secs(c.secs)
        );
    }

    fn render_other_groups(&self, s: &mut String) {
        let known = ["dequant_vs_ggml", "dequantize", "parse"];
        for (group, g) in &self.criterion {
            if known.contains(&group.as_str()) || memcpy_entry(g).is_some() {
                continue;
            }
            let _ = writeln!(
                s,
                "## {group}\n\n| benchmark | median | GiB/s |\n|---|---|---|"
            );
            for (id, c) in g {
                let gib = c.gib_s().map_or("—".to_owned(), |x| format!("{x:.2}"));
                let _ = writeln!(s, "| {id} | {:.3} ms | {gib} |", c.median_ns / 1e6);
            }
            s.push('\n');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kv-caches goals are judged on every mixed row with a cold q4_0 store.
    #[test]
    fn kv_goals_judge_bytes_and_kld_of_the_cold_q4_0_rows() {
        let v = serde_json::json!({"rows": [
            {"cache": "F16 (replayed against itself)", "kv_ratio": 1.0, "mean_kld": 0.0},
            {"cache": "q4_0", "kv_ratio": 0.281, "mean_kld": 0.0937},
            {"cache": "mixed: window 256, cold q4_0", "kv_ratio": 0.660, "mean_kld": 0.0243},
            {"cache": "mixed: window 256, cold q8_0", "kv_ratio": 0.781, "mean_kld": 0.003},
            {"cache": "mixed + SWA q4_0: window 256, cold q4_0, window layers q4_0", "kv_ratio": 0.3126, "mean_kld": 0.05},
            {"cache": "mixed + SWA q8_0: window 256, cold q4_0, window layers q8_0", "kv_ratio": 0.4336, "mean_kld": 0.2},
        ]});
        let g = kv_goals(&v);
        assert_eq!(g.len(), 3, "{g:#?}");
        assert!(g[0].starts_with("mixed: window 256, cold q4_0: KV bytes 0.660 of F16 (goal ≤ 0.4): **not met**; mean KLD 0.024300 vs plain q4_0's 0.093700 (goal: below): met"), "{}", g[0]);
        assert!(g[1].starts_with("mixed + SWA q4_0: window 256, cold q4_0, window layers q4_0: KV bytes 0.313 of F16 (goal ≤ 0.4): met; mean KLD 0.050000"), "{}", g[1]);
        assert!(g[1].ends_with("(goal: below): met."), "{}", g[1]);
        assert!(
            g[2].contains("0.434 of F16 (goal ≤ 0.4): **not met**")
                && g[2].ends_with("(goal: below): **not met**."),
            "{}",
            g[2]
        );
    }

    fn crit(median_ns: f64, bytes: f64) -> Crit {
        Crit {
            median_ns,
            bytes: Some(bytes),
        }
    }

    /// The report renders every section from results shaped like the benches' own.
    #[test]
    fn every_section_is_rendered_from_results() {
        let gib = (1u64 << 30) as f64;
        let mut r = Report::default();
        let mut diff = BTreeMap::new();
        diff.insert(
            "tensor-diff-analyzer --current".to_owned(),
            crit(1e9, 2.0 * gib),
        );
        diff.insert("memcpy of the same bytes".to_owned(), crit(1e9, 4.0 * gib));
        r.criterion.insert("offline_diff".into(), diff);
        let mut deq = BTreeMap::new();
        deq.insert("gguf-io/q8_0".to_owned(), crit(1e9, 3.0 * gib));
        deq.insert("ggml/q8_0".to_owned(), crit(1e9, 2.0 * gib));
        r.criterion.insert("dequant_vs_ggml".into(), deq);
        let mut summary = BTreeMap::new();
        summary.insert("f32_chunks_32768".to_owned(), crit(5e5, 0.5 * gib));
        r.criterion.insert("summary".into(), summary);
        r.overhead = Some(serde_json::json!({
            "model": "m", "threads": 2, "flash_attn": "on", "tokens": 64, "runs": 5,
            "modes": [
                {"mode": "no callback", "tokens_per_s": 30.0, "ratio": 1.0,
                 "runs": [30.0, 20.0, 40.0]},
                {"mode": "monitor (all layers, stats)", "tokens_per_s": 29.0, "ratio": 0.966,
                 "runs": [27.0, 19.0, 39.0], "sink_ms_per_token": 0.2},
            ]
        }));
        r.mixed = Some(serde_json::json!({
            "threads": 2, "prompt_tokens": 2048, "tokens": 32, "runs": 3,
            "modes": [{"mode": "mixed", "kv_bytes": 100, "kv_ratio": 0.342,
                       "median_tokens_per_s": 30.0, "median_ratio": 0.98,
                       "best_tokens_per_s": 31.0, "best_ratio": 0.95}],
            "long": {"ctx": 16384, "prompt_tokens": 8192,
                     "modes": [{"mode": "mixed", "kv_bytes": 200, "kv_ratio": 0.3,
                                "median_tokens_per_s": 20.0, "median_ratio": 1.05,
                                "best_tokens_per_s": 21.0, "best_ratio": 1.01}]}
        }));
        r.rpc = Some(serde_json::json!({
            "model": "m", "servers": 2, "server_threads": 1, "threads": 2,
            "split": "-ngl 99 -ts 1,3", "flash_attn": "on", "tokens": 32, "runs": 3,
            "steps": 33,
            "modes": [
                {"mode": "no callback", "tokens_per_s": 10.0, "ratio": 1.0,
                 "bytes_to_servers": 1000.0, "bytes_from_servers": 2000.0},
                {"mode": "monitor (all layers, stats)", "tokens_per_s": 5.0, "ratio": 0.5,
                 "bytes_to_servers": 1500.0, "bytes_from_servers": 4000.0},
            ],
            "capture_bytes_from_servers_per_step": 60.6,
            "capture_bytes_to_servers_per_step": 15.2,
            "capture_counted_bytes_prompt_step": 70000.0,
            "capture_counted_bytes_per_token": 12345.0,
        }));
        r.reader = vec![
            Timed {
                what: "gguf-dump".into(),
                secs: vec![20.0],
            },
            Timed {
                what: "gguf-reader MODEL".into(),
                secs: vec![0.1],
            },
            Timed {
                what: "gguf-reader MODEL --show-data".into(),
                secs: vec![1.0],
            },
        ];
        r.cold_build = Some(ColdBuild {
            secs: 600.0,
            load_before: "0.5".into(),
        });
        let m = Machine {
            cpu: "cpu".into(),
            cores: 2,
            mem_gib: 24.0,
            load: "1".into(),
        };
        let text = r.render(&m, "1".into(), false);
        for want in [
            "## Monitor overhead on real decoding",
            // Per-round ratios 0.900, 0.950, 0.975: their median.
            "| monitor (all layers, stats) | 29.00 | 0.966 | ≥ 0.95: met | 0.950 | 0.200 |",
            "- no callback: 30.00, 20.00, 40.00",
            "## Mixed KV cache against the plain F16 cache",
            "| mixed | 100 | 0.342 | 30.00 | 0.980 | 31.00 | 0.950 |",
            "At long context: a 8192-token prompt at -c 16384",
            "| mixed | 200 | 0.300 | 20.00 | 1.050 | 21.00 | 1.010 |",
            "## The monitor across RPC servers",
            "| monitor (all layers, stats) | 5.00 | 0.500 | 1500 | 4000 |",
            "per\nstep): 61 bytes from the servers, 15 to them.",
            "70000 bytes in the prompt's\nstep, 12345 bytes per generated token",
            "## offline_diff: throughput against memcpy",
            "| tensor-diff-analyzer --current | 2.00 | 0.500 |",
            "| q8_0 | 3.00 | 2.00 | 1.50 |",
            "## summary",
            "Goal for `--show-data` on this model: < 2 s — met.",
            "**10 min 00 s**",
        ] {
            assert!(text.contains(want), "missing `{want}` in:\n{text}");
        }
    }
}
