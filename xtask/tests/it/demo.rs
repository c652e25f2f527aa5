//! The README's first command, `cargo xtask demo`, as a new user runs it: it must
//! succeed, print each step's command, verify every traced attention and end with the
//! comparison's verdict.

use std::path::Path;
use std::process::Command;

#[test]
fn cargo_xtask_demo_runs_every_step() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("root");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let o = Command::new(cargo)
        .args(["run", "--quiet", "-p", "xtask", "--", "demo"])
        .current_dir(root)
        .output()
        .expect("cannot run cargo");
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "demo failed:\n{out}\n{err}");

    // Each step announced with the command as typed, in order.
    let steps = [
        "$ target/debug/examples/write_tiny_llama target/demo/tiny-llama.gguf --head-dim 32",
        "$ target/debug/kqv-trace-monitor -m target/demo/tiny-llama.gguf",
        "$ target/debug/gguf-reader target/demo/tiny-trace-f16.gguf --count 4",
        "$ target/debug/gguf-reader target/demo/tiny-trace-f16.gguf --verify-attention",
        "-ctk q8_0 -ctv q8_0 --save-gguf target/demo/tiny-trace-q8_0.gguf",
        "$ target/debug/tensor-diff-analyzer --reference target/demo/tiny-trace-f16.gguf --current target/demo/tiny-trace-q8_0.gguf",
    ];
    let mut at = 0;
    for s in steps {
        let found = err[at..]
            .find(s)
            .unwrap_or_else(|| panic!("step `{s}` missing or out of order in:\n{err}"));
        at += found + s.len();
    }
    // The trace verifies (2 layers x 5 steps), and the q8_0 comparison has a verdict.
    assert!(
        out.contains("verified 10 of 10 (step, layer) groups: 0 failed"),
        "{out}"
    );
    assert!(
        out.contains("=== TENSOR DIFFERENCE ANALYSIS SUMMARY ==="),
        "{out}"
    );
    assert!(
        err.contains("xtask demo: done. Exit status of the comparison:"),
        "{err}"
    );
    for f in [
        "tiny-llama.gguf",
        "tiny-trace-f16.gguf",
        "tiny-trace-q8_0.gguf",
    ] {
        assert!(root.join("target/demo").join(f).is_file(), "{f} missing");
    }
}
