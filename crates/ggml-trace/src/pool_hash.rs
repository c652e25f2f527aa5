//! Block hashing of kept KV-cache views on llama.cpp's own CPU threadpool.
//!
//! The capture hashes every KV-cache view it keeps once per step
//! (`TensorLayout::gather_update`); that read is most of its cost per token, and it runs
//! inside the eval callback, while the threadpool's other threads wait for the next
//! graph computation. This runs it as a one-node ggml graph — a `ggml_map_custom1` op
//! whose task hashes its share of the blocks — computed with that same threadpool, so
//! ggml's threads do the work without any thread of ours competing with them.

use std::ffi::{c_int, c_void};

use trace_format::layout::{hash_blocks, HASH_BLOCK};

use crate::sys;

/// What the graph's tasks hash (set before each computation).
struct Job {
    span: *const u8,
    len: usize,
    out: *mut u64,
    n_blocks: usize,
}

/// A one-node graph bound to a threadpool.
pub(crate) struct PoolHasher {
    ctx: *mut sys::ggml_context,
    graph: *mut sys::ggml_cgraph,
    pool: *mut sys::ggml_threadpool,
    n_threads: c_int,
    job: Box<Job>,
}

/// Spans of fewer blocks are hashed on the calling thread: waking the pool costs more.
const MIN_BLOCKS: usize = 8;

/// The custom op's task: hash blocks `[n*ith/nth, n*(ith+1)/nth)`.
///
/// # Safety
/// `userdata` points to the `Job` of a `PoolHasher::hash` call in progress, whose `span`
/// holds `len` readable bytes and whose `out` holds `n_blocks` writable entries; each
/// task writes only its own range of `out`.
unsafe extern "C" fn hash_task(
    _dst: *mut sys::ggml_tensor,
    _a: *const sys::ggml_tensor,
    ith: c_int,
    nth: c_int,
    userdata: *mut c_void,
) {
    // SAFETY: see above.
    let job = unsafe { &*(userdata as *const Job) };
    let (ith, nth) = (ith.max(0) as usize, nth.max(1) as usize);
    let lo = job.n_blocks * ith / nth;
    let hi = job.n_blocks * (ith + 1) / nth;
    if lo >= hi {
        return;
    }
    // SAFETY: see above; the ranges [lo, hi) of different tasks are disjoint.
    let (span, out) = unsafe {
        (
            std::slice::from_raw_parts(job.span, job.len),
            std::slice::from_raw_parts_mut(job.out.add(lo), hi - lo),
        )
    };
    let start = lo * HASH_BLOCK;
    let end = (hi * HASH_BLOCK).min(span.len());
    hash_blocks(&span[start..end], out);
}

impl PoolHasher {
    /// A hasher computing on `pool` with `n_threads` threads; `None` if ggml could not
    /// make the graph.
    ///
    /// # Safety
    /// `pool` must stay valid for every later [`hash`](Self::hash) call, and those calls
    /// must come while no other graph computes on it (between graph computations, as
    /// the eval callback runs).
    pub(crate) unsafe fn new(pool: *mut sys::ggml_threadpool, n_threads: c_int) -> Option<Self> {
        if pool.is_null() || n_threads < 2 {
            return None;
        }
        let mut job = Box::new(Job {
            span: std::ptr::null(),
            len: 0,
            out: std::ptr::null_mut(),
            n_blocks: 0,
        });
        // SAFETY: plain ggml context and graph construction; every pointer is checked.
        unsafe {
            let mem_size =
                4 * sys::ggml_tensor_overhead() + sys::ggml_graph_overhead_custom(4, false) + 1024;
            let ctx = sys::ggml_init(sys::ggml_init_params {
                mem_size,
                mem_buffer: std::ptr::null_mut(),
                no_alloc: false,
            });
            if ctx.is_null() {
                return None;
            }
            let a = sys::ggml_new_tensor_1d(ctx, sys::GGML_TYPE_F32, 1);
            let node = if a.is_null() {
                std::ptr::null_mut()
            } else {
                sys::ggml_map_custom1(
                    ctx,
                    a,
                    Some(hash_task),
                    sys::GGML_N_TASKS_MAX,
                    (&mut *job as *mut Job).cast(),
                )
            };
            let graph = if node.is_null() {
                std::ptr::null_mut()
            } else {
                sys::ggml_new_graph_custom(ctx, 4, false)
            };
            if graph.is_null() {
                sys::ggml_free(ctx);
                return None;
            }
            sys::ggml_build_forward_expand(graph, node);
            Some(Self {
                ctx,
                graph,
                pool,
                n_threads,
                job,
            })
        }
    }

    /// Fill `out` with [`hash_blocks`]`(span, out)`, on the pool's threads when the span
    /// is large enough (the same hashes either way).
    pub(crate) fn hash(&mut self, span: &[u8], out: &mut [u64]) {
        let n_blocks = span.len().div_ceil(HASH_BLOCK).min(out.len());
        if n_blocks < MIN_BLOCKS {
            hash_blocks(span, out);
            return;
        }
        *self.job = Job {
            span: span.as_ptr(),
            len: span.len(),
            out: out.as_mut_ptr(),
            n_blocks,
        };
        // SAFETY: the graph and pool are valid (constructor contract); the job points
        // at `span` and `out`, which outlive the synchronous computation below.
        let ok = unsafe {
            let mut plan = sys::ggml_graph_plan(self.graph, self.n_threads, self.pool);
            plan.work_size == 0
                && sys::ggml_graph_compute(self.graph, &mut plan) == sys::GGML_STATUS_SUCCESS
        };
        self.job.span = std::ptr::null();
        self.job.out = std::ptr::null_mut();
        if !ok {
            hash_blocks(span, out);
        }
    }
}

impl Drop for PoolHasher {
    fn drop(&mut self) {
        // SAFETY: the context was made by ggml_init in `new` and is freed once; the pool
        // is not ours.
        unsafe { sys::ggml_free(self.ctx) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a real ggml threadpool the hashes are `hash_blocks`'s, for spans below and
    /// above the threshold and not a whole number of blocks.
    #[test]
    fn pool_hashes_equal_serial_hashes() {
        // SAFETY: a fresh threadpool, freed after the hasher.
        unsafe {
            let mut params = sys::ggml_threadpool_params_default(2);
            let pool = sys::ggml_threadpool_new(&mut params);
            assert!(!pool.is_null());
            {
                let mut h = PoolHasher::new(pool, 2).unwrap();
                for len in [
                    0usize,
                    100,
                    3 * HASH_BLOCK,
                    8 * HASH_BLOCK,
                    37 * HASH_BLOCK + 5,
                ] {
                    let span: Vec<u8> = (0..len).map(|i| (i * 31 + i / 7) as u8).collect();
                    let n = len.div_ceil(HASH_BLOCK);
                    let mut want = vec![0u64; n];
                    hash_blocks(&span, &mut want);
                    let mut got = vec![1u64; n];
                    h.hash(&span, &mut got);
                    assert_eq!(got, want, "{len} bytes");
                }
            }
            sys::ggml_threadpool_free(pool);
        }
    }
}
