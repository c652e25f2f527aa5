//! `kcm-rpc-server`: this build's CPU backend served over ggml's RPC protocol, so that
//! the tools (`--rpc host:port,...`) can split a model across hosts and trace it. A thin
//! command line over ggml's own `ggml_backend_rpc_start_server` (compiled into
//! `ggml-trace-sys`); not llama.cpp's `rpc-server` program.
//!
//! The protocol has **no authentication**: whoever reaches the port can allocate memory
//! and run graphs (including the function pointers of custom ops) in this process. The
//! server therefore listens on 127.0.0.1 unless `--allow-remote` is given.
//!
//! stdout carries one line, the port, once the server listens (so `--port 0` needs no
//! guessing); everything else (ggml's banner and connection lines, warnings) goes to
//! stderr.

mod listen;

use std::ffi::{CString, OsString};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ggml_trace_sys::{rpc, sys};
use kcm_cli::tool::{utf8_args, Command, Failure, NotUtf8, Tool};

/// Documented exit codes.
pub mod exit {
    /// Stopped by SIGINT or SIGTERM (or SIGHUP).
    pub const OK: u8 = 0;
    /// It could not start serving (the address is in use or not local, the cache
    /// directory cannot be made, no CPU device), or stopped serving on its own.
    pub const FAILED: u8 = 1;
    /// A bad option (one line ending "(try --help)").
    pub const USAGE: u8 = 2;
}

pub const USAGE: &str = "\
kcm-rpc-server: serve this build's CPU backend over ggml's RPC protocol, for
kqv-trace-monitor / tensor-diff-analyzer --rpc HOST:PORT[,...] (llama.cpp's option).

usage: kcm-rpc-server [--host ADDR] [--port N] [--threads N] [--cache DIR] [--allow-remote]

  --host ADDR      IPv4 address to listen on (default 127.0.0.1). Any address that is
                   not loopback needs --allow-remote.
  --port N         TCP port (default 50052); 0 picks a free one. Once the server
                   listens, the port is printed on stdout, one line, and nothing else
                   goes to stdout (ggml's banner and connection lines go to stderr).
  --threads N      CPU threads per graph computation (default: all cores).
  --cache DIR      cache large tensors the client sends in DIR (created if missing), so
                   a later run sends only their hashes (ggml-rpc's SET_TENSOR_HASH).
  --allow-remote   listen on a non-loopback --host. WARNING: the RPC protocol has no
                   authentication and runs whatever graphs a client sends (custom ops
                   included); never expose it to an untrusted network.
  -h, --help       this text
  -V, --version    version (and the llama.cpp it was built from)

It serves one client at a time. SIGINT or SIGTERM stops it (exit 0).
Exit codes: 0 stopped by a signal, 1 could not start or stopped serving, 2 bad option.
";

/// ggml's `rpc-server` default port.
pub const DEFAULT_PORT: u16 = 50052;

/// How long to wait for the server's socket to appear.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    pub host: Ipv4Addr,
    pub port: u16,
    pub threads: usize,
    pub cache: Option<PathBuf>,
    pub allow_remote: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UsageError {
    #[error("{0}")]
    NotUtf8(#[from] NotUtf8),
    #[error("{0} needs a value")]
    MissingValue(&'static str),
    #[error("--host {0:?}: not an IPv4 address (ggml's RPC server binds IPv4 literals only)")]
    BadHost(String),
    #[error("--port {0:?}: not a port number (0 to 65535)")]
    BadPort(String),
    #[error("--threads {0:?}: not a positive number")]
    BadThreads(String),
    #[error(
        "--host {0} is not a loopback address: the RPC protocol has no authentication, \
         so serving on it needs --allow-remote"
    )]
    RemoteNotAllowed(Ipv4Addr),
    #[error("unknown option {0:?}")]
    Unknown(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0}")]
    Usage(#[from] UsageError),
    #[error("--cache {}: {source}", path.display())]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("ggml has no CPU device to serve")]
    NoCpuDevice,
    #[error("redirecting ggml's output to stderr: {0}")]
    Redirect(std::io::Error),
    #[error("installing the SIGINT/SIGTERM handler: {0}")]
    Signals(String),
    #[error(
        "could not listen on {0} (the port in use, or not an address of this host? \
         ggml's reason is above)"
    )]
    Listen(String),
    #[error("the server did not start listening on {0} within {1:?}")]
    ListenTimeout(String, Duration),
    #[error("writing the port to stdout: {0}")]
    Stdout(std::io::Error),
    #[error("the server stopped serving on {0} (ggml's reason is above)")]
    Stopped(String),
}

impl Failure for ServerError {
    fn exit_code(&self) -> u8 {
        if self.is_usage() {
            exit::USAGE
        } else {
            exit::FAILED
        }
    }
    fn is_usage(&self) -> bool {
        matches!(self, ServerError::Usage(_))
    }
}

pub const TOOL: Tool = Tool {
    name: "kcm-rpc-server",
    usage: USAGE,
    version: env!("CARGO_PKG_VERSION"),
};

/// The whole program: parse, serve until a signal, one error line and a documented
/// exit code.
pub fn main(args: Vec<OsString>) -> ExitCode {
    TOOL.main(
        args,
        |a| utf8_args(a).map_err(UsageError::from).and_then(parse),
        |opts| TOOL.exit(serve(&opts)),
    )
}

fn value(
    name: &'static str,
    inline: Option<String>,
    it: &mut impl Iterator<Item = String>,
) -> Result<String, UsageError> {
    inline
        .or_else(|| it.next())
        .ok_or(UsageError::MissingValue(name))
}

/// The command line (`--opt value` or `--opt=value`).
pub fn parse(args: Vec<String>) -> Result<Command<Options>, UsageError> {
    let mut o = Options {
        host: Ipv4Addr::LOCALHOST,
        port: DEFAULT_PORT,
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cache: None,
        allow_remote: false,
    };
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
            _ => (a.clone(), None),
        };
        match name.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--host" => {
                let v = value("--host", inline, &mut it)?;
                o.host = v.parse().map_err(|_| UsageError::BadHost(v))?;
            }
            "--port" => {
                let v = value("--port", inline, &mut it)?;
                o.port = v.parse().map_err(|_| UsageError::BadPort(v))?;
            }
            "--threads" | "-t" => {
                let v = value("--threads", inline, &mut it)?;
                o.threads = match v.parse::<usize>() {
                    Ok(n) if n > 0 => n,
                    _ => return Err(UsageError::BadThreads(v)),
                };
            }
            "--cache" => o.cache = Some(value("--cache", inline, &mut it)?.into()),
            "--allow-remote" if inline.is_none() => o.allow_remote = true,
            _ => return Err(UsageError::Unknown(a)),
        }
    }
    if !o.host.is_loopback() && !o.allow_remote {
        return Err(UsageError::RemoteNotAllowed(o.host));
    }
    Ok(Command::Run(o))
}

enum Event {
    Signal,
    ServerReturned,
}

/// Serves until SIGINT/SIGTERM. Does not return on a signal: the process ends with
/// `_exit(0)` (the server thread is inside ggml, possibly computing for a client; C++
/// static destructors must not run under it).
pub fn serve(o: &Options) -> Result<u8, ServerError> {
    if !o.host.is_loopback() {
        eprintln!(
            "kcm-rpc-server: WARNING: serving on {} (not loopback): the RPC protocol has no \
             authentication; anyone who reaches this port can run graphs in this process",
            o.host
        );
    }
    let cache = match &o.cache {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|source| ServerError::Cache {
                path: dir.clone(),
                source,
            })?;
            Some(CString::new(dir.to_string_lossy().as_bytes()).map_err(|_| {
                ServerError::Cache {
                    path: dir.clone(),
                    source: std::io::Error::other("contains a NUL byte"),
                }
            })?)
        }
        None => None,
    };
    // SAFETY: no arguments; the registry (static, CPU and RPC) is made on first use.
    let cpu = unsafe { sys::ggml_backend_dev_by_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU) };
    if cpu.is_null() {
        return Err(ServerError::NoCpuDevice);
    }
    let mut port_out = stdout_for_the_port_only()?;

    let (tx, rx) = mpsc::channel();
    let on_signal = tx.clone();
    ctrlc::set_handler(move || {
        let _ = on_signal.send(Event::Signal);
    })
    .map_err(|e| ServerError::Signals(e.to_string()))?;

    let endpoint = format!("{}:{}", o.host, o.port);
    let endpoint_c = CString::new(endpoint.clone()).unwrap_or_default();
    let threads = o.threads;
    let device = Device(cpu);
    std::thread::spawn(move || {
        let device = device; // the whole wrapper, not its field
        let mut devices = [device.0];
        // SAFETY: valid C strings and one live device, all outliving the call (moved
        // into this thread, which the call never leaves while serving).
        unsafe {
            rpc::ggml_backend_rpc_start_server(
                endpoint_c.as_ptr(),
                cache.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
                threads,
                devices.len(),
                devices.as_mut_ptr(),
            )
        };
        let _ = tx.send(Event::ServerReturned);
    });

    // The server binds inside ggml: find its listening socket among our descriptors.
    let start = Instant::now();
    let port = loop {
        if let Some(port) = listen::listening_port(o.host) {
            break port;
        }
        match rx.recv_timeout(Duration::from_millis(5)) {
            Ok(Event::ServerReturned) => {
                flush_c_stdio();
                return Err(ServerError::Listen(endpoint));
            }
            Ok(Event::Signal) => stop(exit::OK),
            Err(_) if start.elapsed() > LISTEN_TIMEOUT => {
                return Err(ServerError::ListenTimeout(endpoint, LISTEN_TIMEOUT))
            }
            Err(_) => {}
        }
    };
    flush_c_stdio();
    writeln!(port_out, "{port}")
        .and_then(|()| port_out.flush())
        .map_err(ServerError::Stdout)?;
    match rx.recv() {
        Ok(Event::Signal) => {
            eprintln!("kcm-rpc-server: stopping on a signal");
            stop(exit::OK)
        }
        Ok(Event::ServerReturned) | Err(_) => {
            flush_c_stdio();
            Err(ServerError::Stopped(format!("{}:{port}", o.host)))
        }
    }
}

/// Writes out what ggml printed with `printf` (its banner: C's stdout is fully buffered
/// when it is not a terminal), so that it comes before our own lines on stderr.
fn flush_c_stdio() {
    // SAFETY: fflush(NULL) flushes every open output stream of the C library.
    unsafe { libc::fflush(std::ptr::null_mut()) };
}

/// A ggml device handle, moved to the server thread.
struct Device(sys::ggml_backend_dev_t);

// SAFETY: a ggml device is a registry entry that lives as long as the process; ggml's
// own server uses it from whatever thread calls it.
unsafe impl Send for Device {}

/// Ends the process now (see [`serve`]).
fn stop(code: u8) -> ! {
    flush_c_stdio();
    let _ = std::io::stderr().flush();
    // SAFETY: _exit takes a status and never returns; nothing of ours needs flushing.
    unsafe { libc::_exit(i32::from(code)) }
}

/// A handle on the process's stdout for the port line, with file descriptor 1 itself
/// pointed at stderr: ggml's server prints its banner and connection lines with
/// `printf`, which would otherwise mix with the port.
fn stdout_for_the_port_only() -> Result<std::fs::File, ServerError> {
    let _ = std::io::stdout().flush();
    // SAFETY: dup and dup2 on the process's standard descriptors; the duplicate is
    // owned by the File returned (closed once, when it drops).
    unsafe {
        let saved = libc::dup(1);
        if saved < 0 {
            return Err(ServerError::Redirect(std::io::Error::last_os_error()));
        }
        if libc::dup2(2, 1) < 0 {
            let e = std::io::Error::last_os_error();
            libc::close(saved);
            return Err(ServerError::Redirect(e));
        }
        Ok(std::fs::File::from_raw_fd(saved))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Command<Options>, UsageError> {
        parse(args.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn defaults_are_loopback_and_ggmls_port() {
        let Ok(Command::Run(o)) = run(&[]) else {
            panic!("no options must run")
        };
        assert_eq!(o.host, Ipv4Addr::LOCALHOST);
        assert_eq!(o.port, DEFAULT_PORT);
        assert!(o.threads >= 1);
        assert_eq!(o.cache, None);
    }

    #[test]
    fn options_in_both_spellings() {
        let Ok(Command::Run(o)) = run(&["--port=0", "--threads", "3", "--cache=/tmp/c"]) else {
            panic!("must run")
        };
        assert_eq!((o.port, o.threads), (0, 3));
        assert_eq!(o.cache, Some(PathBuf::from("/tmp/c")));
        assert!(matches!(run(&["--help"]), Ok(Command::Help)));
        assert!(matches!(run(&["-V"]), Ok(Command::Version)));
    }

    #[test]
    fn a_remote_host_needs_allow_remote() {
        assert_eq!(
            run(&["--host", "0.0.0.0"]).unwrap_err(),
            UsageError::RemoteNotAllowed(Ipv4Addr::UNSPECIFIED)
        );
        let Ok(Command::Run(o)) = run(&["--host", "0.0.0.0", "--allow-remote"]) else {
            panic!("must run")
        };
        assert_eq!(o.host, Ipv4Addr::UNSPECIFIED);
        // Other loopback addresses are local.
        assert!(matches!(run(&["--host", "127.0.0.2"]), Ok(Command::Run(_))));
    }

    #[test]
    fn bad_values_are_usage_errors() {
        assert_eq!(
            run(&["--host", "localhost"]).unwrap_err(),
            UsageError::BadHost("localhost".into())
        );
        assert_eq!(
            run(&["--port", "70000"]).unwrap_err(),
            UsageError::BadPort("70000".into())
        );
        assert_eq!(
            run(&["--threads", "0"]).unwrap_err(),
            UsageError::BadThreads("0".into())
        );
        assert_eq!(
            run(&["--port"]).unwrap_err(),
            UsageError::MissingValue("--port")
        );
        assert_eq!(
            run(&["--bogus"]).unwrap_err(),
            UsageError::Unknown("--bogus".into())
        );
    }
}
