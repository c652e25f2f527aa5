//! ggml's RPC backend (`ggml/include/ggml-rpc.h`, compiled from `ggml/src/ggml-rpc/` by
//! this crate's build script, registered in ggml's backend registry with
//! `GGML_USE_RPC`). Declared by hand: keep in sync with the header (a test reads the
//! header's version defines and compares).

use std::ffi::c_char;

use crate::sys::ggml_backend_dev_t;

/// `RPC_PROTO_MAJOR_VERSION` of the pinned ggml-rpc.h: a server must speak this major
/// version.
pub const RPC_PROTO_MAJOR_VERSION: u8 = 7;
/// `RPC_PROTO_MINOR_VERSION`: a server's minor version may not be above it.
pub const RPC_PROTO_MINOR_VERSION: u8 = 0;
/// `RPC_PROTO_PATCH_VERSION`.
pub const RPC_PROTO_PATCH_VERSION: u8 = 0;
/// `RPC_CMD_HELLO` (ggml-rpc.cpp: "RPC_CMD_HELLO must be always 14").
pub const RPC_CMD_HELLO: u8 = 14;
/// `RPC_CMD_DEVICE_COUNT`: the command after `RPC_CMD_HELLO` in ggml-rpc.cpp's `rpc_cmd`.
pub const RPC_CMD_DEVICE_COUNT: u8 = 15;
/// `RPC_CONN_CAPS_SIZE` (ggml-rpc/transport.h): the transport capabilities a HELLO
/// request and response carry (all zero: plain TCP).
pub const RPC_CONN_CAPS_SIZE: usize = 24;
/// `GGML_RPC_MAX_SERVERS`.
pub const GGML_RPC_MAX_SERVERS: usize = 16;

extern "C" {
    /// Serves ggml's RPC protocol on `endpoint` (`host:port`, an IPv4 literal host) with
    /// the given devices, one client at a time. Returns only when it cannot start (bad
    /// endpoint, bind failure, a device that does not initialize) or `accept` fails; it
    /// prints its banner and connection lines on stdout.
    pub fn ggml_backend_rpc_start_server(
        endpoint: *const c_char,
        cache_dir: *const c_char,
        n_threads: usize,
        n_devices: usize,
        devices: *mut ggml_backend_dev_t,
    );
    /// Whether ggml's registry has the RPC backend (llama.cpp's `llama_supports_rpc`).
    pub fn llama_supports_rpc() -> bool;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The constants above against the pinned header's `#define`s.
    #[test]
    fn constants_match_the_header() {
        let path = std::path::Path::new(crate::LLAMA_CPP_DIR).join("ggml/include/ggml-rpc.h");
        let text = std::fs::read_to_string(&path).expect("ggml-rpc.h");
        let define = |name: &str| -> u64 {
            text.lines()
                .find_map(|l| {
                    let mut w = l.split_whitespace();
                    (w.next() == Some("#define") && w.next() == Some(name))
                        .then(|| w.next().and_then(|v| v.parse().ok()))
                        .flatten()
                })
                .unwrap_or_else(|| panic!("{name} in {}", path.display()))
        };
        assert_eq!(
            define("RPC_PROTO_MAJOR_VERSION"),
            u64::from(RPC_PROTO_MAJOR_VERSION)
        );
        assert_eq!(
            define("RPC_PROTO_MINOR_VERSION"),
            u64::from(RPC_PROTO_MINOR_VERSION)
        );
        assert_eq!(
            define("RPC_PROTO_PATCH_VERSION"),
            u64::from(RPC_PROTO_PATCH_VERSION)
        );
        assert_eq!(define("GGML_RPC_MAX_SERVERS"), GGML_RPC_MAX_SERVERS as u64);
        let transport = std::fs::read_to_string(
            std::path::Path::new(crate::LLAMA_CPP_DIR).join("ggml/src/ggml-rpc/transport.h"),
        )
        .expect("transport.h");
        assert!(transport.contains(&format!("RPC_CONN_CAPS_SIZE = {RPC_CONN_CAPS_SIZE};")));
        // RPC_CMD_DEVICE_COUNT follows RPC_CMD_HELLO (= 14, asserted there) in the enum.
        let rpc = std::fs::read_to_string(
            std::path::Path::new(crate::LLAMA_CPP_DIR).join("ggml/src/ggml-rpc/ggml-rpc.cpp"),
        )
        .expect("ggml-rpc.cpp");
        let cmds: String = rpc.split_whitespace().collect();
        assert!(cmds.contains("RPC_CMD_HELLO,RPC_CMD_DEVICE_COUNT,"));
        assert!(cmds.contains("static_assert(RPC_CMD_HELLO==14"));
        assert_eq!(RPC_CMD_DEVICE_COUNT, RPC_CMD_HELLO + 1);
    }

    #[test]
    fn the_build_registers_the_rpc_backend() {
        // SAFETY: no arguments; loads ggml's (static) registry on first use.
        assert!(unsafe { llama_supports_rpc() });
    }
}
