//! kcm-rpc-server as a process: the port line, ggml's handshake, signals, refusals.
//! Every server here is started by the test on a free loopback port and stopped by its
//! own process id.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use ggml_trace::rpc::check_endpoint;
use test_support::rpc_server::RpcServer;

const BIN: &str = env!("CARGO_BIN_EXE_kcm-rpc-server");

#[test]
fn port_zero_prints_the_port_it_listens_on_and_speaks_ggmls_handshake() {
    let mut s = RpcServer::start(1);
    assert!(s.port > 0);
    let v = check_endpoint(&s.endpoint()).expect("handshake");
    assert_eq!(v.major, ggml_trace_sys::rpc::RPC_PROTO_MAJOR_VERSION);
    // It goes back to waiting: a second client is served too.
    check_endpoint(&s.endpoint()).expect("second handshake");
    s.kill();
}

fn stops_cleanly_on(signal: i32) {
    let mut child = Command::new(BIN)
        .args(["--port", "0", "--threads", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let port: u16 = line.trim().parse().expect("a port line");
    check_endpoint(&format!("127.0.0.1:{port}")).unwrap();
    // SAFETY: signalling the child this test started, by its id.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "signal {signal}");
    // Only the port ever went to stdout (ggml's banner and connection lines: stderr).
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert_eq!(rest, "");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("stopping on a signal"), "{err}");
}

#[test]
fn sigterm_and_sigint_stop_it_with_exit_0() {
    stops_cleanly_on(libc::SIGTERM);
    stops_cleanly_on(libc::SIGINT);
}

#[test]
fn a_remote_host_without_allow_remote_is_a_usage_error() {
    let o = Command::new(BIN)
        .args(["--host", "0.0.0.0"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "kcm-rpc-server: --host 0.0.0.0 is not a loopback address: the RPC protocol has no \
         authentication, so serving on it needs --allow-remote (try --help)\n"
    );
    assert!(o.stdout.is_empty());
}

#[test]
fn a_port_in_use_fails_with_one_line_and_exit_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let o = Command::new(BIN)
        .args(["--port", &port.to_string(), "--threads", "1"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty());
    let err = String::from_utf8_lossy(&o.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert_eq!(
        last,
        format!(
            "kcm-rpc-server: could not listen on 127.0.0.1:{port} (the port in use, or not an \
             address of this host? ggml's reason is above)"
        )
    );
}

#[test]
fn help_names_the_missing_authentication() {
    let o = Command::new(BIN).arg("--help").output().unwrap();
    assert!(o.status.success());
    let h = String::from_utf8_lossy(&o.stdout);
    assert!(h.contains("no\n                   authentication") || h.contains("no authentication"));
    assert!(h.contains("Exit codes:"));
}
