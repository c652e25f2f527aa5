fn main() -> std::process::ExitCode {
    tensor_diff_analyzer::main(std::env::args().skip(1).collect())
}
