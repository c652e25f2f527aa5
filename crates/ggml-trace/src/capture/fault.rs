//! Test-only fault injection (feature `fault-injection`): make the KV cache go wrong the
//! way a buggy cache or kernel would, so that tests can check the capture records it.
//! Plans are per thread (the thread that runs the session), so tests running in
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
