//! The progress line: drawn on stderr only when stderr is a terminal and the statistics
//! go to a redirected stdout; never with `--quiet`; colourless with `NO_COLOR`; erased at
//! the end. A pseudo-terminal comes from Python's `pty` module (python3 is a CI
//! prerequisite); the monitor's stdout goes to a file.

use test_support::{pty, LlamaArgs};

use pty::contains;

const BIN: &str = env!("CARGO_BIN_EXE_kqv-trace-monitor");

#[test]
fn progress_line_on_a_terminal_only_and_never_in_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = d.join("tiny.gguf");
    tiny_llama::write_model(&model, &tiny_llama::TinyLlamaConfig::default()).unwrap();
    let m = model.to_str().unwrap();
    let save = d.join("t.gguf");
    let s = save.to_str().unwrap();
    let args = LlamaArgs::new(m, "Hello world")
        .n(3)
        .threads(2)
        .greedy()
        .arg("--save-gguf")
        .arg(s)
        .build();

    // stderr on a terminal, statistics redirected: progress drawn, then erased.
    let (tty, stats) = pty::on_pty(BIN, d, &args, &[]);
    let text = String::from_utf8_lossy(&tty);
    assert!(
        text.contains("kqv-trace-monitor"),
        "no progress line: {text:?}"
    );
    assert!(text.contains("tokens"), "{text:?}");
    assert!(
        contains(&tty, b"\r\x1b[2K"),
        "line not redrawn in place: {text:?}"
    );
    assert!(
        tty.ends_with(b"\r\x1b[2K"),
        "progress not erased at the end: {text:?}"
    );
    assert!(
        contains(&tty, b"\x1b[2m"),
        "dim label expected with colour allowed: {text:?}"
    );
    // The data stays clean.
    assert!(
        !stats.contains('\x1b') && !stats.contains('\r'),
        "{stats:?}"
    );
    assert!(stats.contains("kqv_out-0"), "{stats}");

    // NO_COLOR: still a progress line, no colour.
    let (tty, _) = pty::on_pty(BIN, d, &args, &[("NO_COLOR", "1")]);
    assert!(String::from_utf8_lossy(&tty).contains("tokens"));
    assert!(
        !contains(&tty, b"\x1b[2m"),
        "{:?}",
        String::from_utf8_lossy(&tty)
    );

    // --quiet: nothing at all on the terminal.
    let mut quiet = args.to_vec();
    quiet.push("--quiet".into());
    let (tty, stats) = pty::on_pty(BIN, d, &quiet, &[]);
    assert!(
        tty.is_empty(),
        "--quiet printed {:?}",
        String::from_utf8_lossy(&tty)
    );
    assert!(stats.contains("kqv_out-0"));
}
