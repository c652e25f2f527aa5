//! Running a tool with stderr on a pseudo-terminal (Python's `pty` module; python3 is a
//! CI prerequisite) and stdout in a file.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

/// Runs `bin` with stderr on a pty and stdout in `dir/stats.txt`, `TERM=xterm` and
/// `NO_COLOR` unset unless `env` says otherwise; returns what the pty saw and the stdout
/// file. Panics if the tool fails.
pub fn on_pty<S: AsRef<OsStr>>(
    bin: &str,
    dir: &Path,
    args: &[S],
    env: &[(&str, &str)],
) -> (Vec<u8>, String) {
    let out = dir.join("stats.txt");
    let script = r#"
import os, pty, subprocess, sys
master, slave = pty.openpty()
with open(sys.argv[1], "wb") as out:
    p = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=out, stderr=slave)
os.close(slave)
seen = b""
while True:
    try:
        chunk = os.read(master, 65536)
    except OSError:
        break
    if not chunk:
        break
    seen += chunk
code = p.wait()
sys.stdout.buffer.write(seen)
sys.exit(code)
"#;
    let mut cmd = Command::new("python3");
    cmd.arg("-c").arg(script).arg(&out).arg(bin).args(args);
    cmd.env_remove("NO_COLOR").env("TERM", "xterm");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let o = cmd.output().expect("python3");
    assert!(
        o.status.success(),
        "{bin} under a pty failed: {:?}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    let stats = std::fs::read_to_string(&out).expect("stats file");
    (o.stdout, stats)
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
