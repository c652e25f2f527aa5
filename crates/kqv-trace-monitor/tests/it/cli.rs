//! The `kqv-trace-monitor` command line as a user meets it: the statistics table and its
//! filters, JSON Lines, `--save-gguf` to a path and to stdout (piped into `gguf-reader`),
//! exit codes and error lines, `--help`/`--version`, and the seed README's commands.
//! Every run uses the generated tiny LLaMA model (2 layers, 4 heads, 2 KV heads).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use test_support::LlamaArgs;

use trace_format::{Role, TraceFile};

const BIN: &str = env!("CARGO_BIN_EXE_kqv-trace-monitor");
/// BOS, "▁" and 11 byte tokens: 13 prompt tokens, one step with the default ubatch.
const PROMPT: &str = "Hello world";
const N_LAYER: usize = 2;
/// One prompt step, then one step per generated token (`-n 2`).
const N_STEPS: usize = 3;
/// What each (step, layer) traces with flash attention on, in print order.
const FA_ROLES: [&str; 6] = ["kqv_out", "attn", "q", "k", "v", "mask"];

fn model(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.gguf");
    tiny_llama::write_model(&path, &tiny_llama::TinyLlamaConfig::default()).unwrap();
    path
}

fn run_in<S: AsRef<std::ffi::OsStr>>(dir: Option<&Path>, args: &[S]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args).stdin(Stdio::null());
    if let Some(d) = dir {
        c.current_dir(d);
    }
    c.output().unwrap()
}

fn run<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    run_in(None, args)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Assert success and return stdout.
fn ok(o: &Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: {:?}\nstderr: {}",
        o.status,
        text(&o.stderr)
    );
    text(&o.stdout)
}

/// `-m M -p PROMPT -n 2 -t 2 --temp 0` plus `extra`.
fn small_run(model: &Path, extra: &[&str]) -> Output {
    let args = LlamaArgs::new(model, PROMPT)
        .n(2)
        .threads(2)
        .greedy()
        .args(extra.iter().copied())
        .build();
    run(&args)
}

/// One row of the statistics table.
#[derive(Debug)]
struct Row {
    step: u32,
    layer: i32,
    role: String,
    ty: String,
    shape: [u64; 4],
    nan: u64,
    inf: u64,
    name: String,
}

const HEADER: [&str; 12] = [
    "step", "layer", "role", "type", "shape", "mean", "std", "min", "max", "nan", "inf", "name",
];

/// Parse the table: the header line first, then one row per traced tensor.
fn table(out: &str) -> Vec<Row> {
    let mut lines = out.lines();
    let header: Vec<&str> = lines
        .next()
        .expect("no header")
        .split_whitespace()
        .collect();
    assert_eq!(header, HEADER, "header");
    lines
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() >= 12, "short row: {l:?}");
            let shape: Vec<u64> = f[4]
                .trim_matches(|c| c == '[' || c == ']')
                .split(',')
                .map(|x| x.parse().unwrap())
                .collect();
            for v in &f[5..9] {
                v.parse::<f64>()
                    .unwrap_or_else(|_| panic!("{v:?} in {l:?}"));
            }
            Row {
                step: f[0].parse().unwrap(),
                layer: f[1].parse().unwrap(),
                role: f[2].to_owned(),
                ty: f[3].to_owned(),
                shape: shape.try_into().unwrap(),
                nan: f[9].parse().unwrap(),
                inf: f[10].parse().unwrap(),
                // The ggml name may hold spaces (`Qcur-0 (view) (permuted)`).
                name: f[11..].join(" "),
            }
        })
        .collect()
}

/// Rows grouped as (step, layer) → roles, in print order.
fn roles_by_group(rows: &[Row]) -> Vec<((u32, i32), Vec<String>)> {
    let mut g: Vec<((u32, i32), Vec<String>)> = Vec::new();
    for r in rows {
        match g.last_mut() {
            Some((k, v)) if *k == (r.step, r.layer) => v.push(r.role.clone()),
            _ => g.push(((r.step, r.layer), vec![r.role.clone()])),
        }
    }
    g
}

#[test]
fn table_has_a_header_and_one_row_per_traced_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());

    // Flash attention on: kqv_out, the FLASH_ATTN_EXT output and its q, k, v, mask.
    let out = ok(&small_run(&m, &["-fa", "on"]), "fa on");
    let rows = table(&out);
    assert_eq!(rows.len(), N_STEPS * N_LAYER * FA_ROLES.len(), "{out}");
    let groups = roles_by_group(&rows);
    assert_eq!(groups.len(), N_STEPS * N_LAYER);
    for (i, ((step, layer), roles)) in groups.iter().enumerate() {
        assert_eq!(*step as usize, i / N_LAYER);
        assert_eq!(*layer as usize, i % N_LAYER);
        assert_eq!(roles, &FA_ROLES, "step {step} layer {layer}");
    }
    for r in &rows {
        match r.role.as_str() {
            "kqv_out" => {
                assert_eq!(r.name, format!("kqv_out-{}", r.layer));
                // 64 = 4 heads × head_dim 16; 13 prompt tokens at step 0, then 1.
                let n_tokens = if r.step == 0 { 13 } else { 1 };
                assert_eq!(r.shape, [64, n_tokens, 1, 1]);
                assert_eq!(r.ty, "f32");
            }
            "k" | "v" => {
                assert_eq!(r.ty, "f16", "the cache's own type");
                assert!(r
                    .name
                    .starts_with(&format!("cache_{}_l{}", r.role, r.layer)));
            }
            // Masked cells are -inf; nothing else is non-finite.
            "mask" => assert!(r.inf > 0, "{r:?}"),
            _ => {}
        }
        if r.role != "mask" {
            assert_eq!((r.nan, r.inf), (0, 0), "{r:?}");
        }
    }

    // Flash attention off: q, k, the scores, the mask, the softmax, v and `kqv`.
    let out = ok(&small_run(&m, &["-fa", "off"]), "fa off");
    let rows = table(&out);
    let want: BTreeSet<&str> = [
        "kqv_out",
        "attn",
        "q",
        "k",
        "v",
        "mask",
        "kq",
        "kq_soft_max",
    ]
    .into();
    assert_eq!(rows.len(), N_STEPS * N_LAYER * want.len(), "{out}");
    for (key, roles) in roles_by_group(&rows) {
        let got: BTreeSet<&str> = roles.iter().map(String::as_str).collect();
        assert_eq!(got, want, "{key:?}");
        assert_eq!(roles[0], "kqv_out", "kqv_out comes first");
    }
}

#[test]
fn filters_keep_only_what_was_asked() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());

    let rows = table(&ok(
        &small_run(&m, &["-fa", "on", "--no-trace-sources"]),
        "--no-trace-sources",
    ));
    assert_eq!(rows.len(), N_STEPS * N_LAYER);
    assert!(rows.iter().all(|r| r.role == "kqv_out"), "{rows:?}");

    let rows = table(&ok(
        &small_run(&m, &["-fa", "on", "--layer", "1"]),
        "--layer 1",
    ));
    assert_eq!(rows.len(), N_STEPS * FA_ROLES.len());
    assert!(rows.iter().all(|r| r.layer == 1), "{rows:?}");

    // `--layer -1` is every layer.
    let rows = table(&ok(&small_run(&m, &["-fa", "on", "--layer", "-1"]), "-1"));
    assert_eq!(rows.len(), N_STEPS * N_LAYER * FA_ROLES.len());

    // 13 prompt tokens in ubatches of 8: two prompt steps, and nothing generated.
    let rows = table(&ok(
        &small_run(&m, &["-fa", "on", "-b", "8", "-ub", "8", "--prefill-only"]),
        "--prefill-only",
    ));
    let steps: BTreeSet<u32> = rows.iter().map(|r| r.step).collect();
    assert_eq!(steps, [0, 1].into(), "prompt steps only");
    assert_eq!(rows.len(), 2 * N_LAYER * FA_ROLES.len());
    let q_tokens: Vec<u64> = rows
        .iter()
        .filter(|r| r.role == "kqv_out" && r.layer == 0)
        .map(|r| r.shape[1])
        .collect();
    assert_eq!(q_tokens, [8, 5]);

    // All three at once, and the trace says what was asked.
    let path = dir.path().join("filtered.gguf");
    let p = path.to_str().unwrap();
    let rows = table(&ok(
        &small_run(
            &m,
            &[
                "--layer",
                "1",
                "--no-trace-sources",
                "--prefill-only",
                "--save-gguf",
                p,
            ],
        ),
        "all filters",
    ));
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!((rows[0].step, rows[0].layer), (0, 1));
    let t = TraceFile::open(&path).unwrap();
    assert_eq!(t.run.target_layer, 1);
    assert!(!t.run.trace_sources);
    assert_eq!(t.steps.len(), 1);
    assert_eq!(t.tensors.len(), 1);
    assert_eq!(t.tensors[0].meta.role, Role::KqvOut);
}

#[test]
fn json_lines_carry_the_documented_fields() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let out = ok(&small_run(&m, &["-fa", "on", "--json"]), "--json");
    let fields: BTreeSet<&str> = [
        "step", "layer", "role", "name", "op", "type", "shape", "nb", "count", "mean", "std",
        "min", "max", "nan", "inf",
    ]
    .into();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines.len(),
        N_STEPS * N_LAYER * FA_ROLES.len(),
        "no header, one line each"
    );
    let mut roles = Vec::new();
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}"));
        let o = v.as_object().unwrap();
        let keys: BTreeSet<&str> = o.keys().map(String::as_str).collect();
        assert_eq!(keys, fields, "{l}");
        assert!(o["step"].is_u64() && o["layer"].is_i64() && o["count"].is_u64());
        assert!(o["nan"].is_u64() && o["inf"].is_u64());
        for k in ["role", "name", "op", "type"] {
            assert!(o[k].is_string(), "{k}: {l}");
        }
        let dims = |k: &str| -> Vec<u64> {
            o[k].as_array()
                .unwrap_or_else(|| panic!("{k}: {l}"))
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect()
        };
        let shape = dims("shape");
        assert_eq!(shape.len(), 4);
        assert_eq!(dims("nb").len(), 4);
        assert_eq!(o["count"].as_u64().unwrap(), shape.iter().product::<u64>());
        // Finite statistics are numbers; NaN and ±Inf would be strings.
        for k in ["mean", "std", "min", "max"] {
            let ok = o[k].is_f64()
                || o[k].is_i64()
                || matches!(o[k].as_str(), Some("nan" | "inf" | "-inf"));
            assert!(ok, "{k}: {l}");
        }
        let role = o["role"].as_str().unwrap();
        assert!(Role::from_name(role).is_some(), "{role}");
        roles.push(role.to_owned());
        if role == "kqv_out" {
            assert_eq!(o["type"], "f32");
            assert_eq!(o["name"], format!("kqv_out-{}", o["layer"]));
        }
        if role == "attn" {
            assert_eq!(o["op"], "FLASH_ATTN_EXT");
        }
    }
    assert_eq!(&roles[..6], &FA_ROLES);
}

fn gguf_reader() -> PathBuf {
    test_support::workspace_bin("gguf-reader", "gguf-reader")
}

#[test]
fn save_gguf_to_stdout_is_a_trace_and_stats_go_to_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    for storage in test_support::storage::BOTH {
        let [flag, name] = test_support::storage::args(storage);
        let o = small_run(&m, &["-fa", "on", flag, name, "--save-gguf", "-"]);
        assert!(o.status.success(), "{}", text(&o.stderr));
        let rows = table(&text(&o.stderr));
        assert_eq!(rows.len(), N_STEPS * N_LAYER * FA_ROLES.len());

        let file = gguf_io::GgufFile::from_bytes(o.stdout.clone()).expect("stdout is a GGUF");
        assert_eq!(file.tensors().len(), rows.len());
        let t = TraceFile::from_gguf(file).unwrap();
        assert!(t.run.complete);
        assert_eq!(t.steps.len(), N_STEPS);
        assert_eq!(t.run.flash_attn, "on");
        // The file lists the tensors in the order the table printed them.
        for (r, tt) in rows.iter().zip(&t.tensors) {
            assert_eq!(
                (r.step, r.layer, r.role.as_str()),
                (tt.meta.step, tt.meta.layer, tt.meta.role.name())
            );
            assert_eq!(r.name, tt.meta.ggml_name);
            assert_eq!(r.shape, tt.meta.layout.ne);
        }
        assert_eq!(t.format_version, storage.format_version());
    }

    // Through a real pipe into gguf-reader.
    let mut mon = Command::new(BIN)
        .args(
            LlamaArgs::new(&m, PROMPT)
                .n(2)
                .threads(2)
                .greedy()
                .args(["--save-gguf", "-"])
                .build(),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let reader = Command::new(gguf_reader())
        .arg("-")
        .stdin(Stdio::from(mon.stdout.take().unwrap()))
        .output()
        .unwrap();
    assert!(mon.wait().unwrap().success());
    let shown = ok(&reader, "gguf-reader -");
    let kind = shown
        .lines()
        .find(|l| l.trim_start().starts_with("kind:"))
        .unwrap_or_else(|| panic!("no kind line:\n{shown}"));
    assert!(kind.contains("kv-cache-monitor trace"), "{kind}");
    assert!(shown.contains("kqv_trace.total_steps"), "{shown}");
}

/// A reader that closes the pipe early (`| head`, `| gguf-reader -`, which stops after the
/// header) ends the run quietly with 0, and the statistics' reader closing it does not
/// cost the trace.
#[test]
fn a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let path = dir.path().join("kept.gguf");
    for save in ["-", path.to_str().unwrap()] {
        let mut child = Command::new(BIN)
            .args(["-m", m.to_str().unwrap(), "-p", PROMPT, "-t", "2"])
            .args(["--save-gguf", save])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let o = child.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "--save-gguf {save}: {:?}\n{}",
            o.status,
            text(&o.stderr)
        );
        assert!(
            !text(&o.stderr).contains("kqv-trace-monitor:"),
            "{}",
            text(&o.stderr)
        );
    }
    let t = TraceFile::open(&path).expect("saved although nobody read the statistics");
    assert_eq!(t.steps.len(), 1);
}

/// Exit code and stderr of a failing run: exactly one line naming the tool.
fn one_error_line(o: &Output, code: i32) -> String {
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "stderr: {err}");
    assert!(lines[0].starts_with("kqv-trace-monitor: "), "{err}");
    lines[0].to_owned()
}

#[test]
fn errors_have_exit_codes_and_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-model.gguf");
    let o = run(&["-m", missing.to_str().unwrap(), "-p", "hi"]);
    let line = one_error_line(&o, 1);
    assert!(line.contains("no-such-model.gguf"), "{line}");
    assert!(o.stdout.is_empty());

    one_error_line(&run(&["--layer", "x"]), 2);
    one_error_line(&run(&["-m", "m.gguf", "--layer"]), 2);
    one_error_line(&run(&["-m", "m.gguf", "--save-gguf"]), 2);

    // An option llama.cpp's own parser rejects is a usage error too (llama.cpp prints
    // its reason first; our line closes the output).
    let o = run(&["-m", "m.gguf", "--bogus-opt"]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(err.contains("--bogus-opt"), "{err}");
    assert!(
        err.lines()
            .last()
            .is_some_and(|l| l.starts_with("kqv-trace-monitor: ")),
        "{err}"
    );
}

#[cfg(unix)]
fn is_char_device(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(p).is_ok_and(|m| m.file_type().is_char_device())
}

/// Saving to a device writes into it: renaming a temporary file over `/dev/full` would
/// replace the device node with a regular file (and report success).
#[cfg(unix)]
#[test]
fn save_gguf_to_dev_full_fails_and_leaves_the_device() {
    let full = Path::new("/dev/full");
    if !is_char_device(full) {
        eprintln!("no /dev/full character device here; skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let o = small_run(&m, &["--save-gguf", "/dev/full"]);
    let line = one_error_line(&o, 1);
    assert!(line.contains("saving the trace"), "{line}");
    assert!(is_char_device(full), "/dev/full must still be the device");
}

#[cfg(unix)]
#[test]
fn save_gguf_through_a_symlink_writes_the_file_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let target = dir.path().join("real.gguf");
    std::fs::write(&target, b"old").unwrap();
    let link = dir.path().join("link.gguf");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    ok(
        &small_run(&m, &["--save-gguf", link.to_str().unwrap()]),
        "save via symlink",
    );
    assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
    let t = TraceFile::open(&target).expect("the link's target holds the trace");
    assert_eq!(t.steps.len(), N_STEPS);
}

#[test]
fn a_failed_run_leaves_an_existing_trace_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let path = dir.path().join("trace.gguf");
    let p = path.to_str().unwrap();
    ok(&small_run(&m, &["--save-gguf", p]), "first save");
    let before = std::fs::read(&path).unwrap();
    TraceFile::open(&path).unwrap();

    // A model llama.cpp cannot load (the right magic, then garbage), same destination.
    let bad = dir.path().join("bad.gguf");
    let mut f = std::fs::File::create(&bad).unwrap();
    f.write_all(b"GGUF\x03\x00\x00\x00").unwrap();
    f.write_all(&[0xff; 64]).unwrap();
    drop(f);
    let o = run(&["-m", bad.to_str().unwrap(), "-p", "hi", "--save-gguf", p]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    // llama.cpp's own error lines may come first; the tool's line is last.
    assert!(
        err.lines()
            .last()
            .is_some_and(|l| l.starts_with("kqv-trace-monitor: ")),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), before, "old trace untouched");

    // A missing model too; and no temporary files are left beside the trace.
    let o = run(&["-m", "/nonexistent/model.gguf", "--save-gguf", p]);
    one_error_line(&o, 1);
    assert_eq!(std::fs::read(&path).unwrap(), before);
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut names = names;
    names.sort();
    assert_eq!(names, ["bad.gguf", "tiny.gguf", "trace.gguf"]);
}

#[test]
fn help_lists_every_option_and_version_names_llama_cpp() {
    for flag in ["--help", "-h"] {
        let out = ok(&run(&[flag]), flag);
        for opt in [
            "--layer N",
            "--no-trace-sources",
            "--save-gguf FILE",
            "--prefill-only",
            "--json",
            "-v, --verbose",
            "-h, --help",
            "-V, --version",
        ] {
            assert!(out.contains(opt), "{flag} lacks {opt}:\n{out}");
        }
        assert!(out.contains("EXIT CODES"), "{out}");
    }
    for flag in ["--version", "-V"] {
        let out = ok(&run(&[flag]), flag);
        assert!(out.starts_with("kqv-trace-monitor "), "{out}");
        assert!(out.contains("llama-cpp-sys-2 0.1.161"), "{out}");
    }
}

/// The seed README's commands, as written (model path swapped), run in a fresh directory.
#[test]
fn seed_readme_commands_run_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m = model(d);
    let m = m.to_str().unwrap();

    let out = ok(
        &run_in(
            Some(d),
            &[
                "-m",
                m,
                "-p",
                "Hello world",
                "--save-gguf",
                "traced_tensors.gguf",
            ],
        ),
        "README: trace all layers",
    );
    let rows = table(&out);
    let t = TraceFile::open(d.join("traced_tensors.gguf")).unwrap();
    // -n defaults to 0: the prompt only.
    assert_eq!(t.steps.len(), 1);
    assert_eq!(t.tensors.len(), rows.len());
    assert_eq!(t.run.target_layer, -1);
    let layers: BTreeSet<i32> = t.tensors.iter().map(|x| x.meta.layer).collect();
    assert_eq!(layers, [0, 1].into());

    let out = ok(
        &run_in(
            Some(d),
            &[
                "-m",
                m,
                "-p",
                "Hello world",
                "--layer",
                "0",
                "--save-gguf",
                "layer0_tensors.gguf",
            ],
        ),
        "README: layer 0",
    );
    assert!(table(&out).iter().all(|r| r.layer == 0));
    let t = TraceFile::open(d.join("layer0_tensors.gguf")).unwrap();
    assert_eq!(t.run.target_layer, 0);
    assert!(!t.tensors.is_empty());
    assert!(t.tensors.iter().all(|x| x.meta.layer == 0));

    let before: BTreeSet<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let out = ok(
        &run_in(Some(d), &["-m", m, "-p", "Hello world"]),
        "README: no save",
    );
    assert_eq!(table(&out).len(), N_LAYER * FA_ROLES.len(), "{out}");
    let after: BTreeSet<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(before, after, "nothing written without --save-gguf");

    // q4_0 blocks are 32 values: head_dim 32 (no Hadamard rotation below 64).
    let q4 = tiny_llama::write_with_head_dim(d, 32).unwrap();
    let out = ok(
        &run_in(
            Some(d),
            &[
                "-m",
                q4.to_str().unwrap(),
                "-n",
                "4",
                "-p",
                "Hello, world",
                "-ngl",
                "0",
                "-ctk",
                "q4_0",
                "-ctv",
                "q4_0",
                "-fa",
                "-t",
                "2",
                "--layer",
                "0",
                "--save-gguf",
                "reference_tensors.gguf",
                // Not in the README's command: a fixed seed, as llama.cpp's random one
                // samples EOS now and then (about 1 run in 100) and ends the run early.
                "--seed",
                "42",
            ],
        ),
        "README: q4_0 cache",
    );
    let rows = table(&out);
    let t = TraceFile::open(d.join("reference_tensors.gguf")).unwrap();
    assert_eq!(t.steps.len(), 5, "the prompt, then 4 generated tokens");
    assert_eq!(t.tensors.len(), rows.len());
    assert_eq!(rows.len(), 5 * FA_ROLES.len());
    assert_eq!(
        (t.run.cache_type_k.as_str(), t.run.cache_type_v.as_str()),
        ("q4_0", "q4_0")
    );
    assert_eq!(t.run.flash_attn, "on", "a bare -fa means on");
    assert!(!t.run.kv_rotation);
    for r in &rows {
        assert_eq!(r.layer, 0);
        if r.role == "k" || r.role == "v" {
            assert_eq!(r.ty, "q4_0", "{r:?}");
        }
    }
    // The traced inputs reproduce the traced output.
    for s in 0..5 {
        let v = attn_verify::verify_group(&t, s, 0)
            .unwrap()
            .into_result()
            .unwrap();
        assert!(v.cosine > 0.99, "{v:?}");
    }
}

/// `kqv-trace-monitor ... --save-gguf - | gguf-reader - --verify-attention`: every traced
/// attention recomputes from its traced inputs (exit 0); a trace without inputs says what
/// is missing (exit 2); a model is not a trace (exit 2).
#[test]
fn gguf_reader_verifies_attention_of_a_piped_trace() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    for ((fa, sources, code), storage) in [("on", true, 0), ("off", true, 0), ("on", false, 2)]
        .into_iter()
        .flat_map(|c| test_support::storage::BOTH.map(|s| (c, s)))
    {
        let mut args = vec![
            "--kv-storage".to_owned(),
            storage.name().to_owned(),
            "-m".to_owned(),
            m.display().to_string(),
            "-p".into(),
            PROMPT.into(),
            "-n".into(),
            "2".into(),
            "-fa".into(),
            fa.into(),
            // Greedy: with llama.cpp's random seed the tiny model samples EOS now and then
            // (about 1 run in 100), which ends the run a step early.
            "--temp".into(),
            "0".into(),
            "--save-gguf".into(),
            "-".into(),
        ];
        if !sources {
            args.push("--no-trace-sources".into());
        }
        let mut monitor = Command::new(BIN)
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let reader = Command::new(gguf_reader())
            .args(["-", "--verify-attention"])
            .stdin(monitor.stdout.take().unwrap())
            .output()
            .unwrap();
        assert!(monitor.wait().unwrap().success());
        let out = text(&reader.stdout);
        assert_eq!(
            reader.status.code(),
            Some(code),
            "fa={fa} sources={sources} {}\n{out}\n{}",
            storage.name(),
            text(&reader.stderr)
        );
        if sources {
            assert!(
                out.contains("verified 6 of 6 (step, layer) groups: 0 failed"),
                "{out}"
            );
        } else {
            assert!(out.contains("missing: q, k, v"), "{out}");
            let err = text(&reader.stderr);
            assert!(
                err.starts_with(
                    "gguf-reader: <stdin>: 6 group(s) cannot be verified, missing attention op parameters, k, q, v: \
                     the trace holds kqv_out only (it was made with --no-trace-sources); \
                     re-trace without that option: kqv-trace-monitor -m "
                ),
                "{err}"
            );
        }
    }
    let o = Command::new(gguf_reader())
        .args([m.to_str().unwrap(), "--verify-attention"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("not a kv-cache-monitor trace"));
}

/// Ctrl-C finishes the current step and saves what was traced, marked incomplete.
#[cfg(unix)]
#[test]
fn ctrl_c_saves_what_was_traced_marked_incomplete() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    for storage in test_support::storage::BOTH {
        let out = dir.path().join(format!("partial-{}.gguf", storage.name()));
        let mut child = Command::new(BIN)
            .args(test_support::storage::args(storage))
            .args([
                "-m",
                m.to_str().unwrap(),
                "-p",
                "Hi",
                "-n",
                "500",
                "-c",
                "512",
                "--ignore-eos",
                "--temp",
                "0",
                "--save-gguf",
                out.to_str().unwrap(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until statistics flow (the run is under way), then interrupt it.
        let mut first = [0u8; 4096];
        child
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut first)
            .unwrap();
        let st = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let o = child.wait_with_output().unwrap();
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(0), "{err}");
        assert!(err.contains("interrupted after"), "{err}");
        let t = TraceFile::open(&out).unwrap();
        assert!(!t.run.complete);
        let n = t.steps.len();
        assert!((1..501).contains(&n), "{n} steps");
        // Every step that was started was traced whole: both layers.
        assert_eq!(t.groups().len(), 2 * n);
        assert_eq!(t.format_version, storage.format_version());
        // and every tensor reads back whole
        for x in &t.tensors {
            assert_eq!(t.data(x).len() as u64, x.meta.layout.n_bytes().unwrap());
        }
    }
}
