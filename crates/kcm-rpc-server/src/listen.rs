//! Finding the socket ggml's server listens on. `ggml_backend_rpc_start_server` binds
//! and listens inside ggml and says nothing of the port it got (with `--port 0`, the
//! kernel's choice), so the port is read back from the process's own descriptors: the
//! one IPv4 socket in the listening state bound to our host (the server is the only
//! listener this process makes).

use std::net::Ipv4Addr;

/// The port of this process's listening IPv4 TCP socket bound to `host`, if there is one.
pub fn listening_port(host: Ipv4Addr) -> Option<u16> {
    // SAFETY: getrlimit writes the struct it is given.
    let max_fd = unsafe {
        let mut lim = std::mem::zeroed::<libc::rlimit>();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur.min(65_536) as i32
        } else {
            1024
        }
    };
    (0..max_fd).find_map(|fd| port_of_listener(fd, host))
}

fn port_of_listener(fd: i32, host: Ipv4Addr) -> Option<u16> {
    let mut listening: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt on any descriptor number is harmless (EBADF / ENOTSOCK for
    // those that are not sockets); it writes at most `len` bytes into `listening`.
    let ok = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut listening as *mut libc::c_int).cast(),
            &mut len,
        )
    } == 0;
    if !ok || listening == 0 {
        return None;
    }
    // SAFETY: a zeroed sockaddr_in is valid; getsockname writes at most `len` bytes.
    let addr = unsafe {
        let mut addr = std::mem::zeroed::<libc::sockaddr_in>();
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_in).cast(), &mut len) != 0 {
            return None;
        }
        addr
    };
    if i32::from(addr.sin_family) != libc::AF_INET {
        return None;
    }
    let bound = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
    (bound == host).then_some(u16::from_be(addr.sin_port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_listener_of_this_process_and_its_port() {
        let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        assert_eq!(listening_port(Ipv4Addr::LOCALHOST), Some(port));
        // Another host's address: not ours.
        assert_eq!(listening_port(Ipv4Addr::new(127, 0, 0, 9)), None);
        drop(l);
        assert_eq!(listening_port(Ipv4Addr::LOCALHOST), None);
    }
}
