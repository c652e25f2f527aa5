//! `cargo run -p tiny-llama --example write_tiny_llama -- OUT.gguf [--larger]`
fn main() -> std::process::ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(out) = args.next() else {
        eprintln!("usage: write_tiny_llama OUT.gguf [--larger]");
        return std::process::ExitCode::from(2);
    };
    let cfg = if args.any(|a| a == "--larger") {
        tiny_llama::TinyLlamaConfig::larger()
    } else {
        tiny_llama::TinyLlamaConfig::default()
    };
    match tiny_llama::write_model(&out, &cfg) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("write_tiny_llama: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
