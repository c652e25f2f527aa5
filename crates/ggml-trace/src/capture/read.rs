//! Reading and gathering a tensor's bytes after its node ran: from host memory in place
//! (or through `ggml_backend_tensor_get`), into logical contiguous order, over the kept
//! copy for KV-cache views and masks ([`super::kept`]).

use std::sync::Arc;

use trace_format::{Role, TensorLayout, TensorMeta};

use super::graph::{is_kv_view, layout_of, op_name, tensor_name};
use super::{Capture, CaptureError, CapturedTensor, UnexplainedChange};
use crate::sys;

/// Written ranges closer than this are read from a remote buffer as one request.
const MERGE_GAP: usize = 4096;
/// A delta read of more requests than this reads the whole span instead (a transposed V
/// cache scatters a token's values across the span: one request per value would cost
/// more round trips than the bytes are worth).
const MAX_REQUESTS: usize = 64;

/// The written ranges (sorted by start, relative to a span of `len` bytes) as requests:
/// clipped to the span, neighbours within [`MERGE_GAP`] merged; `None` when there would
/// be more than [`MAX_REQUESTS`].
fn requests(written: &[std::ops::Range<usize>], len: usize) -> Option<Vec<std::ops::Range<usize>>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    for r in written {
        let r = r.start.min(len)..r.end.min(len);
        if r.is_empty() {
            continue;
        }
        match out.last_mut() {
            Some(last) if r.start <= last.end.saturating_add(MERGE_GAP) => {
                last.end = last.end.max(r.end)
            }
            _ => out.push(r),
        }
    }
    (out.len() <= MAX_REQUESTS).then_some(out)
}

impl Capture<'_> {
    /// Read `len` bytes at `offset` of `t` (in a non-host buffer) into `out` with
    /// `ggml_backend_tensor_get`, counted as remote traffic.
    ///
    /// # Safety
    /// `t` must point to a live tensor with data in a live buffer; `offset + out.len()`
    /// must not exceed `ggml_nbytes(t)`.
    unsafe fn get_remote(&mut self, t: *const sys::ggml_tensor, offset: usize, out: &mut [u8]) {
        if out.is_empty() {
            return;
        }
        // SAFETY: the caller's contract.
        unsafe { sys::ggml_backend_tensor_get(t, out.as_mut_ptr().cast(), offset, out.len()) };
        self.kept.stats.remote_read_bytes += out.len() as u64;
        self.kept.stats.remote_reads += 1;
        self.step_remote_bytes += out.len() as u64;
    }

    /// The bytes of `t`'s span (`span` = its span in bytes): borrowed in place from a
    /// host buffer, or copied into `scratch` from any other.
    ///
    /// # Safety
    /// `t` must point to a live ggml tensor with data in a live buffer, whose span is
    /// `span` bytes (= `ggml_nbytes(t)`); the bytes must not change while the returned
    /// slice is used.
    unsafe fn span_bytes<'s>(
        &mut self,
        t: *const sys::ggml_tensor,
        span: usize,
        scratch: &'s mut Vec<u8>,
    ) -> &'s [u8] {
        // SAFETY: caller guarantees `t` is live.
        let tr = unsafe { &*t };
        // SAFETY: the buffer pointer is live while the graph runs.
        let host = unsafe { sys::ggml_backend_buffer_is_host(tr.buffer) };
        if host {
            // SAFETY: for host buffers `data` points at `span` readable bytes: ggml
            // allocated ggml_nbytes(t) = span bytes for this (view of a) tensor.
            unsafe { std::slice::from_raw_parts(tr.data as *const u8, span) }
        } else {
            scratch.resize(span, 0);
            // SAFETY: offset 0 and size span = ggml_nbytes(t) lie inside the tensor.
            unsafe { self.get_remote(t, 0, scratch) };
            scratch
        }
    }

    /// A tracked K/V view in another backend's memory (an RPC server): its span's bytes
    /// as last read, updated by reading only what the write log says the graph wrote
    /// since (one request per run of written bytes), or read whole when the log cannot
    /// tell (first sight, a new layout or place, an audit due, too many runs), then
    /// gathered over the kept copy like a host view.
    ///
    /// # Safety
    /// As [`Capture::span_bytes`]; `t`'s buffer is not host memory.
    unsafe fn read_remote_tracked(
        &mut self,
        t: *const sys::ggml_tensor,
        span: usize,
        layout: TensorLayout,
        key: super::kept::Key,
    ) -> Result<super::kept::Gathered, trace_format::LayoutError> {
        // SAFETY: caller guarantees `t` is live.
        let start = unsafe { (*t).data } as usize;
        let at = start..start.saturating_add(span);
        let mut raw = self.kept.take_raw(key);
        let delta = if raw.len() == span {
            self.kept
                .known_writes(key, &layout, &at, true)
                .and_then(|w| requests(&w, span))
        } else {
            None
        };
        match delta {
            Some(reqs) => {
                for r in reqs {
                    // SAFETY: `r` lies inside the span (clipped by `requests`).
                    unsafe { self.get_remote(t, r.start, &mut raw[r]) };
                }
            }
            None => {
                raw.clear();
                raw.resize(span, 0);
                // SAFETY: offset 0 and size span = ggml_nbytes(t) lie inside the tensor.
                unsafe { self.get_remote(t, 0, &mut raw) };
            }
        }
        let gathered = self.kept.gather_from(&raw, Some(start), layout, key, true);
        self.kept.put_raw(key, raw);
        gathered
    }
}

impl Capture<'_> {
    /// Read a tensor's bytes (after its node ran) into logical contiguous order.
    ///
    /// # Safety
    /// `t` must point to a live, allocated ggml tensor.
    pub(super) unsafe fn read(
        &mut self,
        t: *const sys::ggml_tensor,
        role: Role,
        layer: i32,
    ) -> Result<CapturedTensor, CaptureError> {
        // SAFETY: caller guarantees `t` is live.
        let tr = unsafe { &*t };
        let layout = layout_of(tr);
        let span = layout.span_bytes().map_err(|source| CaptureError::Layout {
            tensor: tensor_name(tr),
            source,
        })? as usize;
        if tr.data.is_null() || tr.buffer.is_null() {
            return Err(CaptureError::NoData {
                tensor: tensor_name(tr),
            });
        }
        // SAFETY: caller guarantees `t` is live.
        let keep = unsafe { self.keeps(t, role, layer) };
        // SAFETY: as above.
        let track = keep && unsafe { self.tracks(t, role) };
        // SAFETY: a live tensor's non-null buffer (checked above).
        let host = unsafe { sys::ggml_backend_buffer_is_host(tr.buffer) };
        let mut scratch = std::mem::take(&mut self.scratch);
        let gathered = if track && !host {
            // SAFETY: live tensor with data, span `span`; nothing computes meanwhile.
            unsafe { self.read_remote_tracked(t, span, layout, (layer, role)) }
                .map(|g| (g.data, g.revision, g.unexplained))
        } else if keep {
            // SAFETY: live tensor with data (checked above) and span `span`; nothing
            // computes while the callback runs.
            let src = unsafe { self.span_bytes(t, span, &mut scratch) };
            self.kept
                .gather(src, layout, (layer, role), track)
                .map(|g| (g.data, g.revision, g.unexplained))
        } else {
            // SAFETY: as above.
            let src = unsafe { self.span_bytes(t, span, &mut scratch) };
            let mut out = Vec::new();
            layout
                .gather_into(src, &mut out)
                .map(|()| (Arc::new(out), None, 0))
        };
        self.scratch = scratch;
        let (data, revision, unexplained) = gathered?;
        if unexplained > 0 {
            self.unexplained.push(UnexplainedChange {
                step: self.step,
                layer,
                role,
                bytes: unexplained,
            });
        }
        let view_of = if tr.view_src.is_null() {
            String::new()
        } else {
            // SAFETY: view_src of a live tensor is live.
            tensor_name(unsafe { &*tr.view_src })
        };
        Ok(CapturedTensor {
            meta: TensorMeta {
                role,
                layer,
                step: self.step,
                ggml_name: tensor_name(tr),
                op: op_name(tr.op),
                layout,
                view_of,
            },
            data,
            revision,
            graph_order: Some(self.order),
        })
    }

    /// Is `t` kept from one step to the next? KV-cache views and masks change little.
    ///
    /// # Safety
    /// `t` must point to a live ggml tensor.
    unsafe fn keeps(&self, t: *const sys::ggml_tensor, role: Role, layer: i32) -> bool {
        self.cfg.keep
            && layer >= 0
            && (role == Role::Mask
                || matches!(role, Role::K | Role::V | Role::KQuant | Role::VQuant)
                // SAFETY: caller guarantees `t` is live.
                    && unsafe { is_kv_view(t) })
    }

    /// Is `t` (kept) written only by graph nodes, so that the write log tells what
    /// changed? K and V views of a plain cache, in host memory (the log's addresses are
    /// the bytes read) or in another backend's (an RPC server's: the log's addresses are
    /// that backend's, and only the written bytes are read again); not masks (set by host
    /// code before each graph) nor the mixed cache's stores (its migrations copy on the
    /// host).
    ///
    /// # Safety
    /// `t` must point to a live ggml tensor.
    unsafe fn tracks(&self, t: *const sys::ggml_tensor, role: Role) -> bool {
        if self.cfg.kv_audit <= 1 || !matches!(role, Role::K | Role::V) {
            return false;
        }
        // SAFETY: caller guarantees liveness.
        let tr = unsafe { &*t };
        !tr.buffer.is_null() && !self.mixed_layer_source(t)
    }

    /// Before an attention node's sources are read: hash the spans of those that `read`
    /// will keep and hash, all in one computation on the pool (see
    /// [`super::kept::KeptCache::prehash`]). The memory cannot change before they are
    /// read, as no graph is computing.
    ///
    /// # Safety
    /// Every non-null pointer in `srcs` must point to a live, allocated ggml tensor.
    pub(super) unsafe fn prehash(&mut self, srcs: &[(*const sys::ggml_tensor, Role)], layer: i32) {
        self.kept.clear_prehashed();
        if !self.kept.has_pool() {
            return;
        }
        let mut spans = Vec::new();
        for &(t, role) in srcs {
            // SAFETY: caller guarantees liveness of non-null pointers.
            if t.is_null() || !unsafe { self.keeps(t, role, layer) } {
                continue;
            }
            // SAFETY: as above.
            let tr = unsafe { &*t };
            if tr.data.is_null() || tr.buffer.is_null() {
                continue;
            }
            // SAFETY: the buffer of a live allocated tensor is live (checked non-null).
            let host = unsafe { sys::ggml_backend_buffer_is_host(tr.buffer) };
            if !host {
                continue;
            }
            let layout = layout_of(tr);
            let (Ok(span), Ok(n_bytes)) = (layout.span_bytes(), layout.n_bytes()) else {
                continue;
            };
            // Only what gather will hash: an existing copy of this layout, or a new one
            // within the budget.
            let start = tr.data as usize;
            let range = start..start + span as usize;
            // SAFETY: as above.
            let track = unsafe { self.tracks(t, role) };
            if self
                .kept
                .will_hash((layer, role), &layout, n_bytes as usize, &range, track)
            {
                spans.push((tr.data as *const u8, span as usize));
            }
        }
        // SAFETY: host memory of live tensors, each `len` = its span in bytes (what
        // `read` hands `gather`); unchanged until the next observe call clears them.
        unsafe { self.kept.prehash(&spans) };
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    #[test]
    fn requests_clip_merge_near_neighbours_and_give_up_when_too_many() {
        // Clipped to the span; an empty range dropped; neighbours within MERGE_GAP merged.
        assert_eq!(
            requests(&[0..10, 20..30, 5000..5010, 9200..9300], 9250),
            Some(vec![0..30, 5000..5010, 9200..9250])
        );
        assert_eq!(requests(&[100..200, 150..160], 1000), Some(vec![100..200]));
        assert_eq!(requests(&[2000..3000], 1000), Some(vec![]));
        let at = |start: usize| vec![0..1, start..start + 1];
        assert_eq!(
            requests(&at(1 + MERGE_GAP), 1 << 20),
            Some(vec![0..1 + MERGE_GAP + 1]),
            "a gap of MERGE_GAP bytes is read with the ranges"
        );
        assert_eq!(
            requests(&at(2 + MERGE_GAP), 1 << 20),
            Some(at(2 + MERGE_GAP)),
            "one byte more: two requests"
        );
        let far = |n: usize| -> Vec<std::ops::Range<usize>> {
            (0..n)
                .map(|i| i * 2 * MERGE_GAP..i * 2 * MERGE_GAP + 4)
                .collect()
        };
        assert_eq!(
            requests(&far(MAX_REQUESTS), usize::MAX).map(|r| r.len()),
            Some(MAX_REQUESTS)
        );
        assert_eq!(requests(&far(MAX_REQUESTS + 1), usize::MAX), None);
    }
}
