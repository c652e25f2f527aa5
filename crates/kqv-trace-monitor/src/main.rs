fn main() -> std::process::ExitCode {
    kqv_trace_monitor::main(std::env::args().skip(1).collect())
}
