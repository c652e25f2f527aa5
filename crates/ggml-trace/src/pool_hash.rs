//! Block hashing of kept KV-cache views on llama.cpp's own CPU threadpool.
//!
//! The capture hashes every KV-cache view it keeps once per step
//! (`TensorLayout::gather_update`); that read is most of its cost per token, and it runs
//! inside the eval callback, while the threadpool's other threads wait for the next
//! graph computation. This runs it as a one-node ggml graph — a `ggml_map_custom1` op
//! whose task hashes its share of the blocks — computed with that same threadpool, so
//! ggml's threads do the work without any thread of ours competing with them.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};

use trace_format::layout::{hash_blocks, HASH_BLOCK};

use crate::sys;

/// One span of a job, hashed in grains of `GRAIN` blocks: its grains are
/// `first_grain..first_grain + n_blocks.div_ceil(GRAIN)` of the job's.
#[derive(Clone, Copy)]
struct Part {
    span: *const u8,
    len: usize,
    out: *mut u64,
    n_blocks: usize,
    first_grain: usize,
}

/// What the graph's tasks hash (set before each computation): the parts' grains,
/// numbered one after another.
struct Job {
    parts: Vec<Part>,
    n_grains: usize,
    /// The next grain no task has taken yet.
    next: AtomicUsize,
}

/// Blocks a task takes at a time. The tasks take work as they go rather than a fixed
/// half each: a KV-cache view's used cells are usually still in cache from the attention
/// that just read them while the rest comes from memory, so equal shares of blocks are
/// far from equal shares of time.
const GRAIN: usize = 2;

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

/// The custom op's task: take one grain at a time until none are left, hash it.
///
/// # Safety
/// `userdata` points to the `Job` of a `PoolHasher::hash_many` call in progress, whose
/// parts' `span`s hold `len` readable bytes and whose `out`s hold `n_blocks` writable
/// entries; the atomic counter hands each grain to exactly one task, which alone writes
/// its entries.
unsafe extern "C" fn hash_task(
    _dst: *mut sys::ggml_tensor,
    _a: *const sys::ggml_tensor,
    _ith: c_int,
    _nth: c_int,
    userdata: *mut c_void,
) {
    // SAFETY: see above.
    let job = unsafe { &*(userdata as *const Job) };
    // Grains are handed out in order: this task's next one is in this part or later.
    let mut part = 0usize;
    loop {
        let g = job.next.fetch_add(1, Ordering::Relaxed);
        if g >= job.n_grains {
            return;
        }
        while g >= job.parts[part].first_grain + job.parts[part].n_blocks.div_ceil(GRAIN) {
            part += 1;
        }
        let p = job.parts[part];
        let lo = (g - p.first_grain) * GRAIN;
        let hi = (lo + GRAIN).min(p.n_blocks);
        // SAFETY: see above; blocks [lo, hi) of this part are this task's alone.
        let (span, out) = unsafe {
            (
                std::slice::from_raw_parts(p.span, p.len),
                std::slice::from_raw_parts_mut(p.out.add(lo), hi - lo),
            )
        };
        let end = (hi * HASH_BLOCK).min(span.len());
        hash_blocks(&span[lo * HASH_BLOCK..end], out);
    }
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
            parts: Vec::new(),
            n_grains: 0,
            next: AtomicUsize::new(0),
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
        self.hash_many(&mut [(span, out)]);
    }

    /// [`hash`](Self::hash) for several spans in one graph computation (one wake-up of
    /// the pool instead of one per span).
    pub(crate) fn hash_many(&mut self, jobs: &mut [(&[u8], &mut [u64])]) {
        let (mut n_blocks, mut n_grains) = (0usize, 0usize);
        self.job.parts.clear();
        for (span, out) in jobs.iter_mut() {
            let n = span.len().div_ceil(HASH_BLOCK).min(out.len());
            if n == 0 {
                continue;
            }
            self.job.parts.push(Part {
                span: span.as_ptr(),
                len: span.len(),
                out: out.as_mut_ptr(),
                n_blocks: n,
                first_grain: n_grains,
            });
            n_blocks += n;
            n_grains += n.div_ceil(GRAIN);
        }
        if n_blocks < MIN_BLOCKS {
            self.job.parts.clear();
            for (span, out) in jobs.iter_mut() {
                hash_blocks(span, out);
            }
            return;
        }
        self.job.n_grains = n_grains;
        self.job.next = AtomicUsize::new(0);
        // SAFETY: the graph and pool are valid (constructor contract); the job points
        // at the spans and outputs of `jobs`, which outlive the synchronous computation
        // below.
        let ok = unsafe {
            let mut plan = sys::ggml_graph_plan(self.graph, self.n_threads, self.pool);
            plan.work_size == 0
                && sys::ggml_graph_compute(self.graph, &mut plan) == sys::GGML_STATUS_SUCCESS
        };
        self.job.parts.clear();
        if !ok {
            for (span, out) in jobs.iter_mut() {
                hash_blocks(span, out);
            }
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

    /// `f` with a hasher on a fresh two-thread ggml threadpool.
    fn with_pool_hasher(f: impl FnOnce(&mut PoolHasher)) {
        // SAFETY: a fresh threadpool, freed after the hasher that uses it.
        unsafe {
            let mut params = sys::ggml_threadpool_params_default(2);
            let pool = sys::ggml_threadpool_new(&mut params);
            assert!(!pool.is_null());
            let mut h = PoolHasher::new(pool, 2).unwrap();
            f(&mut h);
            drop(h);
            sys::ggml_threadpool_free(pool);
        }
    }

    /// `hash_blocks` of `span`: what the pool must give.
    fn serial(span: &[u8]) -> Vec<u64> {
        let mut want = vec![0u64; span.len().div_ceil(HASH_BLOCK)];
        hash_blocks(span, &mut want);
        want
    }

    /// On a real ggml threadpool the hashes are `hash_blocks`'s, for spans below and
    /// above the threshold and not a whole number of blocks.
    #[test]
    fn pool_hashes_equal_serial_hashes() {
        with_pool_hasher(|h| {
            for len in [
                0usize,
                100,
                3 * HASH_BLOCK,
                8 * HASH_BLOCK,
                37 * HASH_BLOCK + 5,
            ] {
                let span: Vec<u8> = (0..len).map(|i| (i * 31 + i / 7) as u8).collect();
                let want = serial(&span);
                let mut got = vec![1u64; want.len()];
                h.hash(&span, &mut got);
                assert_eq!(got, want, "{len} bytes");
            }
        });
    }

    /// Several spans in one computation (parts of odd block counts, so grains end at a
    /// part's end; an empty span; spans of one block) give each span's serial hashes.
    #[test]
    fn many_spans_in_one_computation_equal_serial_hashes() {
        with_pool_hasher(|h| {
            for lens in [
                vec![HASH_BLOCK, 0, 3 * HASH_BLOCK + 1, 9 * HASH_BLOCK],
                vec![5 * HASH_BLOCK - 3, 5 * HASH_BLOCK, 1, 2 * HASH_BLOCK],
                vec![17 * HASH_BLOCK],
            ] {
                let spans: Vec<Vec<u8>> = lens
                    .iter()
                    .enumerate()
                    .map(|(k, &len)| (0..len).map(|i| (i * 29 + k * 7 + i / 5) as u8).collect())
                    .collect();
                let want: Vec<Vec<u64>> = spans.iter().map(|s| serial(s)).collect();
                let mut got: Vec<Vec<u64>> = want.iter().map(|w| vec![1u64; w.len()]).collect();
                let mut jobs: Vec<(&[u8], &mut [u64])> = spans
                    .iter()
                    .zip(got.iter_mut())
                    .map(|(s, g)| (s.as_slice(), g.as_mut_slice()))
                    .collect();
                h.hash_many(&mut jobs);
                assert_eq!(got, want, "{lens:?}");
            }
        });
    }
}
