//! Which bytes of the KV cache the graph wrote, so that a kept view is gathered again
//! only where it was written (see docs/design.md, "Incremental revisions").
//!
//! Every node of every graph the context computes passes through the eval callback's
//! `ask` call before it runs. A node whose memory lies in a watched region (the spans of
//! the kept K/V cache views) writes there: a `SET_ROWS` (how llama.cpp stores a ubatch's
//! K and V) writes the rows its index tensor names, read at `ask` time (a graph input,
//! set before the graph computes); any other node (a copy into a cache view, a K-shift's
//! in-place rope) is taken to write its whole extent. The log numbers what it records, so
//! each kept view asks for what was written since its own last capture.
//!
//! Writes by anything but a graph node (a kernel writing past its destination, host
//! code) are not seen here; the capture's audits (a full hash of every kept view every
//! `kv_audit` steps) find them.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;

use crate::sys;

/// Entries beyond this are dropped (the views that needed them are then hashed whole).
const MAX_ENTRIES: usize = 1 << 20;

/// The writes into watched memory, numbered.
#[derive(Default)]
pub(crate) struct WriteLog {
    /// Position of the next entry (entries ever recorded).
    next: u64,
    /// Position of the oldest entry still held: a reader from an earlier position has
    /// lost some and must hash.
    floor: u64,
    /// (position, absolute address range), in recording order.
    entries: VecDeque<(u64, Range<usize>)>,
    /// Address ranges worth recording, sorted, disjoint.
    watched: Vec<Range<usize>>,
    /// The bytes of `SET_ROWS` index tensors that live in another backend's memory (the
    /// scheduler's copy of the host input for an RPC server's split), read once per step
    /// with `ggml_backend_tensor_get`: K and V of every layer of one split share a copy.
    remote_indices: HashMap<*const sys::ggml_tensor, Vec<u8>>,
    /// Bytes read from non-host buffers (those index tensors) since the last
    /// [`WriteLog::take_remote_bytes`].
    remote_bytes: u64,
    remote_reads: u64,
}

impl WriteLog {
    /// The position a reader starting now will ask from.
    pub(crate) fn position(&self) -> u64 {
        self.next
    }

    /// Record writes into these address ranges only (replacing the earlier set).
    pub(crate) fn watch(&mut self, ranges: impl IntoIterator<Item = Range<usize>>) {
        let mut w: Vec<Range<usize>> = ranges.into_iter().filter(|r| !r.is_empty()).collect();
        w.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<usize>> = Vec::with_capacity(w.len());
        for r in w {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        self.watched = merged;
    }

    fn is_watched(&self, r: &Range<usize>) -> bool {
        let i = self.watched.partition_point(|w| w.end <= r.start);
        self.watched.get(i).is_some_and(|w| w.start < r.end)
    }

    fn record(&mut self, r: Range<usize>) {
        if r.is_empty() || !self.is_watched(&r) {
            return;
        }
        self.entries.push_back((self.next, r));
        self.next += 1;
        if self.entries.len() > MAX_ENTRIES {
            self.entries.clear();
            self.floor = self.next;
        }
    }

    /// A new step: index tensors read from other backends are read again (their copies
    /// are set anew for each graph).
    pub(crate) fn new_step(&mut self) {
        self.remote_indices.clear();
    }

    /// (bytes, calls) read from non-host buffers since the last call.
    pub(crate) fn take_remote_bytes(&mut self) -> (u64, u64) {
        (
            std::mem::take(&mut self.remote_bytes),
            std::mem::take(&mut self.remote_reads),
        )
    }

    /// Forget entries before `pos` (no reader needs them).
    pub(crate) fn trim(&mut self, pos: u64) {
        while self.entries.front().is_some_and(|(p, _)| *p < pos) {
            self.entries.pop_front();
        }
        self.floor = self.floor.max(pos.min(self.next));
    }

    /// The bytes of `span` (absolute addresses) written since position `pos`, relative
    /// to `span.start`, sorted by start; `None` when some were dropped from the log.
    pub(crate) fn since(&self, pos: u64, span: &Range<usize>) -> Option<Vec<Range<usize>>> {
        if pos < self.floor {
            return None;
        }
        let mut out: Vec<Range<usize>> = self
            .entries
            .iter()
            .filter(|(p, r)| *p >= pos && r.start < span.end && r.end > span.start)
            .map(|(_, r)| r.start.max(span.start) - span.start..r.end.min(span.end) - span.start)
            .collect();
        out.sort_by_key(|r| r.start);
        Some(out)
    }

    /// Record what node `t`, about to run, writes into watched memory.
    ///
    /// # Safety
    /// `t` must point to a live ggml tensor of the graph being computed, whose graph
    /// inputs are set (as they are when the scheduler asks about its nodes).
    pub(crate) unsafe fn note(&mut self, t: *const sys::ggml_tensor) {
        if self.watched.is_empty() {
            return;
        }
        // SAFETY: caller guarantees liveness.
        let tr = unsafe { &*t };
        if tr.data.is_null()
            || matches!(
                tr.op,
                sys::GGML_OP_NONE
                    | sys::GGML_OP_VIEW
                    | sys::GGML_OP_RESHAPE
                    | sys::GGML_OP_PERMUTE
                    | sys::GGML_OP_TRANSPOSE
            )
        {
            return;
        }
        let start = tr.data as usize;
        // SAFETY: a live tensor.
        let extent = start..start.saturating_add(unsafe { sys::ggml_nbytes(t) });
        if !self.is_watched(&extent) {
            return;
        }
        if tr.op == sys::GGML_OP_SET_ROWS {
            let mut rows = Vec::new();
            // SAFETY: caller guarantees liveness; sources of live nodes are live.
            if unsafe { self.set_rows_written(tr, &mut rows) } {
                // Neighbouring rows (a prompt's cells) become one entry.
                rows.sort_by_key(|r| r.start);
                let mut run: Option<Range<usize>> = None;
                for r in rows {
                    match &mut run {
                        Some(cur) if r.start <= cur.end => cur.end = cur.end.max(r.end),
                        _ => {
                            if let Some(done) = run.replace(r) {
                                self.record(done);
                            }
                        }
                    }
                }
                if let Some(done) = run {
                    self.record(done);
                }
                return;
            }
        }
        self.record(extent);
    }
}

impl WriteLog {
    /// The rows a `SET_ROWS` node writes (absolute address ranges), read from its index
    /// tensor; false when they cannot be known before it runs (indices computed by the graph,
    /// an index out of range): then its whole extent counts.
    ///
    /// The index tensor is a graph input: in host memory for a node on the CPU, or, for a
    /// node on another backend (an RPC server's K/V cache), the scheduler's copy of the host
    /// input in that backend's memory, already set when the scheduler asks about the split's
    /// nodes; that copy is read with `ggml_backend_tensor_get` (8 bytes a token) once per
    /// step and counted as remote traffic. The destination address of a node on an RPC
    /// server is the server's pointer value: not memory of this process, used only as a key
    /// (the kept views of that buffer are keyed by the same values).
    ///
    /// ggml's `SET_ROWS`: for each row (i01, i02, i03) of the source `b` (src[0]), the
    /// destination row index is `c[i01, i02 % c.ne1, i03 % c.ne2]` (c = src[1], I64 or I32),
    /// written at `dst + idx*nb1 + i02*nb2 + i03*nb3`.
    ///
    /// # Safety
    /// `tr` must be a live `SET_ROWS` node whose sources are live.
    unsafe fn set_rows_written(
        &mut self,
        tr: &sys::ggml_tensor,
        out: &mut Vec<Range<usize>>,
    ) -> bool {
        let (b, c) = (tr.src[0], tr.src[1]);
        if b.is_null() || c.is_null() {
            return false;
        }
        // SAFETY: sources of a live node are live.
        let (b, c) = unsafe { (&*b, &*c) };
        let idx_size = match c.type_ {
            sys::GGML_TYPE_I64 => 8,
            sys::GGML_TYPE_I32 => 4,
            _ => return false,
        };
        if c.data.is_null()
            || c.buffer.is_null()
            || c.flags & sys::GGML_TENSOR_FLAG_INPUT as i32 == 0
        {
            return false;
        }
        // SAFETY: a live tensor's buffer.
        let host = unsafe { sys::ggml_backend_buffer_is_host(c.buffer) };
        // SAFETY: a live tensor.
        let c_bytes = unsafe { sys::ggml_nbytes(c) };
        let ne = |x: i64| usize::try_from(x).ok();
        let (Some(n1), Some(n2), Some(n3)) = (ne(b.ne[1]), ne(b.ne[2]), ne(b.ne[3])) else {
            return false;
        };
        let (Some(c1), Some(c2)) = (ne(c.ne[1]), ne(c.ne[2])) else {
            return false;
        };
        if c1 == 0 || c2 == 0 || ne(c.ne[0]) != Some(n1) {
            return false;
        }
        let (Some(rows), Some(dst_ne0)) = (ne(tr.ne[1]), ne(tr.ne[0])) else {
            return false;
        };
        // SAFETY: a valid type and row length of a live tensor.
        let row_bytes = unsafe { sys::ggml_row_size(tr.type_, dst_ne0 as i64) };
        let start = tr.data as usize;
        let c_ptr: *const sys::ggml_tensor = c;
        if !host && !self.remote_indices.contains_key(&c_ptr) {
            let mut bytes = vec![0u8; c_bytes];
            // SAFETY: offset 0 and size ggml_nbytes(c) lie inside the live tensor `c`, whose
            // buffer is not host memory: ggml reads it from its backend.
            unsafe { sys::ggml_backend_tensor_get(c, bytes.as_mut_ptr().cast(), 0, c_bytes) };
            self.remote_bytes += c_bytes as u64;
            self.remote_reads += 1;
            self.remote_indices.insert(c_ptr, bytes);
        }
        let base: *const u8 = if host {
            c.data as *const u8
        } else {
            match self.remote_indices.get(&c_ptr) {
                Some(b) => b.as_ptr(),
                None => return false,
            }
        };
        out.reserve(n1.saturating_mul(n2).saturating_mul(n3).min(1 << 16));
        for i03 in 0..n3 {
            for i02 in 0..n2 {
                for i01 in 0..n1 {
                    let at = i01 * c.nb[0] + (i02 % c1) * c.nb[1] + (i03 % c2) * c.nb[2];
                    if at + idx_size > c_bytes {
                        return false;
                    }
                    // SAFETY: (i01, i02 % ne1, i03 % ne2) is inside the index tensor's
                    // ggml_nbytes(c) bytes (checked), in host memory or the copy read above;
                    // unaligned reads tolerate any stride.
                    let idx = unsafe {
                        let p = base.add(at);
                        if idx_size == 8 {
                            std::ptr::read_unaligned(p as *const i64)
                        } else {
                            i64::from(std::ptr::read_unaligned(p as *const i32))
                        }
                    };
                    let Some(i1) = usize::try_from(idx).ok().filter(|&i| i < rows) else {
                        return false;
                    };
                    let off = i1 * tr.nb[1] + i02 * tr.nb[2] + i03 * tr.nb[3];
                    out.push(start + off..start + off + row_bytes);
                }
            }
        }
        true
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    #[test]
    fn records_only_watched_memory_and_reads_back_per_position() {
        let mut log = WriteLog::default();
        log.watch([1000..2000, 5000..6000]);
        let p0 = log.position();
        log.record(0..10); // not watched
        log.record(1200..1300);
        log.record(1100..1200);
        log.record(5500..5600);
        let span = 1000..2000;
        assert_eq!(
            log.since(p0, &span),
            Some(vec![100..200, 200..300]),
            "sorted"
        );
        let p1 = log.position();
        log.record(1900..2100); // crosses the span's end: clipped
        assert_eq!(log.since(p1, &span), Some(vec![900..1000]));
        assert_eq!(log.since(p0, &(5000..6000)), Some(vec![500..600]));
        log.trim(p1);
        assert_eq!(log.since(p0, &span), None, "entries before p1 are gone");
        assert_eq!(log.since(p1, &span), Some(vec![900..1000]));
    }

    #[test]
    fn an_overflowing_log_says_so_instead_of_losing_writes() {
        let mut log = WriteLog::default();
        log.watch([0..usize::MAX]);
        let p0 = log.position();
        for i in 0..=MAX_ENTRIES {
            log.record(2 * i..2 * i + 1);
        }
        assert_eq!(log.since(p0, &(0..10)), None);
        let p1 = log.position();
        log.record(4..6);
        assert_eq!(log.since(p1, &(0..10)), Some(vec![4..6]));
    }
}
