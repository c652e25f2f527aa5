//! `cargo run -p tiny-llama --example write_zoo -- DIR [ARCH...]`
//!
//! Writes the tiny-model zoo (every architecture, or the ones named) as
//! `DIR/zoo-<arch>.gguf`, one line per file with what the model exercises.
use tiny_llama::zoo::{write_zoo_model, Arch};

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("write_zoo: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

fn run() -> Result<(), String> {
    let mut args = std::env::args_os().skip(1);
    let dir: std::path::PathBuf = args.next().ok_or("usage: write_zoo DIR [ARCH...]")?.into();
    let mut archs = Vec::new();
    for a in args {
        let a = a.to_string_lossy().into_owned();
        let names: Vec<&str> = Arch::ALL.iter().map(|a| a.name()).collect();
        archs.push(
            Arch::from_name(&a).ok_or_else(|| {
                format!("unknown architecture '{a}' (one of {})", names.join(", "))
            })?,
        );
    }
    if archs.is_empty() {
        archs = Arch::ALL.to_vec();
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for a in archs {
        let path = write_zoo_model(&dir, a).map_err(|e| format!("{a}: {e}"))?;
        println!("{}: {}", path.display(), a.about());
    }
    Ok(())
}
