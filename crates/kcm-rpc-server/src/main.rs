fn main() -> std::process::ExitCode {
    kcm_rpc_server::main(std::env::args_os().skip(1).collect())
}
