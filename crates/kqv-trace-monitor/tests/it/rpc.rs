//! The tiny model split across llama.cpp's RPC backend (`--rpc`, our `kcm-rpc-server` on
//! loopback): every group verifies, the traced values are the local run's bit for bit
//! (the servers run the same ggml-cpu kernels with the same thread count), the trace names
//! each layer's backend and the endpoints; a dead endpoint, a listener that answers
//! garbage, a server killed mid-run and the mixed KV cache with `--rpc` each end in one
//! line with a documented exit code. Each test starts its own servers (`--port 0`) and
//! kills only those.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use test_support::rpc_server::{rpc_list, RpcServer};
use test_support::LlamaArgs;
use trace_format::{keys, Role, TraceFile};

const BIN: &str = env!("CARGO_BIN_EXE_kqv-trace-monitor");
/// 43 prompt tokens in ubatches of 16 (3 steps), then 3 generated tokens: 12 groups.
const PROMPT: &str = "The quick brown fox jumps over a lazy dog";

fn model(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.gguf");
    tiny_llama::write_model(&path, &tiny_llama::TinyLlamaConfig::default()).unwrap();
    path
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn base(model: &Path, fa: bool, ctk: &str, ctv: &str) -> LlamaArgs {
    LlamaArgs::new(model, PROMPT)
        .n(3)
        .ubatch(16)
        .greedy()
        .threads(1)
        .flash(fa)
        .cache(ctk, ctv)
}

/// Runs the monitor with `args` and `--save-gguf out`; asserts exit 0 and every group
/// verified.
fn traced(args: LlamaArgs, out: &Path) -> TraceFile {
    traced_err(args, out).0
}

/// [`traced`], with the monitor's stderr.
fn traced_err(args: LlamaArgs, out: &Path) -> (TraceFile, String) {
    let args = args
        .arg("--verify")
        .arg("--save-gguf")
        .arg(out.display().to_string())
        .build();
    let o = Command::new(BIN).args(&args).output().unwrap();
    let stdout = text(&o.stdout);
    assert!(o.status.success(), "{args:?}\n{}", text(&o.stderr));
    assert!(
        stdout.contains("verify: verified 12 of 12 (step, layer) groups: 0 failed, 0 missing"),
        "{args:?}\n{}",
        stdout
            .lines()
            .filter(|l| l.starts_with("verify"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Every group, remote ones included, is judged by the CPU kernel model it matches (a
    // kcm-rpc-server computes with this build's CPU kernels), not the looser exact bound.
    let exact: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("verify step") && l.contains("kernel exact"))
        .collect();
    assert!(exact.is_empty(), "{args:?}\n{}", exact.join("\n"));
    (TraceFile::open(out).unwrap(), text(&o.stderr))
}

/// The same (step, layer, role) tensors with the same types, shapes and bytes.
fn assert_same_values(local: &TraceFile, remote: &TraceFile, what: &str) {
    let key = |t: &trace_format::TracedTensor| (t.meta.step, t.meta.layer, t.meta.role);
    let mut a: Vec<_> = local.tensors.iter().collect();
    let mut b: Vec<_> = remote.tensors.iter().collect();
    a.sort_by_key(|t| key(t));
    b.sort_by_key(|t| key(t));
    assert_eq!(
        a.iter().map(|t| key(t)).collect::<Vec<_>>(),
        b.iter().map(|t| key(t)).collect::<Vec<_>>(),
        "{what}: the same tensors"
    );
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.meta.layout.ty, y.meta.layout.ty, "{what} {:?}", key(x));
        assert_eq!(x.meta.layout.ne, y.meta.layout.ne, "{what} {:?}", key(x));
        assert!(
            local.data(x) == remote.data(y),
            "{what}: step {} layer {} {:?} differs from the local run",
            x.meta.step,
            x.meta.layer,
            x.meta.role
        );
    }
    assert_eq!(local.steps, remote.steps, "{what}: the same tokens");
}

/// The backend each layer's attention ran on, the same at every step.
fn backends(t: &TraceFile) -> Vec<String> {
    let n = t.attn.iter().map(|a| a.layer).max().unwrap_or(-1) + 1;
    (0..n)
        .map(|l| {
            let mut names: Vec<&str> = t
                .attn
                .iter()
                .filter(|a| a.layer == l)
                .map(|a| a.backend.as_str())
                .collect();
            names.dedup();
            assert_eq!(names.len(), 1, "layer {l}: {names:?}");
            names[0].to_owned()
        })
        .collect()
}

#[test]
fn split_across_two_servers_verifies_and_equals_the_local_run() {
    let dir = tempfile::tempdir().unwrap();
    let m16 = model(dir.path());
    // q8_0 blocks of 32 need heads of 32 (the default tiny model's are 16).
    let m32 = tiny_llama::write_with_head_dim(dir.path(), 32).unwrap();
    let (a, b) = (RpcServer::start(1), RpcServer::start(1));
    let rpc = rpc_list(&[&a, &b]);
    // A quantized V cache needs flash attention: without it, q8_0 K only.
    for (fa, ctk, ctv) in [
        (true, "f16", "f16"),
        (false, "f16", "f16"),
        (true, "q8_0", "q8_0"),
        (false, "q8_0", "f16"),
    ] {
        let what = format!("-fa {fa} -ctk {ctk} -ctv {ctv}");
        let m = if ctk == "f16" { &m16 } else { &m32 };
        let local = traced(
            base(m, fa, ctk, ctv),
            &dir.path().join(format!("local-{fa}-{ctk}.gguf")),
        );
        let remote = traced(
            base(m, fa, ctk, ctv)
                .arg("--rpc")
                .arg(&rpc)
                .arg("-ngl")
                .arg("99")
                .arg("-ts")
                .arg("1,3"),
            &dir.path().join(format!("rpc-{fa}-{ctk}.gguf")),
        );
        assert_same_values(&local, &remote, &what);
        assert_eq!(backends(&local), ["CPU", "CPU"], "{what}");
        assert_eq!(
            backends(&remote),
            [
                format!("RPC0[{}]", a.endpoint()),
                format!("RPC0[{}]", b.endpoint())
            ],
            "{what}: -ts 1,3 puts layer 0 on the first server, layer 1 on the second"
        );
        assert_eq!(remote.run.rpc_endpoints, [a.endpoint(), b.endpoint()]);
        assert!(local.run.rpc_endpoints.is_empty());
        assert!(remote.run.complete);
    }
}

#[test]
fn a_mixed_local_and_remote_split_names_each_layers_backend() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let a = RpcServer::start(1);
    let local = traced(base(&m, true, "f16", "f16"), &dir.path().join("local.gguf"));
    // -ngl 2: the last layer and the output on the server, layer 0 here.
    let path = dir.path().join("mixed.gguf");
    let mixed = traced(
        base(&m, true, "f16", "f16")
            .arg("--rpc")
            .arg(a.endpoint())
            .arg("-ngl")
            .arg("2"),
        &path,
    );
    assert_same_values(&local, &mixed, "-ngl 2");
    assert_eq!(
        backends(&mixed),
        ["CPU".to_string(), format!("RPC0[{}]", a.endpoint())]
    );
    // gguf-reader shows the endpoints and the backends.
    let reader = test_support::workspace_bin("gguf-reader", "gguf-reader");
    let o = Command::new(reader)
        .arg(&path)
        .arg("--full-arrays")
        .output()
        .unwrap();
    let shown = text(&o.stdout);
    assert!(o.status.success());
    let line = |key: &str| {
        shown
            .lines()
            .find(|l| l.trim_start().starts_with(key))
            .unwrap_or_else(|| panic!("no {key} in\n{shown}"))
            .to_owned()
    };
    assert!(line(keys::RUN_RPC_ENDPOINTS).ends_with(&format!("[\"{}\"]", a.endpoint())));
    assert!(line(keys::ATTN_BACKEND).contains(&format!("\"CPU\", \"RPC0[{}]\"", a.endpoint())));
}

fn monitor_line(args: &[String]) -> (Option<i32>, String, String) {
    let o = Command::new(BIN).args(args).output().unwrap();
    (o.status.code(), text(&o.stdout), text(&o.stderr))
}

#[test]
fn a_dead_endpoint_or_a_garbage_listener_is_one_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let live = RpcServer::start(1);
    // A port nobody listens on (bound, then closed).
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap().to_string();
    drop(closed);
    let args = base(&m, true, "f16", "f16")
        .arg("--rpc")
        .arg(format!("{},{dead}", live.endpoint()))
        .arg("-ngl")
        .arg("99")
        .build();
    let (code, out, err) = monitor_line(&args);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(out, "");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "kqv-trace-monitor: --rpc {dead}: the RPC server is down or unreachable ("
        )),
        "{err}"
    );

    // A plain TCP listener that answers garbage.
    let garbage = TcpListener::bind("127.0.0.1:0").unwrap();
    let ep = garbage.local_addr().unwrap().to_string();
    let answer = std::thread::spawn(move || {
        let (mut s, _) = garbage.accept().unwrap();
        let mut req = [0u8; 33];
        let _ = s.read_exact(&mut req);
        let _ = s.write_all(b"SSH-2.0-OpenSSH_9.6\r\n and more garbage");
    });
    let args = base(&m, true, "f16", "f16")
        .arg("--rpc")
        .arg(&ep)
        .arg("-ngl")
        .arg("99")
        .build();
    let (code, out, err) = monitor_line(&args);
    answer.join().unwrap();
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(out, "");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "kqv-trace-monitor: --rpc {ep}: does not speak ggml's RPC protocol ("
        )),
        "{err}"
    );
}

#[test]
fn the_mixed_kv_cache_with_rpc_is_refused_before_any_server_is_contacted() {
    if ggml_trace::skip_without_mixed_kv(
        "the_mixed_kv_cache_with_rpc_is_refused_before_any_server_is_contacted",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    // A listener that would see any connection.
    let watch = TcpListener::bind("127.0.0.1:0").unwrap();
    let ep = watch.local_addr().unwrap().to_string();
    let args = base(&m, true, "f16", "f16")
        .arg("--mixed-kv-cache")
        .arg("--rpc")
        .arg(&ep)
        .build();
    let (code, _, err) = monitor_line(&args);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(
        err,
        "kqv-trace-monitor: --mixed-kv-cache cannot run with --rpc: its attention node is a \
         custom op, whose function pointer an RPC server would call in its own process\n"
    );
    watch.set_nonblocking(true).unwrap();
    assert_eq!(
        watch.accept().map(|_| ()).unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "nothing connected"
    );
}

#[test]
fn a_server_killed_mid_run_ends_in_one_line_and_an_incomplete_trace() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let mut server = RpcServer::start(1);
    let out = dir.path().join("partial.gguf");
    let args = LlamaArgs::new(&m, PROMPT)
        .n(4000)
        .ctx(4096)
        .ubatch(16)
        .greedy()
        .threads(1)
        .arg("--ignore-eos")
        .arg("--rpc")
        .arg(server.endpoint())
        .arg("-ngl")
        .arg("99")
        .arg("--save-gguf")
        .arg(out.display().to_string())
        .build();
    let mut child = Command::new(BIN)
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Statistics lines come while it runs: kill the server once some steps are traced.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for _ in 0..200 {
        lines.next().expect("statistics").unwrap();
    }
    server.kill();
    for l in lines {
        l.unwrap();
    }
    let o = child.wait_with_output().unwrap();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    // Named as the one that stopped answering, or (when its port already accepts
    // connections again: another process took it) among the run's servers.
    let named = format!(
        "kqv-trace-monitor: the RPC server {} stopped answering mid-run (",
        server.endpoint()
    );
    let listed = format!("; servers: {})", server.endpoint());
    assert!(
        err.starts_with(&named)
            || err.starts_with("kqv-trace-monitor: an RPC backend failed mid-run (")
                && err.contains(&listed),
        "{err}"
    );
    assert!(
        err.trim_end()
            .ends_with("what was traced is saved (marked incomplete)"),
        "{err}"
    );
    let t = TraceFile::open(&out).unwrap();
    assert!(!t.run.complete);
    assert!(t.steps.len() >= 3, "{} steps", t.steps.len());
    assert!(t.first_problem().is_none());
    // The saved groups are whole: the first steps verify.
    for step in 0..3 {
        for layer in 0..2 {
            let v = attn_verify::check_in_trace(&t, step, layer)
                .unwrap()
                .into_result()
                .unwrap();
            assert!(v.pass, "step {step} layer {layer}");
        }
    }
    assert!(t
        .tensors
        .iter()
        .any(|x| x.meta.role == Role::KqvOut && x.meta.step >= 3));
}

/// The bytes of the K and V views' spans of `layer` at `step`, and the bytes of one
/// cache cell of each (with flash attention the views are [head_dim, n_kv, n_head_kv],
/// a cell's heads contiguous: a cell is dimension 1's stride).
fn kv_span_and_cell(t: &TraceFile, step: u32, layer: i32) -> (u64, u64) {
    let mut span = 0;
    let mut cell = 0;
    for x in t.tensors.iter().filter(|x| {
        x.meta.step == step && x.meta.layer == layer && matches!(x.meta.role, Role::K | Role::V)
    }) {
        span += x.meta.layout.span_bytes().unwrap();
        cell += x.meta.layout.nb[1];
    }
    (span, cell)
}

/// The capture counts what it reads from the servers (per step, in the trace and on
/// stderr), and reads a remote K/V view only where the step wrote it: the trace equals the
/// one read whole (`--kv-audit 1` turns the write tracking off) and the local run's, and
/// each generated token reads the two views' spans less one written cell each (and the
/// 8-byte `SET_ROWS` indices) fewer bytes than the whole reads. With an audit every 2nd
/// step (a whole read that checks the log) the trace is the same too.
#[test]
fn the_capture_counts_its_rpc_reads_and_reads_a_remote_kv_view_only_where_written() {
    let dir = tempfile::tempdir().unwrap();
    let m16 = model(dir.path());
    // q8_0 blocks of 32 need heads of 32 (the default tiny model's are 16).
    let m32 = tiny_llama::write_with_head_dim(dir.path(), 32).unwrap();
    let (a, b) = (RpcServer::start(1), RpcServer::start(1));
    let rpc = rpc_list(&[&a, &b]);
    for (fa, ct) in [(true, "f16"), (false, "f16"), (true, "q8_0")] {
        let what = format!("-fa {fa} -ctk/-ctv {ct}");
        let m = if ct == "f16" { &m16 } else { &m32 };
        let remote = || {
            base(m, fa, ct, ct)
                .arg("--rpc")
                .arg(&rpc)
                .arg("-ngl")
                .arg("99")
                .arg("-ts")
                .arg("1,3")
        };
        let file = |name: &str| dir.path().join(format!("{name}-{fa}-{ct}.gguf"));
        let local = traced(base(m, fa, ct, ct), &file("local"));
        let (delta, err) = traced_err(remote(), &file("delta"));
        let whole = traced(remote().arg("--kv-audit").arg("1"), &file("whole"));
        let audited = traced(remote().arg("--kv-audit").arg("2"), &file("audited"));
        assert_same_values(&local, &delta, &what);
        assert_same_values(&whole, &delta, &what);
        assert_same_values(&audited, &delta, &what);
        assert!(
            local.run.rpc_read_bytes.is_empty(),
            "{what}: a local run reads no RPC"
        );
        let (d, w) = (&delta.run.rpc_read_bytes, &whole.run.rpc_read_bytes);
        assert_eq!(d.len(), 6, "{what}: one count per step: {d:?}");
        assert_eq!(w.len(), 6, "{what}: {w:?}");
        // The stderr line: the total, and the median of the 3 generated tokens' steps.
        let mut tokens: Vec<u64> = d[3..].to_vec();
        tokens.sort_unstable();
        assert!(
            err.contains(&format!(
                "kqv-trace-monitor: the capture read {} bytes from the RPC servers in 6 steps; \
                 per generated token: {} bytes (median of 3 one-token steps)",
                d.iter().sum::<u64>(),
                tokens[1]
            )),
            "{what}: {err}"
        );
        eprintln!("{what}: counted per step, delta reads {d:?}, whole reads {w:?}");
        // The prompt's first step sees every view for the first time: read whole (and
        // no write is followed before a view is kept).
        assert_eq!(d[0], w[0], "{what}: first sight");
        for step in 3..6u32 {
            let s = step as usize;
            let (mut span, mut cells) = (0, 0);
            for layer in 0..2 {
                let (sp, c) = kv_span_and_cell(&whole, step, layer);
                span += sp;
                cells += c;
            }
            if fa {
                // Each layer's K and V: one cell (f16 values or q8_0 blocks) read instead
                // of the span; the index
                // tensors (one I64 per token, K's and V's, a copy on each server) read once.
                assert_eq!(
                    w[s] - d[s],
                    span - cells - 4 * 8,
                    "{what}: step {step}: whole {} delta {} (K/V spans {span}, cells {cells})",
                    w[s],
                    d[s]
                );
                assert!(d[s] * 4 < w[s], "{what}: step {step}: {} vs {}", d[s], w[s]);
            } else {
                // The transposed V cache scatters a token's values over its whole view
                // (read as one merged request); K is read by its cell.
                assert!(d[s] < w[s], "{what}: step {step}: {} vs {}", d[s], w[s]);
            }
        }
    }
}
