//! Live mode's progress line: on stderr when it is a terminal, erased before the summary,
//! never in stdout's data, and absent with `--quiet`.

use test_support::pty;

const BIN: &str = env!("CARGO_BIN_EXE_tensor-diff-analyzer");

#[test]
fn live_progress_on_a_terminal_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = d.join("tiny.gguf");
    tiny_llama::write_model(&model, &tiny_llama::TinyLlamaConfig::default()).unwrap();
    let m = model.to_str().unwrap();
    let reference = d.join("ref.gguf");
    let r = reference.to_str().unwrap();
    let llama = [
        "-m",
        m,
        "-p",
        "Hello world",
        "-n",
        "3",
        "-t",
        "2",
        "--temp",
        "0",
    ];
    let mut trace: Vec<String> = llama.iter().map(|s| s.to_string()).collect();
    trace.extend(["--save-gguf".into(), r.into()]);
    match kcm_cli::capture_args::parse(trace).unwrap() {
        kcm_cli::capture_args::Command::Run(o) => kcm_cli::trace::run(&o).unwrap(),
        c => panic!("{c:?}"),
    }

    let mut args = llama.to_vec();
    args.extend(["--reference", r]);
    let (tty, summary) = pty::on_pty(BIN, d, &args, &[]);
    let text = String::from_utf8_lossy(&tty);
    assert!(
        text.contains("tensor-diff-analyzer"),
        "no progress: {text:?}"
    );
    assert!(text.contains("tokens"), "{text:?}");
    assert!(
        pty::contains(&tty, b"\r\x1b[2K"),
        "not redrawn in place: {text:?}"
    );
    assert!(tty.ends_with(b"\r\x1b[2K"), "not erased: {text:?}");
    assert!(
        summary.contains("=== TENSOR DIFFERENCE ANALYSIS SUMMARY ==="),
        "{summary}"
    );
    assert!(
        !summary.contains('\x1b') && !summary.contains('\r'),
        "{summary:?}"
    );

    args.push("--quiet");
    let (tty, summary) = pty::on_pty(BIN, d, &args, &[]);
    assert!(
        tty.is_empty(),
        "--quiet printed {:?}",
        String::from_utf8_lossy(&tty)
    );
    assert!(summary.contains("=== TENSOR DIFFERENCE ANALYSIS SUMMARY ==="));
}
