fn main() -> std::process::ExitCode {
    gguf_reader::main(std::env::args_os().skip(1).collect())
}
