//! The kept copies: each (layer, role)'s last capture of a KV-cache view or mask, its
//! 8 KiB block hashes, and the [`Revision`] numbering that tells consumers which bytes
//! changed since (see docs/design.md, "Incremental revisions").

use std::collections::HashMap;
use std::sync::Arc;

use trace_format::layout::{hash_blocks, HASH_BLOCK};
use trace_format::{LayoutError, Revision, Role, TensorLayout};

use super::writes::WriteLog;
use crate::pool_hash::PoolHasher;

/// A KV-cache view's (or mask's) last copy, per (layer, role).
struct Kept {
    layout: TensorLayout,
    data: Arc<Vec<u8>>,
    block_hashes: Vec<u64>,
    id: u64,
    /// Absolute addresses of the source span it was gathered from.
    src: std::ops::Range<usize>,
    /// Gathered with write tracking: `pos` is the write log's position at that time.
    tracked: bool,
    pos: u64,
    /// Gathers with write tracking since the last full hash.
    since_audit: u32,
    /// For a view in another backend's memory (an RPC server): `src` holds that
    /// backend's addresses (keys, not memory of this process), and `raw` the span's bytes
    /// as last read, updated where the write log says the graph wrote (see
    /// [`KeptCache::take_raw`]). Empty for host memory.
    remote: bool,
    raw: Vec<u8>,
}

/// One gather's result.
pub(crate) struct Gathered {
    pub data: Arc<Vec<u8>>,
    pub revision: Option<Revision>,
    /// Bytes that an audit found changed where no graph node wrote (0 otherwise).
    pub unexplained: usize,
}

/// Keep KV-cache copies only while all of them together stay under this many bytes
/// (a long context on a large model would otherwise hold a second KV cache); beyond
/// it, further views are copied afresh each step as before.
pub(crate) const KEPT_BUDGET: usize = 1 << 30;

/// The block hashes of one span, computed ahead.
struct Prehashed {
    ptr: *const u8,
    len: usize,
    hashes: Vec<u64>,
}

/// (layer, role): what a kept copy is kept for.
pub(crate) type Key = (i32, Role);

/// The kept copies of one run, with the hasher they use.
pub(crate) struct KeptCache {
    kept: HashMap<Key, Kept>,
    kept_bytes: usize,
    budget: usize,
    revisions: u64,
    /// Hashes kept views on llama.cpp's CPU threadpool (see `pool_hash`), when the
    /// session has one.
    pool_hasher: Option<PoolHasher>,
    /// Block hashes of the spans an attention node's kept sources cover, computed in one
    /// pool computation before they are read (see [`KeptCache::prehash`]); valid only
    /// until [`KeptCache::clear_prehashed`].
    prehashed: Vec<Prehashed>,
    /// What the graph wrote into the kept views' memory (see [`WriteLog`]).
    log: WriteLog,
    /// A tracked view is hashed whole (an audit) every this many gathers; 1: always,
    /// i.e. no write tracking.
    audit_every: u32,
    pub(crate) stats: super::CaptureStats,
}

impl KeptCache {
    pub(crate) fn new(budget: usize, audit_every: u32) -> KeptCache {
        KeptCache {
            kept: HashMap::new(),
            kept_bytes: 0,
            budget,
            revisions: 0,
            pool_hasher: None,
            prehashed: Vec::new(),
            log: WriteLog::default(),
            audit_every: audit_every.max(1),
            stats: super::CaptureStats::default(),
        }
    }

    /// Record what node `t`, about to run, writes into the kept views' memory.
    ///
    /// # Safety
    /// As [`WriteLog::note`].
    pub(crate) unsafe fn note_writes(&mut self, t: *const crate::sys::ggml_tensor) {
        if self.audit_every > 1 {
            // SAFETY: the caller's contract.
            unsafe { self.log.note(t) };
        }
    }

    /// `fault::Fault::HostWrite`: change one byte of cell `cell` of `key`'s view in the
    /// memory it was last gathered from (a write no graph node makes).
    #[cfg(feature = "fault-injection")]
    pub(crate) fn plant_byte(&mut self, key: Key, cell: usize) {
        let Some(k) = self.kept.get(&key).filter(|k| !k.remote) else {
            return;
        };
        let at = cell
            .saturating_mul(k.layout.nb[1] as usize)
            .saturating_add(1);
        if at < k.src.len() {
            // SAFETY: inside the span of a persistent KV-cache tensor in host memory (the
            // memory the view was gathered from); no graph computes between steps.
            unsafe { *((k.src.start + at) as *mut u8) ^= 0x40 };
        }
    }

    fn count_hashed(&mut self, (n, bytes): (u64, u64)) {
        self.stats.full_hashes += n;
        self.stats.hashed_bytes += bytes;
    }

    /// Drop log entries no tracked view needs any more (between steps).
    pub(crate) fn trim_log(&mut self) {
        let oldest = self
            .kept
            .values()
            .filter(|k| k.tracked)
            .map(|k| k.pos)
            .min()
            .unwrap_or(self.log.position());
        self.log.trim(oldest);
    }

    fn rewatch(&mut self) {
        let spans: Vec<_> = self
            .kept
            .values()
            .filter(|k| k.tracked)
            .map(|k| k.src.clone())
            .collect();
        self.log.watch(spans);
    }

    /// A new step (see [`WriteLog::new_step`]).
    pub(crate) fn new_step(&mut self) {
        self.log.new_step();
    }

    /// (bytes, calls) the write log read from non-host buffers since the last call.
    pub(crate) fn take_log_remote_bytes(&mut self) -> (u64, u64) {
        self.log.take_remote_bytes()
    }

    /// The bytes of `key`'s remote span as last read (empty when there are none), taken
    /// out to be updated and handed back with [`KeptCache::put_raw`] after the gather.
    pub(crate) fn take_raw(&mut self, key: Key) -> Vec<u8> {
        match self.kept.get_mut(&key) {
            Some(k) => {
                let raw = std::mem::take(&mut k.raw);
                self.kept_bytes -= raw.len();
                raw
            }
            None => Vec::new(),
        }
    }

    /// Keep `raw` (the bytes of `key`'s remote span just gathered) for the next delta
    /// read, when the key is kept and tracked; its bytes count against the budget.
    pub(crate) fn put_raw(&mut self, key: Key, raw: Vec<u8>) {
        if let Some(k) = self.kept.get_mut(&key) {
            if k.tracked && k.remote && k.raw.is_empty() {
                self.kept_bytes += raw.len();
                k.raw = raw;
            }
        }
    }

    /// The writes into `src` since `key`'s last gather, when they are known: the key is
    /// tracked, was gathered from the same memory in the same layout, and no audit is due.
    pub(crate) fn known_writes(
        &self,
        key: Key,
        layout: &TensorLayout,
        src: &std::ops::Range<usize>,
        track: bool,
    ) -> Option<Vec<std::ops::Range<usize>>> {
        let k = self.kept.get(&key)?;
        if !track || !k.tracked || k.layout != *layout || k.src != *src {
            return None;
        }
        if k.since_audit + 1 >= self.audit_every {
            return None;
        }
        self.log.since(k.pos, src)
    }

    /// Hash on this pool from now on.
    pub(crate) fn use_pool(&mut self, pool: Option<PoolHasher>) {
        self.pool_hasher = pool;
    }

    pub(crate) fn has_pool(&self) -> bool {
        self.pool_hasher.is_some()
    }

    /// Forget the hashes computed ahead (their memory may change from now on).
    pub(crate) fn clear_prehashed(&mut self) {
        self.prehashed.clear();
    }

    /// Would a new copy of `n_bytes` for `key` stay within the budget, the key's old
    /// copy (of another layout) being dropped?
    fn fits_budget(&self, key: Key, n_bytes: usize) -> bool {
        let old = self.kept.get(&key).map_or(0, |k| k.data.len());
        self.kept_bytes - old + n_bytes <= self.budget
    }

    /// Will [`KeptCache::gather`] hash the whole span `src` of a view of `layout` (of
    /// `n_bytes` gathered) for `key`: there is a copy of this layout whose writes are not
    /// known (or whose audit is due), or a new one fits the budget.
    pub(crate) fn will_hash(
        &self,
        key: Key,
        layout: &TensorLayout,
        n_bytes: usize,
        src: &std::ops::Range<usize>,
        track: bool,
    ) -> bool {
        match self.kept.get(&key) {
            Some(k) if k.layout == *layout => self.known_writes(key, layout, src, track).is_none(),
            _ => self.fits_budget(key, n_bytes),
        }
    }

    /// Hash `spans` (pointer, length) all in one computation on the pool (K and V — and
    /// the mixed cache's cold stores — wake the pool once, not once each), for
    /// [`KeptCache::gather`] to find by span. With no pool, or fewer than two spans,
    /// nothing is done (gather hashes a lone span the same way by itself).
    ///
    /// # Safety
    /// Each span must be `len` readable bytes that do not change until
    /// [`KeptCache::clear_prehashed`] (no graph computes in between).
    pub(crate) unsafe fn prehash(&mut self, spans: &[(*const u8, usize)]) {
        self.prehashed.clear();
        if spans.len() < 2 {
            return;
        }
        let Some(pool) = self.pool_hasher.as_mut() else {
            return;
        };
        self.prehashed = spans
            .iter()
            .map(|&(ptr, len)| Prehashed {
                ptr,
                len,
                hashes: vec![0; len.div_ceil(HASH_BLOCK)],
            })
            .collect();
        let mut jobs: Vec<(&[u8], &mut [u64])> = self
            .prehashed
            .iter_mut()
            .map(|p| {
                // SAFETY: the caller's contract.
                let span = unsafe { std::slice::from_raw_parts(p.ptr, p.len) };
                (span, p.hashes.as_mut_slice())
            })
            .collect();
        pool.hash_many(&mut jobs);
    }

    /// Gather a KV-cache view (the bytes of its span, `src`) over its previous copy for
    /// `key` (see [`Revision`]); a new copy when the layout changed, a plain gather with
    /// no revision when the budget is spent.
    ///
    /// With `track` (a K/V cache view, written only by graph nodes), the previous copy
    /// is updated where the write log says the graph wrote since, and every
    /// `audit_every`-th gather hashes the whole span instead, counting changed bytes the
    /// log did not explain ([`Gathered::unexplained`]). Without, the whole span is hashed.
    pub(crate) fn gather(
        &mut self,
        src: &[u8],
        layout: TensorLayout,
        key: Key,
        track: bool,
    ) -> Result<Gathered, LayoutError> {
        self.gather_from(src, None, layout, key, track)
    }

    /// [`KeptCache::gather`] of bytes read from another backend's memory: `remote` is
    /// the address the span starts at there (the tensor's `data`, a key for the write
    /// log); `src` is this process's copy of the span (see [`KeptCache::take_raw`]).
    pub(crate) fn gather_from(
        &mut self,
        src: &[u8],
        remote: Option<usize>,
        layout: TensorLayout,
        key: Key,
        track: bool,
    ) -> Result<Gathered, LayoutError> {
        self.revisions += 1;
        let id = self.revisions;
        let n_bytes = layout.n_bytes()? as usize;
        let origin = remote.unwrap_or(src.as_ptr() as usize);
        let span = origin..origin + layout.span_bytes()? as usize;
        let track = track && self.audit_every > 1;
        let fits = self.fits_budget(key, n_bytes);
        let known = self.known_writes(key, &layout, &span, track);
        // The writes since the last gather, to check an audit against.
        let expected = match (self.kept.get(&key), known.is_none() && track) {
            (Some(k), true) if k.tracked && k.layout == layout && k.src == span => {
                self.log.since(k.pos, &span)
            }
            _ => None,
        };
        let position = self.log.position();
        let pool = &mut self.pool_hasher;
        let prehashed = &self.prehashed;
        // (full hashes, bytes), added to the stats when done.
        let hashed = std::cell::Cell::new((0u64, 0u64));
        let mut hash = |span: &[u8], out: &mut [u64]| {
            let (n, b) = hashed.get();
            hashed.set((n + 1, b + span.len() as u64));
            let ahead = prehashed.iter().find(|p| {
                p.ptr == span.as_ptr() && p.len == span.len() && p.hashes.len() == out.len()
            });
            match (ahead, pool.as_mut()) {
                (Some(p), _) => out.copy_from_slice(&p.hashes),
                (None, Some(h)) => h.hash(span, out),
                (None, None) => hash_blocks(span, out),
            }
        };
        if let Some(k) = self.kept.get_mut(&key) {
            if k.layout == layout {
                // Unique unless a sink kept the previous capture: then it is copied once.
                let data = Arc::make_mut(&mut k.data);
                let (changed, unexplained) = match (&known, &expected) {
                    (Some(w), _) => {
                        self.stats.tracked_gathers += 1;
                        k.since_audit += 1;
                        let c = layout.gather_update_known(
                            src,
                            data,
                            &mut k.block_hashes,
                            w,
                            &mut hash,
                        )?;
                        (c, 0)
                    }
                    (None, Some(w)) => {
                        k.since_audit = 0;
                        match layout.gather_update_audit(
                            src,
                            data,
                            &mut k.block_hashes,
                            w,
                            &mut hash,
                        )? {
                            Some((c, u)) => (Some(c), u),
                            None => (None, 0),
                        }
                    }
                    (None, None) => {
                        k.since_audit = 0;
                        let c = layout.gather_update(src, data, &mut k.block_hashes, &mut hash)?;
                        (c, 0)
                    }
                };
                self.stats.unexplained += u64::from(unexplained > 0);
                let since = changed.map(|c| (k.id, c));
                k.id = id;
                k.pos = position;
                let rewatch = k.tracked != track || k.src != span;
                k.tracked = track;
                k.src = span;
                k.remote = remote.is_some();
                let data = Arc::clone(&k.data);
                if rewatch {
                    self.rewatch();
                }
                self.count_hashed(hashed.get());
                return Ok(Gathered {
                    data,
                    revision: Some(Revision { id, since }),
                    unexplained,
                });
            }
            if let Some(old) = self.kept.remove(&key) {
                self.kept_bytes -= old.data.len();
            }
        }
        let mut out = Vec::new();
        if !fits {
            layout.gather_into(src, &mut out)?;
            self.rewatch();
            self.count_hashed(hashed.get());
            return Ok(Gathered {
                data: Arc::new(out),
                revision: None,
                unexplained: 0,
            });
        }
        let mut block_hashes = Vec::new();
        layout.gather_update(src, &mut out, &mut block_hashes, &mut hash)?;
        let data = Arc::new(out);
        self.kept_bytes += data.len();
        self.kept.insert(
            key,
            Kept {
                layout,
                data: Arc::clone(&data),
                block_hashes,
                id,
                src: span,
                tracked: track,
                pos: position,
                since_audit: 0,
                remote: remote.is_some(),
                raw: Vec::new(),
            },
        );
        self.rewatch();
        self.count_hashed(hashed.get());
        Ok(Gathered {
            data,
            revision: Some(Revision { id, since: None }),
            unexplained: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use gguf_io::GgmlType;

    use super::*;

    /// A gather without write tracking, as a tuple.
    fn gather(
        cache: &mut KeptCache,
        src: &[u8],
        l: TensorLayout,
        key: Key,
    ) -> Result<(Arc<Vec<u8>>, Option<Revision>), LayoutError> {
        cache
            .gather(src, l, key, false)
            .map(|g| (g.data, g.revision))
    }

    fn span_of(src: &[u8], l: &TensorLayout) -> std::ops::Range<usize> {
        let start = src.as_ptr() as usize;
        start..start + l.span_bytes().expect("span") as usize
    }

    /// `rows` rows of `cols` F32 values, contiguous.
    fn layout(cols: u64, rows: u64) -> TensorLayout {
        TensorLayout::contiguous(GgmlType::F32, [cols, rows, 1, 1]).expect("F32 layout")
    }

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn revisions_name_what_changed_since_the_previous_capture() {
        let mut cache = KeptCache::new(KEPT_BUDGET, 1);
        let l = layout(4096, 8); // 16 KiB per row: rows in their own blocks
        let key = (0, Role::K);
        let mut src = bytes(4096 * 8 * 4, 1);
        let (first, r1) = gather(&mut cache, &src, l, key).expect("gather");
        assert_eq!(*first, src);
        let r1 = r1.expect("kept");
        assert_eq!(r1.since, None);

        // Nothing changed: an empty change list against r1.
        let (_, r2) = gather(&mut cache, &src, l, key).expect("gather");
        let r2 = r2.expect("kept");
        assert_eq!(r2.since, Some((r1.id, vec![])));

        // One row changes: its byte range, against r2.
        let row = 16384;
        src[5 * row + 7] ^= 0xff;
        let (data, r3) = gather(&mut cache, &src, l, key).expect("gather");
        assert_eq!(*data, src);
        let (since, changed) = r3.expect("kept").since.expect("compared");
        assert_eq!(since, r2.id);
        assert!(!changed.is_empty());
        assert!(changed
            .iter()
            .all(|c| c.start >= 5 * row && c.end <= 6 * row));
        assert!(changed.iter().any(|c| c.contains(&(5 * row + 7))));
    }

    #[test]
    fn keys_are_separate_and_layout_changes_start_over() {
        let mut cache = KeptCache::new(KEPT_BUDGET, 1);
        let src = bytes(64 * 4 * 4, 2);
        let (_, a) = gather(&mut cache, &src, layout(64, 4), (0, Role::K)).expect("gather");
        let (_, b) = gather(&mut cache, &src, layout(64, 4), (0, Role::V)).expect("gather");
        let (a, b) = (a.expect("kept"), b.expect("kept"));
        assert_ne!(a.id, b.id);
        assert_eq!(b.since, None, "another role has its own copy");
        let (data, c) = gather(&mut cache, &src, layout(128, 2), (0, Role::K)).expect("gather");
        assert_eq!(*data, src);
        assert_eq!(c.expect("kept").since, None, "a new layout is not compared");
    }

    #[test]
    fn budget_bounds_the_kept_bytes() {
        let l = layout(64, 4); // 1 KiB
        let src = bytes(1024, 3);
        let mut cache = KeptCache::new(1024, 1);
        assert!(cache.will_hash((0, Role::K), &l, 1024, &span_of(&src, &l), false));
        let (_, r) = gather(&mut cache, &src, l, (0, Role::K)).expect("gather");
        assert!(r.is_some());
        assert!(!cache.will_hash((1, Role::K), &l, 1024, &span_of(&src, &l), false));
        let (data, r) = gather(&mut cache, &src, l, (1, Role::K)).expect("gather");
        assert_eq!(*data, src);
        assert_eq!(r, None, "over budget: copied afresh, no revision");
        // The kept key still compares.
        assert!(cache.will_hash((0, Role::K), &l, 1024, &span_of(&src, &l), false));
        let (_, r) = gather(&mut cache, &src, l, (0, Role::K)).expect("gather");
        assert!(r.expect("kept").since.is_some());
    }

    #[test]
    fn a_shared_previous_capture_is_not_changed() {
        let mut cache = KeptCache::new(KEPT_BUDGET, 1);
        let l = layout(64, 4);
        let mut src = bytes(1024, 4);
        let (old, _) = gather(&mut cache, &src, l, (2, Role::Mask)).expect("gather");
        src[0] ^= 1;
        let (new, _) = gather(&mut cache, &src, l, (2, Role::Mask)).expect("gather");
        assert_ne!(old[0], new[0], "the sink's Arc keeps the old bytes");
        assert_eq!(*new, src);
    }

    #[test]
    fn prehash_without_a_pool_does_nothing() {
        let mut cache = KeptCache::new(KEPT_BUDGET, 1);
        assert!(!cache.has_pool());
        let src = bytes(1024, 5);
        // SAFETY: the spans are live slices, unchanged until cleared.
        unsafe { cache.prehash(&[(src.as_ptr(), src.len()), (src.as_ptr(), 512)]) };
        assert!(cache.prehashed.is_empty());
        cache.clear_prehashed();
    }
}
