//! `cargo run -p tiny-llama --example write_tiny_llama -- OUT.gguf [--larger] [--head-dim N]`
//!
//! `--head-dim N` sets the per-head size (and n_embd = n_head * N); quantized KV caches
//! (`-ctk q8_0`…) need it to be a multiple of 32, the default tiny model has 16.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("write_tiny_llama: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

fn run() -> Result<(), String> {
    let mut args = pico_args::Arguments::from_env();
    let larger = args.contains("--larger");
    let head_dim: Option<usize> = args
        .opt_value_from_str("--head-dim")
        .map_err(|e| format!("--head-dim: {e}"))?;
    let out: std::path::PathBuf = args
        .free_from_os_str(|s| Ok::<_, String>(s.into()))
        .map_err(|_| "usage: write_tiny_llama OUT.gguf [--larger] [--head-dim N]".to_owned())?;
    let rest = args.finish();
    if !rest.is_empty() {
        return Err(format!("unexpected arguments: {rest:?}"));
    }
    let mut cfg = if larger {
        tiny_llama::TinyLlamaConfig::larger()
    } else {
        tiny_llama::TinyLlamaConfig::default()
    };
    if let Some(hd) = head_dim {
        if hd == 0 || hd % 2 != 0 {
            return Err(format!("--head-dim must be even and positive, got {hd}"));
        }
        cfg.head_dim = hd;
        cfg.n_embd = cfg.n_head * hd;
    }
    tiny_llama::write_model(&out, &cfg).map_err(|e| e.to_string())
}
