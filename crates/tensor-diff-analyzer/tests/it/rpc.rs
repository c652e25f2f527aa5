//! The analyzer's live mode across llama.cpp's RPC backend: a CPU reference against the
//! same run split over two `kcm-rpc-server`s (started here, `--port 0`, killed on drop)
//! compares equal, tensor by tensor; a dead endpoint is one line and exit 2.

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
