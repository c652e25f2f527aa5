//! The analyzer's live mode across llama.cpp's RPC backend: a CPU reference against the
//! same run split over two `kcm-rpc-server`s (started here, `--port 0`, killed on drop)
//! compares equal, tensor by tensor; a dead endpoint is one line and exit 2.
//! `--compare-devices`: CPU against the same configuration on RPC servers in one command
//! (bit-identical, with the report, `--json` and `--plot`); a server whose thread count
//! splits the decode's KV range otherwise differs (exit 1); a device that does not exist,
//! a dead server: one line, exit 2.

use std::net::TcpListener;
use std::process::Command;

use test_support::rpc_server::{rpc_list, RpcServer};
use test_support::LlamaArgs;

const BIN: &str = env!("CARGO_BIN_EXE_tensor-diff-analyzer");
const PROMPT: &str = "The quick brown fox jumps over a lazy dog";

#[test]
fn cpu_against_cpu_over_rpc_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("tiny.gguf");
    tiny_llama::write_model(&m, &tiny_llama::TinyLlamaConfig::default()).unwrap();
    let reference = dir.path().join("cpu.gguf");
    let args = LlamaArgs::new(&m, PROMPT)
        .n(3)
        .ubatch(16)
        .greedy()
        .threads(1)
        .flash(true);
    let monitor = test_support::workspace_bin("kqv-trace-monitor", "kqv-trace-monitor");
    let o = Command::new(monitor)
        .args(
            args.clone()
                .arg("--save-gguf")
                .arg(reference.display().to_string())
                .build(),
        )
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let (a, b) = (RpcServer::start(1), RpcServer::start(1));
    let live = args
        .arg("--rpc")
        .arg(rpc_list(&[&a, &b]))
        .arg("-ngl")
        .arg("99")
        .arg("-ts")
        .arg("1,3")
        .arg("--reference")
        .arg(reference.display().to_string())
        .build();
    let o = Command::new(BIN).args(&live).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains("Verdict: all tensors within tolerance"),
        "{out}"
    );
    // Bit-identical: every layer's worst NMSE is 0.
    for layer in ["    0   0.00e+00     -inf", "    1   0.00e+00     -inf"] {
        assert!(out.contains(layer), "{out}");
    }

    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap().to_string();
    drop(closed);
    let o = Command::new(BIN)
        .args(
            LlamaArgs::new(&m, PROMPT)
                .arg("--rpc")
                .arg(&dead)
                .arg("--reference")
                .arg(reference.display().to_string())
                .build(),
        )
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "tensor-diff-analyzer: --rpc {dead}: the RPC server is down or unreachable ("
        )),
        "{err}"
    );
}

fn tiny(dir: &std::path::Path) -> std::path::PathBuf {
    let m = dir.join("tiny.gguf");
    tiny_llama::write_model(&m, &tiny_llama::TinyLlamaConfig::default()).unwrap();
    m
}

fn compare_devices(args: LlamaArgs, a: &str, b: &str) -> (Option<i32>, String, String) {
    let o = Command::new(BIN)
        .args(args.arg("--compare-devices").arg(a).arg(b).build())
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `--compare-devices cpu rpc:...`: both sides run in one command, every tensor is
/// compared, and the CPU backend a server runs (same kernels, same thread count) computes
/// what the local CPU computes bit for bit: flash attention on and off, the model split
/// across two servers with `-ts 1,3`.
#[test]
fn compare_devices_cpu_against_two_servers_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let (a, b) = (RpcServer::start(1), RpcServer::start(1));
    let remote = format!("rpc:{},{}", a.endpoint(), b.endpoint());
    for fa in [true, false] {
        let args = LlamaArgs::new(&m, PROMPT)
            .n(3)
            .ubatch(16)
            .greedy()
            .threads(1)
            .flash(fa)
            .args(["-ngl", "99", "-ts", "1,3"]);
        let (code, out, err) = compare_devices(args, "cpu", &remote);
        assert_eq!(code, Some(0), "fa {fa}: {out}\n{err}");
        assert!(err.is_empty(), "{err}");
        for want in [
            "Reference file: side A, cpu (a temporary trace)",
            &format!("Current: side B, {remote} (a temporary trace, side A's tokens replayed)"),
            "  A (reference): cpu: llama.cpp -dev none; attention ran on CPU (layers 0-1)",
            &format!(
                "  B (current): {remote}: llama.cpp --rpc {},{} -dev RPC0,RPC1; attention ran on RPC",
                a.endpoint(),
                b.endpoint()
            ),
            "Bit-identical: yes, every element of the ",
            "Unmatched tensors: 0 (reference 0, current 0); not comparable: 0",
            "First out of tolerance: none",
            "the reference's next token at 4 of 4 steps (100.0%)",
            "Verdict: all tensors within tolerance",
        ] {
            assert!(out.contains(want), "fa {fa}: {want:?} in\n{out}");
        }
        // Every tensor of both traces was compared: 4 steps x 2 layers, each with its
        // attention's inputs and output.
        let total: usize = out
            .lines()
            .find_map(|l| l.strip_prefix("Total comparisons: "))
            .and_then(|n| n.parse().ok())
            .unwrap();
        assert!(total >= 4 * 2 * 5, "{out}");
        assert!(
            out.contains(&format!("Compared {total}, skipped 0")),
            "{out}"
        );
        assert!(
            out.contains(&format!(
                "Bit-identical: yes, every element of the {total} compared"
            )),
            "{out}"
        );
    }

    // --json and --plot, the same run.
    let svg = dir.path().join("devices.svg");
    let args = LlamaArgs::new(&m, PROMPT)
        .n(2)
        .greedy()
        .threads(1)
        .args(["-ngl", "99", "--json", "--plot"])
        .arg(svg.display().to_string());
    let (code, out, err) = compare_devices(args, "none", &format!("rpc:{}", a.endpoint()));
    assert_eq!(code, Some(0), "{out}\n{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    let d = &doc["devices"];
    assert_eq!(d["bit_identical"], true, "{d}");
    assert_eq!(d["identical_tensors"], doc["total_comparisons"], "{d}");
    assert_eq!(d["a"]["llama_args"], serde_json::json!(["-dev", "none"]));
    assert_eq!(
        d["b"]["llama_args"],
        serde_json::json!(["--rpc", a.endpoint(), "-dev", "RPC0"])
    );
    assert_eq!(
        d["b"]["backends"],
        format!("RPC0[{}] (layers 0-1)", a.endpoint())
    );
    assert_eq!(doc["exit_code"], 0);
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
}

/// The failing path, from an honest device difference: a server started with 3 threads
/// splits a single-token flash attention's KV range (>= 512 cells) into 3 chunks where
/// the local CPU (`-t 1`) takes it in one, so the decode steps differ in the last bits
/// (the prompt's ubatch does not: that path does not depend on the thread count). The
/// same server with the same thread count is bit-identical (the test above).
#[test]
fn compare_devices_finds_a_server_that_splits_the_kv_range_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let server = RpcServer::start(3);
    // The tiny model's tokenizer takes a character per token: about 590 cells.
    let prompt = vec!["the quick brown fox jumps over a lazy dog"; 14].join(" ");
    let args = LlamaArgs::new(&m, &prompt)
        .n(3)
        .ctx(1024)
        .greedy()
        .threads(1)
        .flash(true)
        .args(["-ngl", "99"]);
    let (code, out, err) = compare_devices(args, "cpu", &format!("rpc:{}", server.endpoint()));
    assert_eq!(code, Some(1), "{out}\n{err}");
    // Steps 0 and 1 are the prompt's ubatches (512 + the rest): equal; step 2 is the
    // first single-token decode.
    for want in [
        "Bit-identical: no, ",
        "First out of tolerance: step 2, layer 0 (kqv_out, attn)",
        "Verdict: tensors outside tolerance",
    ] {
        assert!(out.contains(want), "{want:?} in\n{out}");
    }
    let steps_outside: std::collections::BTreeSet<&str> = out
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("kqv_out_kqv_out-"))
        .filter_map(|l| l.split(':').next()?.split("_step_").nth(1))
        .collect();
    assert_eq!(
        steps_outside.into_iter().collect::<Vec<_>>(),
        ["2", "3", "4"],
        "{out}"
    );
}

/// A device the build does not have, a server that is down, a selection that is not
/// one: one line each, exit 2, before any run.
#[test]
fn compare_devices_refuses_a_bad_device_or_a_dead_server_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap().to_string();
    drop(closed);
    for (a, b, want) in [
        (
            "cpu",
            "CUDA7",
            "tensor-diff-analyzer: --compare-devices side B (CUDA7): no device CUDA7 (this \
             build has none besides the CPU; an RPC server is written rpc:HOST:PORT)"
                .to_owned(),
        ),
        (
            "RPC0",
            "cpu",
            "tensor-diff-analyzer: --compare-devices side A (RPC0): no device RPC0".to_owned(),
        ),
        (
            "cpu",
            &format!("rpc:{dead}"),
            format!(
                "tensor-diff-analyzer: --compare-devices side B (rpc:{dead}): --rpc {dead}: \
                 the RPC server is down or unreachable ("
            ),
        ),
        (
            "cpu",
            "127.0.0.1:1",
            "tensor-diff-analyzer: --compare-devices \"127.0.0.1:1\": 127.0.0.1:1: an RPC \
             server is written rpc:HOST:PORT (try --help)"
                .to_owned(),
        ),
    ] {
        let (code, out, err) = compare_devices(LlamaArgs::new(&m, PROMPT), a, b);
        assert_eq!(code, Some(2), "{a} {b}: {err}");
        assert!(out.is_empty(), "{out}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with(&want), "{err}\nwanted {want}");
    }
    // The sides choose their devices: --rpc with it is a usage error.
    let o = Command::new(BIN)
        .args(
            LlamaArgs::new(&m, PROMPT)
                .args(["--rpc", "127.0.0.1:1", "--compare-devices", "cpu", "cpu"])
                .build(),
        )
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains(
        "--compare-devices runs both sides itself: --rpc (each side's devices are its selection)"
    ));
}

/// gemma-3-270m Q4_K_M split across two servers (`-ngl 99 -ts 1,3`), compared with the
/// local CPU in one command. The local CPU backend repacks some quantized weights into
/// interleaved layouts (llama.cpp's CPU_REPACK buffers, on AVX2 builds Q4_K among them)
/// and multiplies them with other kernels; a server's buffers are not repacked, so its
/// matrix products add in another order: the sides differ (exit 1, the report says from
/// which step and layer; with this prompt the first decode step, layer 8). With `-nr` (llama.cpp's `--no-repack`) both run the same kernels:
/// bit-identical.
#[test]
fn compare_devices_on_gemma_finds_weight_repacking_and_without_it_is_bit_identical() {
    let model =
        model_fetch::gemma3_270m(&model_fetch::default_cache_dir()).expect("fetch gemma-3-270m");
    let (a, b) = (RpcServer::start(1), RpcServer::start(1));
    let remote = format!("rpc:{},{}", a.endpoint(), b.endpoint());
    let args = || {
        LlamaArgs::new(&model, "Hello, world")
            .n(2)
            .threads(1)
            .greedy()
            .flash(true)
            .args(["-ngl", "99", "-ts", "1,3"])
    };
    let (code, out, err) = compare_devices(args().arg("-nr"), "cpu", &remote);
    assert_eq!(code, Some(0), "{out}\n{err}");
    for want in [
        "Bit-identical: yes, every element of the ".to_owned(),
        "attention ran on CPU (layers 0-17)".to_owned(),
        format!("RPC0[{}] (layers 0-", a.endpoint()),
        format!("RPC0[{}] (layers ", b.endpoint()),
        "Verdict: all tensors within tolerance".to_owned(),
    ] {
        assert!(out.contains(&want), "{want:?} in\n{out}");
    }
    let avx2 = ggml_trace::cpu_simd()
        .split_whitespace()
        .any(|f| f == "avx2");
    if avx2 {
        let (code, out, err) = compare_devices(args(), "cpu", &remote);
        assert_eq!(code, Some(1), "{out}\n{err}");
        assert!(out.contains("Bit-identical: no, "), "{out}");
        assert!(!out.contains("First out of tolerance: none"), "{out}");
    }
}

/// A server that dies while its side runs: the side's own line (which server, how many
/// steps were traced), prefixed with the side, exit 2; nothing is compared.
#[test]
fn compare_devices_with_a_server_killed_mid_run_is_one_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path());
    let mut server = RpcServer::start(1);
    let remote = format!("rpc:{}", server.endpoint());
    let args = LlamaArgs::new(&m, PROMPT)
        .n(4000)
        .ctx(4096)
        .ubatch(16)
        .greedy()
        .threads(1)
        .args([
            "--ignore-eos",
            "-ngl",
            "99",
            "--compare-devices",
            &remote,
            "cpu",
        ])
        .build();
    let child = Command::new(BIN)
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Side A (the server's) generates 4,000 tokens: it is still running after a second.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    server.kill();
    let o = child.wait_with_output().unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert_eq!(o.status.code(), Some(2), "{out}\n{err}");
    assert!(out.is_empty(), "{out}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "tensor-diff-analyzer: --compare-devices side A ({remote}): "
        )) && err.contains("mid-run")
            && err.contains(&server.endpoint())
            && err.trim_end().ends_with("nothing is compared)"),
        "{err}"
    );
}
