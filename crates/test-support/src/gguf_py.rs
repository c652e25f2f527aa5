//! Shared helpers for integration tests that use gguf-py (PyPI `gguf`) as an oracle.
//!
//! [`python()`] returns the interpreter of a virtualenv at
//! `<workspace>/target/gguf-py-venv` holding `gguf==0.19.0`, numpy and safetensors (the
//! oracle of `gguf-reader --export`), creating it on
//! first use (needs `python3` with the `venv` module and network access to PyPI). Test
//! binaries run concurrently, so creation is serialized with a lock directory and the
//! venv is built in a temporary directory that is renamed into place only when complete.
//!
//! Set `GGUF_PY_PYTHON` to an interpreter that already has `gguf` and numpy to skip the
//! venv altogether, and `GGUF_PY_PYTHON3` to pick the interpreter the venv is made from.
//!

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

/// What the venv must contain; written to its marker file, so a change rebuilds it.
pub const GGUF_PY_REQUIREMENTS: &[&str] = &["gguf==0.19.0", "numpy", "safetensors"];

/// A lock older than this is taken to belong to a process that died mid-install.
const STALE_LOCK: Duration = Duration::from_secs(20 * 60);
/// How long to wait for another process to finish the venv.
const WAIT_LIMIT: Duration = Duration::from_secs(30 * 60);

/// The workspace root (`crates/test-support/../..`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("..")
}

/// The venv's Python, creating the venv on first use. Panics with an explanation if it
/// cannot be created.
pub fn python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            if let Some(p) = std::env::var_os("GGUF_PY_PYTHON") {
                return PathBuf::from(p);
            }
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace_root().join("target"));
            ensure_venv(&target.join("gguf-py-venv"))
                .unwrap_or_else(|e| panic!("cannot set up the gguf-py venv: {e}"))
        })
        .clone()
}

/// Run `python -c script args...`; the script sees them as `sys.argv[1:]`.
pub fn run_python<I, S>(script: &str, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let py = python();
    Command::new(&py)
        .arg("-c")
        .arg(script)
        .args(args)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONHASHSEED", "0")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", py.display()))
}

/// [`run_python`], panicking with its stderr unless it exits successfully; returns stdout.
pub fn run_python_ok<I, S>(script: &str, args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = run_python(script, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "python failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn venv_python(venv: &Path) -> PathBuf {
    if cfg!(windows) {
        venv.join("Scripts").join("python.exe")
    } else {
        venv.join("bin").join("python")
    }
}

fn marker_text() -> String {
    format!("{}\n", GGUF_PY_REQUIREMENTS.join("\n"))
}

fn is_ready(venv: &Path) -> bool {
    fs::read_to_string(venv.join(".gguf-io-ready")).is_ok_and(|m| m == marker_text())
        && venv_python(venv).exists()
}

fn ensure_venv(venv: &Path) -> Result<PathBuf, String> {
    if is_ready(venv) {
        return Ok(venv_python(venv));
    }
    let parent = venv.parent().ok_or("venv path has no parent")?;
    fs::create_dir_all(parent).map_err(|e| format!("create {}: {e}", parent.display()))?;
    let lock = parent.join("gguf-py-venv.lock");
    let start = SystemTime::now();
    loop {
        match fs::create_dir(&lock) {
            Ok(()) => {
                let _guard = LockGuard(lock.clone());
                // Someone may have finished while we waited for the lock.
                if is_ready(venv) {
                    return Ok(venv_python(venv));
                }
                build_venv(venv)?;
                return Ok(venv_python(venv));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if is_ready(venv) {
                    return Ok(venv_python(venv));
                }
                let age = fs::metadata(&lock)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .unwrap_or_default();
                if age > STALE_LOCK {
                    // Its owner died; take it over (a racing remover is harmless).
                    let _ = fs::remove_dir(&lock);
                    continue;
                }
                if start.elapsed().unwrap_or_default() > WAIT_LIMIT {
                    return Err(format!("timed out waiting for {}", lock.display()));
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(format!("create lock {}: {e}", lock.display())),
        }
    }
}

struct LockGuard(PathBuf);
impl Drop for LockGuard {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
    }
}

/// Build the venv in `<venv>.tmp-<pid>` and rename it into place. Called with the lock held.
fn build_venv(venv: &Path) -> Result<(), String> {
    let tmp = venv.with_file_name(format!(
        "{}.tmp-{}",
        venv.file_name().and_then(OsStr::to_str).unwrap_or("venv"),
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&tmp);
    let base = std::env::var_os("GGUF_PY_PYTHON3").unwrap_or_else(|| "python3".into());
    let py = venv_python(&tmp);
    let mut pip = if run(
        Command::new(&base).arg("-m").arg("venv").arg(&tmp),
        "python3 -m venv",
    )
    .is_ok()
    {
        let mut c = Command::new(&py);
        c.args(["-m", "pip"]);
        c
    } else {
        // No ensurepip (e.g. Debian without python3-venv): make the venv without pip and
        // install into it with the base interpreter's pip (`--python` needs pip >= 22.3).
        let _ = fs::remove_dir_all(&tmp);
        run(
            Command::new(&base)
                .args(["-m", "venv", "--without-pip"])
                .arg(&tmp),
            "python3 -m venv --without-pip",
        )?;
        let mut c = Command::new(&base);
        c.args(["-m", "pip", "--python"]).arg(&py);
        c
    };
    pip.args(["install", "--quiet", "--disable-pip-version-check"])
        .args(GGUF_PY_REQUIREMENTS)
        .env("PIP_NO_INPUT", "1");
    run(&mut pip, "pip install")?;
    run(
        Command::new(&py).args(["-c", "import gguf.quants, numpy, safetensors.numpy"]),
        "import gguf",
    )?;
    let mut f = fs::File::create(tmp.join(".gguf-io-ready")).map_err(|e| e.to_string())?;
    f.write_all(marker_text().as_bytes())
        .map_err(|e| e.to_string())?;
    drop(f);
    // A stale or outdated venv (no or different marker) is replaced.
    if venv.exists() {
        fs::remove_dir_all(venv).map_err(|e| format!("remove old {}: {e}", venv.display()))?;
    }
    fs::rename(&tmp, venv)
        .map_err(|e| format!("rename {} -> {}: {e}", tmp.display(), venv.display()))?;
    Ok(())
}

fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: cannot start {:?}: {e}", cmd.get_program()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
