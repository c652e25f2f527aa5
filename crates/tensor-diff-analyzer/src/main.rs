fn main() -> std::process::ExitCode {
    tensor_diff_analyzer::main(std::env::args_os().skip(1).collect())
}
