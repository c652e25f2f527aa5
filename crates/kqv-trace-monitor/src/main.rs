fn main() -> std::process::ExitCode {
    kqv_trace_monitor::main(std::env::args_os().skip(1).collect())
}
