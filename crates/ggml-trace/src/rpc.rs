//! llama.cpp's RPC backend as the tools meet it: the endpoints a run's llama.cpp options
//! name (`--rpc host:port,...`, or `LLAMA_ARG_RPC`), and a check of each one before
//! llama.cpp connects. ggml-rpc's client ends the process with `GGML_ABORT` when a server
//! is down or speaks another protocol version; [`check_endpoints`] makes that one line
//! naming the endpoint instead.
//!
//! The check is the client's own first exchange (ggml-rpc.cpp `negotiate_hello`): connect,
//! send `RPC_CMD_HELLO` with empty transport capabilities, read the server's version, and
//! accept it when its major version is ours and its minor not above ours. The connection
//! is then closed; the server (one client at a time) goes back to waiting.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use ggml_trace_sys::rpc::{
    RPC_CMD_DEVICE_COUNT, RPC_CMD_HELLO, RPC_CONN_CAPS_SIZE, RPC_PROTO_MAJOR_VERSION,
    RPC_PROTO_MINOR_VERSION, RPC_PROTO_PATCH_VERSION,
};

/// How long to wait for a connection and for the server's answer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// The environment variable llama.cpp reads `--rpc` from when the option is absent.
pub const RPC_ENV: &str = "LLAMA_ARG_RPC";
/// ... and `--mixed-kv-cache` (vendor/patches/0003).
pub const MIXED_ENV: &str = "LLAMA_ARG_MIXED_KV_CACHE";

/// Why an endpoint cannot serve this run.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("--rpc {0:?}: not host:port")]
    BadEndpoint(String),
    #[error("--rpc {endpoint}: cannot resolve {host:?} to an IPv4 address")]
    Resolve { endpoint: String, host: String },
    #[error("--rpc {endpoint}: the RPC server is down or unreachable ({source})")]
    Down {
        endpoint: String,
        source: std::io::Error,
    },
    #[error(
        "--rpc {endpoint}: no answer to the RPC handshake within {timeout:?} (not an RPC \
         server, or one busy with another client: it serves one at a time)"
    )]
    NoAnswer { endpoint: String, timeout: Duration },
    #[error(
        "--rpc {endpoint}: does not speak ggml's RPC protocol ({what}; this build speaks \
         {RPC_PROTO_MAJOR_VERSION}.{RPC_PROTO_MINOR_VERSION}.{RPC_PROTO_PATCH_VERSION})"
    )]
    NotRpc { endpoint: String, what: String },
    #[error(
        "--rpc {endpoint}: the RPC server speaks protocol {major}.{minor}.{patch}, this build \
         {RPC_PROTO_MAJOR_VERSION}.{RPC_PROTO_MINOR_VERSION}.{RPC_PROTO_PATCH_VERSION} \
         (run a server built from the same llama.cpp, e.g. kcm-rpc-server)"
    )]
    Version {
        endpoint: String,
        major: u8,
        minor: u8,
        patch: u8,
    },
    #[error("--rpc: {0} servers, more than ggml-rpc's limit of {1}")]
    TooMany(usize, usize),
    #[error(
        "--mixed-kv-cache cannot run with --rpc: its attention node is a custom op, whose \
         function pointer an RPC server would call in its own process"
    )]
    MixedKvCache,
}

/// A server's protocol version, as its HELLO answer gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerVersion {
    pub major: u8,
    pub minor: u8,
    pub patch: u8,
}

/// The RPC endpoints `llama_args` (llama.cpp's options) hand to llama.cpp: every
/// `--rpc LIST` / `--rpc=LIST` (llama.cpp registers each occurrence's servers), or
/// `LLAMA_ARG_RPC` when none is given, split at commas as llama.cpp splits them.
pub fn endpoints(llama_args: &[String], env: Option<&str>) -> Vec<String> {
    let mut lists = Vec::new();
    let mut it = llama_args.iter();
    while let Some(a) = it.next() {
        if a == "--rpc" {
            if let Some(v) = it.next() {
                lists.push(v.clone());
            }
        } else if let Some(v) = a.strip_prefix("--rpc=") {
            lists.push(v.to_owned());
        }
    }
    if lists.is_empty() {
        lists.extend(env.map(str::to_owned));
    }
    lists
        .iter()
        .flat_map(|l| l.split(','))
        .filter(|e| !e.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Whether `llama_args` (or `LLAMA_ARG_MIXED_KV_CACHE`, llama.cpp's truthy values) turn on
/// the mixed KV cache.
pub fn mixed_kv_cache(llama_args: &[String], env: Option<&str>) -> bool {
    llama_args.iter().any(|a| a == "--mixed-kv-cache")
        || env.is_some_and(|v| matches!(v, "1" | "true" | "on" | "enabled"))
}

/// Checks every endpoint the run's options name (see [`endpoints`]) and refuses the mixed
/// KV cache with any of them; `Ok` with the endpoints (empty: no RPC) otherwise.
pub fn check_run(llama_args: &[String]) -> Result<Vec<String>, RpcError> {
    let env = std::env::var(RPC_ENV).ok();
    let list = endpoints(llama_args, env.as_deref());
    if list.is_empty() {
        return Ok(list);
    }
    if mixed_kv_cache(llama_args, std::env::var(MIXED_ENV).ok().as_deref()) {
        return Err(RpcError::MixedKvCache);
    }
    let limit = ggml_trace_sys::rpc::GGML_RPC_MAX_SERVERS;
    if list.len() > limit {
        return Err(RpcError::TooMany(list.len(), limit));
    }
    for e in &list {
        check_endpoint(e)?;
    }
    Ok(list)
}

/// The handshake with one endpoint (`host:port`, as ggml-rpc parses it: the host up to
/// the first colon, resolved to IPv4).
pub fn check_endpoint(endpoint: &str) -> Result<ServerVersion, RpcError> {
    handshake(endpoint).map(|(_, v)| v)
}

/// The names of this build's devices that llama.cpp's `--device` accepts before any
/// `--rpc` registered a server (`--list-devices` without `--rpc`): every registered
/// device that is not a CPU (`CUDA0`, `Vulkan0`, ...); empty on a CPU-only build. Loads
/// ggml's backend registry (as llama.cpp's parser does); no device is initialised.
pub fn local_devices() -> Vec<String> {
    use ggml_trace_sys::sys;
    let mut names = Vec::new();
    // SAFETY: ggml's registry functions take no pointers from us; each device pointer
    // comes from the registry and its name is a NUL-terminated string it owns.
    unsafe {
        sys::ggml_backend_load_all();
        for i in 0..sys::ggml_backend_dev_count() {
            let dev = sys::ggml_backend_dev_get(i);
            if dev.is_null() || sys::ggml_backend_dev_type(dev) == sys::GGML_BACKEND_DEVICE_TYPE_CPU
            {
                continue;
            }
            let name = sys::ggml_backend_dev_name(dev);
            if !name.is_null() {
                names.push(
                    std::ffi::CStr::from_ptr(name)
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    names
}

/// How many devices the server at `endpoint` serves: the handshake, then ggml-rpc's
/// `RPC_CMD_DEVICE_COUNT` on the same connection (what the client asks when `--rpc`
/// registers the server). llama.cpp names the devices of the servers of one `--rpc` list
/// `RPC0`, `RPC1`, ... in list order, each server's in its own order; `--device` takes
/// those names.
pub fn device_count(endpoint: &str) -> Result<u32, RpcError> {
    let (mut s, _) = handshake(endpoint)?;
    let not_rpc = |what: String| RpcError::NotRpc {
        endpoint: endpoint.to_owned(),
        what,
    };
    // | cmd (1 byte) | request size (u64) = 0 |
    let mut req = vec![RPC_CMD_DEVICE_COUNT];
    req.extend_from_slice(&0u64.to_le_bytes());
    s.write_all(&req)
        .map_err(|e| not_rpc(format!("asking its device count: {e}")))?;
    // | response size (u64) = 4 | rpc_msg_device_count_rsp: device_count (u32) |
    let mut rsp = [0u8; 12];
    s.read_exact(&mut rsp)
        .map_err(|e| not_rpc(format!("answering the device count: {e}")))?;
    let size = u64::from_le_bytes(rsp[..8].try_into().unwrap_or_default());
    if size != 4 {
        return Err(not_rpc(format!(
            "its answer to the device count announces {size} bytes"
        )));
    }
    Ok(u32::from_le_bytes(rsp[8..].try_into().unwrap_or_default()))
}

/// Connects to `endpoint` and does the HELLO exchange; the open connection and the
/// server's version.
fn handshake(endpoint: &str) -> Result<(TcpStream, ServerVersion), RpcError> {
    let addr = resolve(endpoint)?;
    let down = |source| RpcError::Down {
        endpoint: endpoint.to_owned(),
        source,
    };
    let mut s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(down)?;
    s.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(down)?;
    s.set_write_timeout(Some(ANSWER_TIMEOUT)).map_err(down)?;
    let _ = s.set_nodelay(true);
    // | cmd (1 byte) | request size (u64) | rpc_msg_hello_req: conn_caps[24] |
    let mut hello = vec![RPC_CMD_HELLO];
    hello.extend_from_slice(&(RPC_CONN_CAPS_SIZE as u64).to_le_bytes());
    hello.extend_from_slice(&[0; RPC_CONN_CAPS_SIZE]);
    let not_rpc = |what: String| RpcError::NotRpc {
        endpoint: endpoint.to_owned(),
        what,
    };
    let io = |e: std::io::Error, stage: &str| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => RpcError::NoAnswer {
            endpoint: endpoint.to_owned(),
            timeout: ANSWER_TIMEOUT,
        },
        std::io::ErrorKind::UnexpectedEof => not_rpc(format!(
            "it closed the connection {stage} (an RPC server of another protocol version \
             does so)"
        )),
        _ => not_rpc(format!("{stage}: {e}")),
    };
    s.write_all(&hello)
        .map_err(|e| io(e, "during the handshake"))?;
    // | response size (u64) | rpc_msg_hello_rsp: major, minor, patch, pad, conn_caps[24] |
    let mut size = [0u8; 8];
    s.read_exact(&mut size)
        .map_err(|e| io(e, "before answering the handshake"))?;
    let size = u64::from_le_bytes(size);
    // Every protocol version so far answers HELLO with its 3 version bytes first (with or
    // without padding and capabilities after them).
    if !(3..=4 + RPC_CONN_CAPS_SIZE as u64).contains(&size) {
        return Err(not_rpc(format!(
            "its answer to the handshake announces {size} bytes"
        )));
    }
    let mut rsp = vec![0u8; size as usize];
    s.read_exact(&mut rsp)
        .map_err(|e| io(e, "in the middle of its answer"))?;
    let v = ServerVersion {
        major: rsp[0],
        minor: rsp[1],
        patch: rsp[2],
    };
    if v.major != RPC_PROTO_MAJOR_VERSION || v.minor > RPC_PROTO_MINOR_VERSION {
        return Err(RpcError::Version {
            endpoint: endpoint.to_owned(),
            major: v.major,
            minor: v.minor,
            patch: v.patch,
        });
    }
    if size != 4 + RPC_CONN_CAPS_SIZE as u64 {
        return Err(not_rpc(format!(
            "a {size}-byte answer to the handshake of version {}.{}.{}",
            v.major, v.minor, v.patch
        )));
    }
    Ok((s, v))
}

fn resolve(endpoint: &str) -> Result<SocketAddr, RpcError> {
    let bad = || RpcError::BadEndpoint(endpoint.to_owned());
    let (host, port) = endpoint.split_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok(SocketAddr::from((ip, port)));
    }
    (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.find(SocketAddr::is_ipv4))
        .ok_or_else(|| RpcError::Resolve {
            endpoint: endpoint.to_owned(),
            host: host.to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn endpoints_from_every_rpc_option_else_the_environment() {
        assert_eq!(
            endpoints(
                &args(&["-m", "x", "--rpc", "a:1,b:2", "--rpc=c:3", "-ngl", "99"]),
                Some("z:9")
            ),
            ["a:1", "b:2", "c:3"]
        );
        assert_eq!(
            endpoints(&args(&["-m", "x"]), Some("z:9,y:8")),
            ["z:9", "y:8"]
        );
        assert!(endpoints(&args(&["-m", "x"]), None).is_empty());
        assert!(mixed_kv_cache(&args(&["--mixed-kv-cache"]), None));
        assert!(mixed_kv_cache(&[], Some("on")));
        assert!(!mixed_kv_cache(&[], Some("0")));
    }

    #[test]
    fn no_device_but_the_cpu_before_any_server() {
        // This build has the CPU backend and ggml-rpc (no server registered yet): nothing
        // that --device takes.
        assert!(local_devices().is_empty(), "{:?}", local_devices());
    }

    #[test]
    fn a_bad_endpoint_is_named() {
        for e in ["localhost", "a:b", "a:70000"] {
            assert!(matches!(check_endpoint(e), Err(RpcError::BadEndpoint(x)) if x == e));
        }
    }

    #[test]
    fn a_closed_port_is_down() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let ep = l.local_addr().unwrap().to_string();
        drop(l);
        let e = check_endpoint(&ep).unwrap_err();
        assert!(matches!(e, RpcError::Down { .. }), "{e}");
        assert!(e.to_string().starts_with(&format!("--rpc {ep}: ")), "{e}");
    }

    /// A listener that answers anything with `answer`, once.
    fn answering(answer: Vec<u8>) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let ep = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let mut req = [0u8; 33];
                let _ = s.read_exact(&mut req);
                let _ = s.write_all(&answer);
            }
        });
        ep
    }

    fn hello_answer(major: u8, minor: u8, patch: u8) -> Vec<u8> {
        let mut a = 28u64.to_le_bytes().to_vec();
        a.extend_from_slice(&[major, minor, patch, 0]);
        a.extend_from_slice(&[0; 24]);
        a
    }

    #[test]
    fn the_handshake_accepts_our_version_and_names_another() {
        let ep = answering(hello_answer(RPC_PROTO_MAJOR_VERSION, 0, 3));
        assert_eq!(
            check_endpoint(&ep).unwrap(),
            ServerVersion {
                major: RPC_PROTO_MAJOR_VERSION,
                minor: 0,
                patch: 3
            }
        );
        let ep = answering(hello_answer(3, 0, 0));
        let e = check_endpoint(&ep).unwrap_err();
        assert!(matches!(e, RpcError::Version { major: 3, .. }), "{e}");
        assert!(e.to_string().contains("speaks protocol 3.0.0"), "{e}");
        let ep = answering(hello_answer(
            RPC_PROTO_MAJOR_VERSION,
            RPC_PROTO_MINOR_VERSION + 1,
            0,
        ));
        assert!(matches!(check_endpoint(&ep), Err(RpcError::Version { .. })));
    }

    /// A server that answers the handshake, then the device-count request with `answer`.
    fn counting(answer: Vec<u8>) -> (String, std::thread::JoinHandle<Vec<u8>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let ep = l.local_addr().unwrap().to_string();
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut req = [0u8; 33];
            s.read_exact(&mut req).unwrap();
            s.write_all(&hello_answer(RPC_PROTO_MAJOR_VERSION, 0, 0))
                .unwrap();
            let mut cmd = vec![0u8; 9];
            s.read_exact(&mut cmd).unwrap();
            s.write_all(&answer).unwrap();
            cmd
        });
        (ep, h)
    }

    #[test]
    fn the_device_count_follows_the_handshake() {
        let mut answer = 4u64.to_le_bytes().to_vec();
        answer.extend_from_slice(&3u32.to_le_bytes());
        let (ep, h) = counting(answer);
        assert_eq!(device_count(&ep).unwrap(), 3);
        // The request: RPC_CMD_DEVICE_COUNT (15), an empty body.
        let mut want = vec![15u8];
        want.extend_from_slice(&0u64.to_le_bytes());
        assert_eq!(h.join().unwrap(), want);
        let mut answer = 8u64.to_le_bytes().to_vec();
        answer.extend_from_slice(&[0; 4]);
        let (ep, _) = counting(answer);
        let e = device_count(&ep).unwrap_err();
        assert!(e.to_string().contains("announces 8 bytes"), "{e}");
    }

    #[test]
    fn garbage_or_silence_is_not_rpc() {
        let ep = answering(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec());
        let e = check_endpoint(&ep).unwrap_err();
        assert!(matches!(e, RpcError::NotRpc { .. }), "{e}");
        let ep = answering(Vec::new());
        let e = check_endpoint(&ep).unwrap_err();
        assert!(matches!(e, RpcError::NotRpc { .. }), "{e}");
        assert!(e.to_string().contains("closed the connection"), "{e}");
    }
}
