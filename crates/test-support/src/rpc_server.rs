//! `kcm-rpc-server` processes for tests: each started on a free loopback port (`--port 0`,
//! the port read from its stdout) and killed, by its own process id, when dropped. A test
//! only ever stops the servers it started.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use crate::workspace_bin;

/// A running `kcm-rpc-server` on 127.0.0.1.
pub struct RpcServer {
    child: Option<Child>,
    pub port: u16,
}

impl RpcServer {
    /// Starts one with `--threads threads` and waits until it listens.
    pub fn start(threads: u32) -> RpcServer {
        let bin = workspace_bin("kcm-rpc-server", "kcm-rpc-server");
        let mut child = Command::new(bin)
            .args(["--port", "0", "--threads", &threads.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start kcm-rpc-server");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("piped stdout");
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the port");
        let port = match line.trim().parse() {
            Ok(p) => p,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("kcm-rpc-server printed {line:?}, not a port");
            }
        };
        RpcServer {
            child: Some(child),
            port,
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The process id (to signal it).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends SIGKILL and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for it to exit (after a signal sent elsewhere) and gives its status.
    pub fn wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.take().and_then(|mut c| c.wait().ok())
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `--rpc` values for some servers: `127.0.0.1:P1,127.0.0.1:P2`.
pub fn rpc_list(servers: &[&RpcServer]) -> String {
    servers
        .iter()
        .map(|s| s.endpoint())
        .collect::<Vec<_>>()
        .join(",")
}
