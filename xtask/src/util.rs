//! Small helpers shared by the subcommands.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Errors are plain messages: xtask prints them and exits non-zero.
pub type Result<T = ()> = std::result::Result<T, String>;

/// The workspace root (the parent of `xtask/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// `cargo`, the same binary that runs xtask when available.
pub fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root());
    cmd
}

/// Runs `cmd`, failing with its command line when it cannot start or exits non-zero.
pub fn run(cmd: &mut Command) -> Result {
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed: {status}"))
    }
}

/// Runs `cmd` and returns its stdout (stderr passes through).
pub fn output(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(format!("{cmd:?} failed: {}", out.status))
    }
}

/// Fails when options or arguments were left unparsed.
pub fn finish(args: pico_args::Arguments) -> Result<Vec<OsString>> {
    Ok(args.finish())
}

/// Rejects leftover arguments for commands that take none.
pub fn no_more_args(args: pico_args::Arguments) -> Result {
    let rest = finish(args)?;
    if rest.is_empty() {
        Ok(())
    } else {
        Err(format!("unexpected arguments: {rest:?}"))
    }
}

/// The packages holding the three user-facing binaries.
pub const BINARY_PACKAGES: [&str; 4] = [
    "kqv-trace-monitor",
    "gguf-reader",
    "tensor-diff-analyzer",
    "kcm-rpc-server",
];

/// Cargo's target directory: `$CARGO_TARGET_DIR` or `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            // Relative to the directory cargo was started in, as cargo reads it.
            match std::env::current_dir() {
                Ok(cwd) if dir.is_relative() => cwd.join(dir),
                _ => dir,
            }
        }
        None => workspace_root().join("target"),
    }
}

/// `s` as a POSIX shell word: unchanged when it is made of safe characters,
/// single-quoted otherwise.
pub fn shell_quote(s: &str) -> String {
    let safe = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
    if safe {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}
