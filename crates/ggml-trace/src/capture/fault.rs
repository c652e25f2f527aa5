//! Test-only hooks (feature `fault-injection`): make the KV cache go wrong the
//! way a buggy cache or kernel would, so that tests can check the capture records it;
//! and a tap ([`set_tap`]) that sees each node the capture stops at, for independent
//! reads. Plans and taps are per thread (the thread that runs the session), so tests running in
//! parallel do not see each other's faults.

use std::cell::Cell;

/// A write the cache should not have made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// In step `step`, the graph's `SET_ROWS` into layer `layer`'s K cache stores its
    /// first row into cell `cell` instead of the cell the cache chose (an index bug in a
    /// cache: an old cell overwritten, through the graph).
    GraphWrite { step: u32, layer: i32, cell: usize },
    /// Before step `step` is decoded, one byte of cell `cell` of layer `layer`'s kept K
    /// view is changed in place, by no graph node (a kernel writing past its destination).
    HostWrite { step: u32, layer: i32, cell: usize },
}

thread_local! {
    static PLAN: Cell<Option<Fault>> = const { Cell::new(None) };
}

/// Plan a fault for the next run on this thread (`None` clears it).
pub fn plant(fault: Option<Fault>) {
    PLAN.with(|p| p.set(fault));
}

pub(crate) fn planned() -> Option<Fault> {
    PLAN.with(|p| p.get())
}

/// What a tap sees: a node right after it ran, before the capture reads it.
pub type Tap = Box<dyn FnMut(*const crate::sys::ggml_tensor, u32, u32)>;

thread_local! {
    static TAP: std::cell::RefCell<Option<Tap>> = const { std::cell::RefCell::new(None) };
}

/// Watch every node the capture stops at (its data call), on this thread, with the step
/// and the node's graph order, before the capture reads it: tests read the node
/// independently there (through ggml's own accessors) and compare with what the capture
/// saved. `None` removes it. The pointer is valid only during the call.
pub fn set_tap(tap: Option<Tap>) {
    TAP.with(|t| *t.borrow_mut() = tap);
}

pub(crate) fn tap(t: *const crate::sys::ggml_tensor, step: u32, order: u32) {
    TAP.with(|cell| {
        if let Ok(mut guard) = cell.try_borrow_mut() {
            if let Some(f) = guard.as_mut() {
                f(t, step, order);
            }
        }
    });
}
