//! A backend that fails on another thread mid-run. ggml-rpc's client sends every command
//! from a dispatcher thread of its own and, when a server dies or garbles an answer, ends
//! the process there with `GGML_ABORT` ("Remote RPC server crashed or returned malformed
//! response") while the run's thread waits for that command's reply. Nothing can return
//! into llama.cpp from there, so for a run with RPC servers [`Armed`] installs ggml's abort
//! callback: on a thread other than the run's, it
//!
//! 1. waits until the run's thread is not inside a sink call (the [`Guarded`] sink wrapper
//!    holds a lock during each one; a sink call never waits on a backend, so this cannot
//!    deadlock) and keeps that lock, so the run's thread never enters the sink again;
//! 2. names the endpoints that no longer accept connections;
//! 3. hands the sink [`CaptureSink::on_fatal`] (save what was traced, marked incomplete;
//!    print one line), and ends the process with the exit code it returns (`_exit`: no
//!    C++ static destructors under threads still inside ggml).
//!
//! An abort on the run's own thread (a ggml assertion) keeps ggml's behaviour: the
//! message, then `abort()`.

use std::ffi::{c_char, CStr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::ThreadId;

use ggml_trace_sys::sys;

use crate::capture::{CaptureError, CaptureSink, CapturedAttention, StepOutput, UnexplainedChange};

/// A sink whose every call holds `lock`.
pub(crate) struct Guarded<'a> {
    pub(crate) inner: &'a mut dyn CaptureSink,
    pub(crate) lock: Arc<Mutex<()>>,
}

impl Guarded<'_> {
    fn hold(lock: &Mutex<()>) -> MutexGuard<'_, ()> {
        lock.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl CaptureSink for Guarded<'_> {
    fn on_start(&mut self, info: &crate::run_info::RunInfo) -> Result<(), CaptureError> {
        let _held = Self::hold(&self.lock);
        self.inner.on_start(info)
    }
    fn on_step(&mut self, step: &trace_format::StepMeta) -> bool {
        let _held = Self::hold(&self.lock);
        self.inner.on_step(step)
    }
    fn on_attention(&mut self, att: CapturedAttention) -> Result<(), CaptureError> {
        let _held = Self::hold(&self.lock);
        self.inner.on_attention(att)
    }
    fn on_node(&mut self, node: crate::capture::CapturedTensor) -> Result<(), CaptureError> {
        let _held = Self::hold(&self.lock);
        self.inner.on_node(node)
    }
    fn on_output(&mut self, out: StepOutput) -> Result<(), CaptureError> {
        let _held = Self::hold(&self.lock);
        self.inner.on_output(out)
    }
    fn on_unexplained(&mut self, change: &UnexplainedChange) {
        let _held = Self::hold(&self.lock);
        self.inner.on_unexplained(change)
    }
    fn on_fatal(&mut self, reason: &str) -> u8 {
        self.inner.on_fatal(reason)
    }
}

/// What the abort callback reaches: the inner sink, the lock, the run's thread and the
/// endpoints.
struct Target {
    sink: *mut (dyn CaptureSink + 'static),
    lock: Arc<Mutex<()>>,
    run_thread: ThreadId,
    endpoints: Vec<String>,
}

// SAFETY: the pointer is used only by the aborting thread, after it took the lock that
// keeps the run's thread out of the sink for good (see the module documentation).
unsafe impl Send for Target {}

/// `Some` while a run with RPC servers is armed; taken by the first failing thread.
static TARGET: Mutex<Option<Target>> = Mutex::new(None);

/// Installed for the duration of a run; disarms on drop (restoring ggml's callback).
pub(crate) struct Armed {
    previous: sys::ggml_abort_callback_t,
}

impl Armed {
    /// Arms the callback for `sink` (the inner sink of a [`Guarded`] holding `lock`).
    ///
    /// # Safety
    /// `sink` must stay valid until the returned value is dropped, and must only be
    /// called through the [`Guarded`] wrapper that holds `lock` meanwhile.
    pub(crate) unsafe fn arm(
        sink: *mut (dyn CaptureSink + '_),
        lock: Arc<Mutex<()>>,
        endpoints: Vec<String>,
    ) -> Armed {
        // SAFETY: only the lifetime is erased; the pointer is removed from TARGET (drop)
        // before `sink` can go away, as the caller promises.
        let sink: *mut (dyn CaptureSink + 'static) = unsafe { std::mem::transmute(sink) };
        *TARGET.lock().unwrap_or_else(|p| p.into_inner()) = Some(Target {
            sink,
            lock,
            run_thread: std::thread::current().id(),
            endpoints,
        });
        // SAFETY: installs a function that lives for the whole program.
        let previous = unsafe { sys::ggml_set_abort_callback(Some(on_abort)) };
        Armed { previous }
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        // SAFETY: restores the callback that was installed before.
        unsafe { sys::ggml_set_abort_callback(self.previous) };
        TARGET.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

/// ggml's message without its `file:line: ` prefix.
fn message(raw: *const c_char) -> String {
    if raw.is_null() {
        return String::from("ggml aborted");
    }
    // SAFETY: ggml passes a NUL-terminated buffer alive during the call.
    let text = unsafe { CStr::from_ptr(raw) }
        .to_string_lossy()
        .into_owned();
    let text = text.trim_end().to_owned();
    // "path/to/file.cpp:566: the message"
    match text.split_once(": ") {
        Some((loc, rest))
            if loc
                .rsplit_once(':')
                .is_some_and(|(_, l)| l.parse::<u32>().is_ok()) =>
        {
            rest.trim_end().to_owned()
        }
        _ => text,
    }
}

/// The endpoints that refuse a connection now (a server that died); a live server busy
/// with our own connection still accepts one.
fn dead(endpoints: &[String]) -> Vec<String> {
    endpoints
        .iter()
        .filter(|e| {
            use std::net::ToSocketAddrs;
            let Some(addr) = e.to_socket_addrs().ok().and_then(|mut a| a.next()) else {
                return false;
            };
            std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(1)).is_err()
        })
        .cloned()
        .collect()
}

/// The reason line handed to the sink.
pub(crate) fn reason(ggml: &str, endpoints: &[String], dead: &[String]) -> String {
    match dead {
        [] => format!(
            "an RPC backend failed mid-run ({}; servers: {})",
            ggml,
            endpoints.join(", ")
        ),
        [one] => format!("the RPC server {one} stopped answering mid-run ({ggml})"),
        many => format!(
            "the RPC servers {} stopped answering mid-run ({ggml})",
            many.join(", ")
        ),
    }
}

unsafe extern "C" fn on_abort(raw: *const c_char) {
    let ggml = message(raw);
    let mut slot = TARGET.lock().unwrap_or_else(|p| p.into_inner());
    let on_run_thread = slot
        .as_ref()
        .is_some_and(|t| t.run_thread == std::thread::current().id());
    if on_run_thread || slot.is_none() && !ARMED_ONCE.load() {
        // ggml's own behaviour: the message, then abort() when we return.
        drop(slot);
        eprintln!("ggml: {ggml}");
        return;
    }
    let Some(target) = slot.take() else {
        // Another thread is already ending the process: wait for it.
        drop(slot);
        loop {
            std::thread::park();
        }
    };
    ARMED_ONCE.store();
    drop(slot);
    // Keep the run's thread out of the sink from now on (never released).
    let held = target.lock.lock().unwrap_or_else(|p| p.into_inner());
    std::mem::forget(held);
    let why = reason(&ggml, &target.endpoints, &dead(&target.endpoints));
    let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: see Target: the run's thread is stopped outside the sink for good.
        unsafe { (*target.sink).on_fatal(&why) }
    }))
    .unwrap_or(1);
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: fflush(NULL) flushes C's streams; _exit ends the process at once.
    unsafe {
        libc::fflush(std::ptr::null_mut());
        libc::_exit(i32::from(code))
    }
}

/// Set once a failing thread has taken the target, so later aborts on other threads
/// wait instead of aborting under it.
struct Once(std::sync::atomic::AtomicBool);

impl Once {
    fn load(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn store(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst)
    }
}

static ARMED_ONCE: Once = Once(std::sync::atomic::AtomicBool::new(false));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ggmls_location_prefix_is_dropped() {
        let m = std::ffi::CString::new(
            "/x/ggml/src/ggml-rpc/ggml-rpc.cpp:566: Remote RPC server crashed or returned malformed response",
        )
        .unwrap();
        assert_eq!(
            message(m.as_ptr()),
            "Remote RPC server crashed or returned malformed response"
        );
        let m = std::ffi::CString::new("no location: here").unwrap();
        assert_eq!(message(m.as_ptr()), "no location: here");
    }

    #[test]
    fn the_reason_names_the_dead_servers() {
        let eps = ["127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()];
        assert_eq!(
            reason("boom", &eps, &eps[1..]),
            "the RPC server 127.0.0.1:2 stopped answering mid-run (boom)"
        );
        assert_eq!(
            reason("boom", &eps, &[]),
            "an RPC backend failed mid-run (boom; servers: 127.0.0.1:1, 127.0.0.1:2)"
        );
    }
}
