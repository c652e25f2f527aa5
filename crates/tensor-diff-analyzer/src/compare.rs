//! The comparison engine: the reference trace (memory-mapped) indexed by (role, layer,
//! step), the run metadata checked before any tensor, and each current tensor compared
//! as it arrives, a chunk at a time, so the current side is never held whole.

use std::borrow::Cow;
use std::collections::HashMap;

use gguf_io::{quant, ByteOrder, GgmlType};
use tensor_stats::{unravel, DiffAccumulator, DiffMetrics, Tolerance};
use trace_format::{Role, RunMeta, StepMeta, TensorMeta, TraceFile, TracedTensor};

use crate::trust::{self, shown, Observed, Rotation, TrustError};

/// Where an element sits: its 4-d index, and for attention tensors the token (within the
/// step, and its position in the sequence), head and dimension.
#[derive(Clone, Debug, PartialEq)]
pub struct Location {
    pub index: [u64; 4],
    pub token: Option<u64>,
    pub position: Option<i32>,
    pub head: Option<u64>,
    pub dim: Option<u64>,
}

/// One compared pair.
#[derive(Clone, Debug)]
pub struct Comparison {
    /// The current tensor's role, layer and step.
    pub role: Role,
    pub layer: i32,
    pub step: u32,
    /// The reference tensor's role: the same, except across a rotation difference
    /// (`kqv_out` against `kqv_out_unrotated`).
    pub reference_role: Role,
    pub reference_name: String,
    pub current_name: String,
    pub reference_type: GgmlType,
    pub current_type: GgmlType,
    pub reference_shape: [u64; 4],
    pub current_shape: [u64; 4],
    /// None when the shapes differ or the values could not be read (`error`).
    pub metrics: Option<DiffMetrics>,
    pub error: Option<String>,
    pub worst_abs_at: Option<Location>,
    pub worst_rel_at: Option<Location>,
    /// The run-to-run difference of the same tensor (`--noise-floor`).
    pub noise: Option<DiffMetrics>,
}

impl Comparison {
    pub fn shape_match(&self) -> bool {
        self.reference_shape == self.current_shape
    }

    pub fn type_match(&self) -> bool {
        self.reference_type == self.current_type
    }

    /// Same shape, values read, and within tolerance.
    pub fn within(&self) -> bool {
        self.shape_match()
            && self.error.is_none()
            && self.metrics.as_ref().is_some_and(|m| m.within)
    }
}

/// A tensor that was not compared.
#[derive(Clone, Debug, PartialEq)]
pub struct Unpaired {
    pub side: &'static str,
    pub name: String,
    pub role: Role,
    pub layer: i32,
    pub step: u32,
    /// Why it is not comparable; None: it simply has no counterpart (unmatched).
    pub reason: Option<String>,
}

/// What the run metadata says about comparability.
#[derive(Clone, Debug, Default)]
pub struct RunCheck {
    /// Differences that make the comparison meaningless (exit 2).
    pub fatal: Vec<String>,
    /// Differences the user should know before reading numbers.
    pub notes: Vec<String>,
    /// Rotation per layer of Q/K and of V, reference and current ([`Observed`]).
    pub ref_rot_k: Rotation,
    pub ref_rot_v: Rotation,
    pub cur_rot_k: Rotation,
    pub cur_rot_v: Rotation,
    /// Each side's rotation was recorded from its graph (else inferred from its flags).
    pub rotation_recorded: (bool, bool),
    /// Layers of the runs (the larger `n_layer`), for the rotation notes.
    pub n_layer: usize,
    /// Flash attention on in (reference, current); None until known. The mixed KV
    /// cache's attention node has flash attention's layout and counts as on.
    pub flash: (Option<bool>, Option<bool>),
    /// The mixed KV cache was used in (reference, current).
    pub mixed: (bool, bool),
}

impl RunCheck {
    fn rot_k_differs(&self, layer: i32) -> bool {
        self.ref_rot_k.at(layer) != self.cur_rot_k.at(layer)
    }
    fn rot_v_differs(&self, layer: i32) -> bool {
        self.ref_rot_v.at(layer) != self.cur_rot_v.at(layer)
    }

    /// What the rotation facts mean for the comparison, as they stand (a live run's are
    /// complete only at its end): where Q/K or V were rotated on one side only, and which
    /// side's rotation was inferred from its run flags rather than recorded.
    pub fn rotation_notes(&self, cache_types: [&str; 2]) -> Vec<String> {
        let mut notes = Vec::new();
        for (side, recorded, types) in [
            ("reference", self.rotation_recorded.0, cache_types[0]),
            ("current run", self.rotation_recorded.1, cache_types[1]),
        ] {
            if !recorded && !types.is_empty() {
                notes.push(format!(
                    "rotation of the {side} is inferred from kqv_trace.run.kv_rotation and its \
                     cache types ({types}), not recorded: its trace predates the per-layer \
                     kqv_trace.run.rotated_k / rotated_v keys"
                ));
            }
        }
        let differ = |r: &Rotation, c: &Rotation| -> Vec<(bool, Vec<i32>)> {
            // Grouped by the side that rotated (true: the current run).
            let layers = r.differing(c, self.n_layer);
            let (cur, refs): (Vec<i32>, Vec<i32>) = layers.into_iter().partition(|&l| c.at(l));
            [(true, cur), (false, refs)]
                .into_iter()
                .filter(|(_, v)| !v.is_empty())
                .collect()
        };
        for (current, layers) in differ(&self.ref_rot_k, &self.cur_rot_k) {
            notes.push(format!(
                "rotation basis differs{}: the {} rotated Q and K by a Hadamard matrix (quantized \
                 K cache, head size a multiple of 64): q and k are not compared there; set \
                 LLAMA_ATTN_ROT_DISABLE=1 for the rotated run to compare them",
                in_layers(&layers, self.n_layer),
                side_name(current)
            ));
        }
        for (current, layers) in differ(&self.ref_rot_v, &self.cur_rot_v) {
            notes.push(format!(
                "rotation basis differs{}: the {} stored V rotated (quantized V cache), so its v, \
                 attn and kqv_out are in the rotated basis: its kqv_out_unrotated is compared \
                 with the other side's kqv_out, v and attn are not compared there; set \
                 LLAMA_ATTN_ROT_DISABLE=1 for the rotated run to compare them",
                in_layers(&layers, self.n_layer),
                side_name(current)
            ));
        }
        notes
    }
    fn fa_differs(&self) -> bool {
        matches!(self.flash, (Some(a), Some(b)) if a != b)
    }
    fn mixed_differs(&self) -> bool {
        self.mixed.0 != self.mixed.1
    }
}

/// A long list of numbers shown as its first 8 and its length.
struct Short<'a>(&'a [i32]);

impl std::fmt::Debug for Short<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.len() <= 8 {
            return write!(f, "{:?}", self.0);
        }
        write!(f, "{:?}.. ({} in all)", &self.0[..8], self.0.len())
    }
}

fn short_tokens(t: &[i32]) -> String {
    let shown: Vec<String> = t.iter().take(8).map(i32::to_string).collect();
    let more = if t.len() > 8 { ", …" } else { "" };
    format!("[{}{more}] ({} tokens)", shown.join(", "), t.len())
}

/// ` in layers 0, 2-5` (empty when every layer of `n` is listed).
fn in_layers(layers: &[i32], n: usize) -> String {
    if layers.len() >= n {
        return String::new();
    }
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < layers.len() {
        let mut j = i;
        while j + 1 < layers.len() && layers[j + 1] == layers[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            layers[i].to_string()
        } else {
            format!("{}-{}", layers[i], layers[j])
        });
        i = j + 1;
    }
    format!(
        " in layer{} {}",
        if layers.len() > 1 { "s" } else { "" },
        parts.join(", ")
    )
}

fn side_name(rotated_in_current: bool) -> &'static str {
    if rotated_in_current {
        "current run"
    } else {
        "reference"
    }
}

/// Compare the runs' metadata: model, prompt, cache types; and what each side's tensors
/// show ([`trust::observe`]): rotation, flash attention, the mixed KV cache.
pub fn check_runs(r: &RunMeta, rs: &Observed, c: &RunMeta, cs: &Observed) -> RunCheck {
    let mut k = RunCheck {
        ref_rot_k: rs.rot_k.clone(),
        ref_rot_v: rs.rot_v.clone(),
        cur_rot_k: cs.rot_k.clone(),
        cur_rot_v: cs.rot_v.clone(),
        rotation_recorded: (rs.rotation_recorded, cs.rotation_recorded),
        n_layer: r.n_layer.max(c.n_layer) as usize,
        flash: (rs.flash, cs.flash),
        mixed: (rs.mixed, cs.mixed),
        ..Default::default()
    };
    let model = |m: &RunMeta| {
        format!(
            "{} with {} layers, {} heads over {} KV heads ({})",
            shown(&m.architecture),
            m.n_layer,
            m.n_head,
            m.n_head_kv,
            shown(&m.model_path)
        )
    };
    let known = |m: &RunMeta| !m.architecture.is_empty() && m.n_layer > 0;
    if known(r)
        && known(c)
        && (r.architecture != c.architecture
            || r.n_layer != c.n_layer
            || r.n_head != c.n_head
            || r.n_head_kv != c.n_head_kv)
    {
        k.fatal.push(format!(
            "the reference was traced with a different model: {} against {} here; use -m {}",
            model(r),
            model(c),
            shown(&r.model_path)
        ));
    } else if !r.model_sha256.is_empty()
        && !c.model_sha256.is_empty()
        && r.model_sha256 != c.model_sha256
    {
        k.notes.push(format!(
            "the model file differs (reference {} sha256 {:.12}…, current {} sha256 {:.12}…): \
             the differences below include the model change; use -m {} to compare the same model",
            shown(&r.model_path),
            shown(&r.model_sha256),
            shown(&c.model_path),
            shown(&c.model_sha256),
            shown(&r.model_path)
        ));
    }
    if !r.prompt_tokens.is_empty()
        && !c.prompt_tokens.is_empty()
        && r.prompt_tokens != c.prompt_tokens
    {
        let at = r
            .prompt_tokens
            .iter()
            .zip(&c.prompt_tokens)
            .position(|(a, b)| a != b)
            .unwrap_or(r.prompt_tokens.len().min(c.prompt_tokens.len()));
        k.fatal.push(format!(
            "the reference was traced with a different prompt: reference tokens {}, current {} \
             (first difference at token {at}); run with the reference's prompt (-p/-f)",
            short_tokens(&r.prompt_tokens),
            short_tokens(&c.prompt_tokens)
        ));
    }
    if (r.cache_type_k != c.cache_type_k || r.cache_type_v != c.cache_type_v)
        && !r.cache_type_k.is_empty()
        && !c.cache_type_k.is_empty()
    {
        k.notes.push(format!(
            "KV cache types differ: reference K {} / V {}, current K {} / V {}",
            shown(&r.cache_type_k),
            shown(&r.cache_type_v),
            shown(&c.cache_type_k),
            shown(&c.cache_type_v)
        ));
    }
    // Rotation notes: RunCheck::rotation_notes, once a live run has shown every layer's.
    if k.fa_differs() {
        k.notes.push(flash_note(k.flash));
    }
    if k.mixed_differs() {
        k.notes.push(format!(
            "KV cache layout differs: the {} used the mixed KV cache (recent tokens in an F16 \
             hot store, older ones in a quantized cold store): its k/v hold only the hot \
             window, k_quant/v_quant the cold rows and its mask covers cold then hot cells, so \
             k, v, k_quant, v_quant and mask are not compared; q, attn and kqv_out are",
            side_name(k.mixed.1)
        ));
    }
    if !r.complete {
        k.notes
            .push("the reference trace is incomplete (its run was interrupted)".into());
    }
    if r.n_ubatch != 0 && c.n_ubatch != 0 && r.n_ubatch != c.n_ubatch {
        k.notes.push(format!(
            "ubatch sizes differ (reference -ub {}, current -ub {}): prompt steps cover different \
             tokens; use -ub {}",
            r.n_ubatch, c.n_ubatch, r.n_ubatch
        ));
    }
    if !r.llama_version.is_empty()
        && !c.llama_version.is_empty()
        && r.llama_version != c.llama_version
    {
        k.notes.push(format!(
            "llama.cpp versions differ: reference '{}', current '{}'",
            shown(&r.llama_version),
            shown(&c.llama_version)
        ));
    }
    k
}

fn flash_note(f: (Option<bool>, Option<bool>)) -> String {
    let s = |b: Option<bool>| if b == Some(true) { "on" } else { "off" };
    format!(
        "flash attention differs (reference {}, current {}): attn and v have different layouts \
         and kq/kq_soft_max exist only without it, so they are not compared; use -fa {} to match",
        s(f.0),
        s(f.1),
        s(f.0)
    )
}

/// Elements dequantized per chunk: a multiple of every block size (32, 256).
const CHUNK: u64 = 1 << 14;

/// Little-endian f32 bytes seen as f32 values in place, when they are aligned for it.
fn f32_in_place(b: &[u8]) -> Option<&[f32]> {
    if cfg!(target_endian = "big") {
        return None;
    }
    bytemuck::try_cast_slice(b).ok()
}

/// Compare two tensors' bytes (logical order, own types) element by element, chunk by
/// chunk, split over `threads` threads for large tensors. Two F32 tensors (the common
/// case of a memory-mapped trace) are read in place, with no copy.
pub fn diff_bytes(
    cur_ty: GgmlType,
    cur: &[u8],
    ref_ty: GgmlType,
    reference: &[u8],
    n: u64,
    tol: Tolerance,
    threads: usize,
) -> Result<DiffMetrics, String> {
    diff_bytes_with(cur_ty, cur, ref_ty, reference, n, tol, threads, true)
}

/// `diff_bytes`, with the in-place F32 path allowed or not (the tests compare both).
#[allow(clippy::too_many_arguments)]
fn diff_bytes_with(
    cur_ty: GgmlType,
    cur: &[u8],
    ref_ty: GgmlType,
    reference: &[u8],
    n: u64,
    tol: Tolerance,
    threads: usize,
    in_place: bool,
) -> Result<DiffMetrics, String> {
    for (ty, b, side) in [(cur_ty, cur, "current"), (ref_ty, reference, "reference")] {
        let need = ty
            .bytes_for(n)
            .ok_or_else(|| format!("{side}: type {} has no size for {n} elements", ty.name()))?;
        if need != b.len() as u64 {
            return Err(format!(
                "{side}: {} bytes for {n} elements of {}",
                b.len(),
                ty.name()
            ));
        }
        if !quant::can_dequantize(ty) {
            return Err(format!("{side}: cannot read type {}", ty.name()));
        }
    }
    let threads = threads.clamp(1, n.div_ceil(CHUNK * 16).max(1) as usize);
    let direct = match (cur_ty, ref_ty, in_place) {
        (GgmlType::F32, GgmlType::F32, true) => f32_in_place(cur).zip(f32_in_place(reference)),
        _ => None,
    };
    let range = |start: u64, end: u64| -> Result<DiffAccumulator, String> {
        let mut acc = DiffAccumulator::starting_at(tol, n, start);
        if let Some((c, r)) = direct {
            // The same blocks as the chunked path below (CHUNK is a multiple of the
            // accumulator's block), so the same bits.
            let (s, e) = (start as usize, end as usize);
            acc.push(&c[s..e], &r[s..e]).map_err(|e| e.to_string())?;
            return Ok(acc);
        }
        let len = CHUNK.min(end - start) as usize;
        let (mut c, mut r) = (vec![0f32; len], vec![0f32; len]);
        let mut at = start;
        while at < end {
            let k = CHUNK.min(end - at);
            let bytes = |ty: GgmlType, b: &'_ [u8]| -> Result<std::ops::Range<usize>, String> {
                let from = ty.bytes_for(at).ok_or("bad offset")? as usize;
                let to = ty.bytes_for(at + k).ok_or("bad offset")? as usize;
                Ok(from..to.min(b.len()))
            };
            let (cs, rs) = (&mut c[..k as usize], &mut r[..k as usize]);
            quant::dequantize(cur_ty, &cur[bytes(cur_ty, cur)?], cs).map_err(|e| e.to_string())?;
            quant::dequantize(ref_ty, &reference[bytes(ref_ty, reference)?], rs)
                .map_err(|e| e.to_string())?;
            acc.push(cs, rs).map_err(|e| e.to_string())?;
            at += k;
        }
        Ok(acc)
    };
    if threads == 1 {
        return Ok(range(0, n)?.finish());
    }
    let parts: Vec<Result<DiffAccumulator, String>> = std::thread::scope(|s| {
        let range = &range;
        let hs: Vec<_> = tensor_stats::split_ranges(n, threads, CHUNK)
            .map(|piece| s.spawn(move || range(piece.start, piece.end)))
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("comparison thread panicked".into()))
            })
            .collect()
    });
    let mut acc = DiffAccumulator::new(tol, n);
    for p in parts {
        acc.merge(&p?);
    }
    Ok(acc.finish())
}

/// Where flat index `i` of a tensor is, in attention terms where the role has them;
/// `step` is the tensor's step (its positions), when known.
pub fn locate(meta: &TensorMeta, run: &RunMeta, step: Option<&StepMeta>, i: u64) -> Location {
    let ne = meta.layout.ne;
    let idx = unravel(i, ne);
    // (token, head, dim)
    let thd = match meta.role {
        Role::KqvOut | Role::KqvOutUnrotated
            if run.n_head > 0 && ne[0] % u64::from(run.n_head) == 0 =>
        {
            let d = ne[0] / u64::from(run.n_head);
            Some((idx[1], Some(idx[0] / d), Some(idx[0] % d)))
        }
        // FLASH_ATTN_EXT's result is [D, H, T]; `kqv` without flash attention [D, T, H].
        // Flash attention's output, and the mixed KV cache's node (a CUSTOM op with the
        // same output layout): [dim, head, token].
        Role::Attn
            if meta.op == "FLASH_ATTN_EXT" || (meta.op == "CUSTOM" && run.mixed_kv_cache) =>
        {
            Some((idx[2], Some(idx[1]), Some(idx[0])))
        }
        Role::Attn | Role::Q => Some((idx[1], Some(idx[2]), Some(idx[0]))),
        Role::Kq | Role::KqSoftMax => Some((idx[1], Some(idx[2]), None)),
        Role::Mask => Some((idx[1], None, None)),
        _ => None,
    };
    let position =
        thd.and_then(|(t, _, _)| step.and_then(|s| s.positions.get(t as usize).copied()));
    Location {
        index: idx,
        token: thd.map(|x| x.0),
        position,
        head: thd.and_then(|x| x.1),
        dim: thd.and_then(|x| x.2),
    }
}

/// A tensor's bytes in little-endian order, whatever its file's byte order: the one path
/// both the reader and the comparison take (`gguf_io::to_little_endian`).
pub fn le_data<'a>(file: &'a TraceFile, t: &TracedTensor) -> Cow<'a, [u8]> {
    match file.data(t) {
        Cow::Borrowed(d) => gguf_io::to_little_endian(t.meta.layout.ty, byte_order(file), d),
        // Rebuilt (a version-2 delta): swapped only if the file is big-endian.
        Cow::Owned(d) if matches!(byte_order(file), ByteOrder::Big) => {
            Cow::Owned(gguf_io::to_little_endian(t.meta.layout.ty, ByteOrder::Big, &d).into_owned())
        }
        Cow::Owned(d) => Cow::Owned(d),
    }
}

fn byte_order(file: &TraceFile) -> ByteOrder {
    file.gguf().header().byte_order
}

/// Position notes kept in full; more are counted in one line.
const POSITION_NOTES: usize = 5;

/// The analysis state: the reference and what has been compared so far.
pub struct Analyzer<'r> {
    pub reference: &'r TraceFile,
    /// What the reference's tensors show ([`trust::observe`]).
    pub reference_seen: Observed,
    /// (role, layer, step) -> tensor, built once; unique ([`trust::observe`] refuses
    /// duplicates).
    index: HashMap<(Role, i32, u32), usize>,
    /// Step number -> index in `reference.steps` / `current_steps`.
    ref_steps: HashMap<u32, usize>,
    cur_steps: HashMap<u32, usize>,
    diverged: bool,
    position_notes: usize,
    used: Vec<bool>,
    pub layer: Option<i32>,
    pub tolerance: Tolerance,
    pub threads: usize,
    pub check: RunCheck,
    pub current_run: RunMeta,
    pub current_steps: Vec<StepMeta>,
    pub comparisons: Vec<Comparison>,
    /// Current tensors without a counterpart, or not comparable.
    pub current_unpaired: Vec<Unpaired>,
    /// Current tensors of a layer `--layer` leaves out.
    pub current_other_layer: usize,
    /// Current tensors without a trace role (a file of another tool).
    pub current_no_role: usize,
    /// Notes found while comparing (generation divergence, step positions).
    pub late_notes: Vec<String>,
    /// The current run's outputs (own token choices, logits) against the reference's.
    pub outputs: crate::output::Outputs,
}

impl<'r> Analyzer<'r> {
    /// The reference is checked first ([`trust::observe`]): a duplicated tensor or a run
    /// flag its tensors contradict is an error.
    pub fn new(
        reference: &'r TraceFile,
        layer: Option<i32>,
        tolerance: Tolerance,
    ) -> Result<Self, TrustError> {
        let reference_seen = trust::observe(reference)?;
        let index = reference
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| ((t.meta.role, t.meta.layer, t.meta.step), i))
            .collect();
        let ref_steps = reference
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.step, i))
            .collect();
        Ok(Self {
            reference,
            reference_seen,
            index,
            ref_steps,
            cur_steps: HashMap::new(),
            diverged: false,
            position_notes: 0,
            used: vec![false; reference.tensors.len()],
            layer,
            tolerance,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            check: RunCheck::default(),
            current_run: RunMeta::default(),
            current_steps: Vec::new(),
            comparisons: Vec::new(),
            current_unpaired: Vec::new(),
            current_other_layer: 0,
            current_no_role: 0,
            late_notes: Vec::new(),
            outputs: crate::output::Outputs::default(),
        })
    }

    /// Check the current run against the reference's; returns the fatal differences.
    /// `seen`: what the current side's tensors show (a file: [`trust::observe`]; a live
    /// run: [`Observed::claimed`] of the running context).
    pub fn set_current_run(&mut self, run: RunMeta, seen: Observed) -> &RunCheck {
        self.check = check_runs(&self.reference.run, &self.reference_seen, &run, &seen);
        self.current_run = run;
        &self.check
    }

    /// Live mode learns each layer's rotation from its capture (what the graph showed),
    /// before that layer's tensors are compared.
    pub fn set_current_rotation(&mut self, layer: i32, k: bool, v: bool) {
        self.check.cur_rot_k.set(layer, k);
        self.check.cur_rot_v.set(layer, v);
        self.check.rotation_recorded.1 = true;
    }

    /// Every note on the run differences, rotation included (as the facts stand now).
    pub fn notes(&self) -> Vec<String> {
        let mut n = self.check.notes.clone();
        let types = |r: &RunMeta| {
            let q = |t: &str| GgmlType::from_name(t).is_some_and(|t| t.is_quantized());
            if q(&r.cache_type_k) || q(&r.cache_type_v) {
                format!("K {}, V {}", shown(&r.cache_type_k), shown(&r.cache_type_v))
            } else {
                String::new()
            }
        };
        let (rt, ct) = (types(&self.reference.run), types(&self.current_run));
        n.extend(self.check.rotation_notes([&rt, &ct]));
        n.extend(self.late_notes());
        n
    }

    /// Live mode learns whether flash attention is on from the first attention op.
    pub fn set_current_flash(&mut self, on: bool) {
        if self.check.flash.1.is_some() {
            return;
        }
        self.check.flash.1 = Some(on);
        self.current_run.flash_attn = if on { "on" } else { "off" }.into();
        if self.check.fa_differs() {
            self.check.notes.push(flash_note(self.check.flash));
        }
    }

    /// A step of the current run: checks it decodes what the reference's step did.
    pub fn add_current_step(&mut self, step: StepMeta) {
        if let Some(r) = self
            .ref_steps
            .get(&step.step)
            .map(|&i| &self.reference.steps[i])
        {
            if r.positions != step.positions {
                self.position_notes += 1;
                if self.position_notes <= POSITION_NOTES {
                    self.late_notes.push(format!(
                        "step {} covers positions {:?} in the reference and {:?} here",
                        step.step,
                        Short(&r.positions),
                        Short(&step.positions)
                    ));
                }
            } else if r.tokens != step.tokens && !r.tokens.is_empty() && !self.diverged {
                self.diverged = true;
                self.late_notes.push(format!(
                    "generation diverged at step {}: the reference decoded token(s) {:?}, this run \
                     {:?}; from this step on the inputs differ, so later numbers compare different \
                     computations (with sampling: use --temp 0 or the same fixed --seed for both \
                     runs; with greedy decoding the difference itself changed the token: compare \
                     the steps before {}, i.e. a smaller -n)",
                    step.step,
                    Short(&r.tokens),
                    Short(&step.tokens),
                    step.step
                ));
            }
        }
        self.cur_steps
            .entry(step.step)
            .or_insert(self.current_steps.len());
        self.current_steps.push(step);
    }

    /// Notes found while comparing, the position notes past the first few counted.
    pub fn late_notes(&self) -> Vec<String> {
        let mut n = self.late_notes.clone();
        if self.position_notes > POSITION_NOTES {
            n.push(format!(
                "... and {} more steps cover other positions than in the reference",
                self.position_notes - POSITION_NOTES
            ));
        }
        n
    }

    pub fn wants_layer(&self, layer: i32) -> bool {
        self.layer.is_none_or(|l| l == layer)
    }

    /// Why a tensor of this role and layer on this side cannot be compared (basis or
    /// layout).
    fn not_comparable(&self, role: Role, layer: i32, current_side: bool) -> Option<String> {
        let k = &self.check;
        let rot_v_here = if current_side {
            k.cur_rot_v.at(layer)
        } else {
            k.ref_rot_v.at(layer)
        };
        if k.rot_k_differs(layer) && matches!(role, Role::Q | Role::K) {
            return Some(format!(
                "rotated basis (Q/K rotated in the {} only)",
                side_name(k.cur_rot_k.at(layer))
            ));
        }
        if k.rot_v_differs(layer) {
            if matches!(role, Role::V | Role::Attn) {
                return Some(format!(
                    "rotated basis (V rotated in the {} only)",
                    side_name(k.cur_rot_v.at(layer))
                ));
            }
            if role == Role::KqvOut && rot_v_here {
                return Some("rotated basis: its kqv_out_unrotated is compared instead".into());
            }
        }
        if k.mixed_differs()
            && matches!(
                role,
                Role::K | Role::V | Role::KQuant | Role::VQuant | Role::Mask
            )
        {
            return Some(format!(
                "different KV cache layout (mixed KV cache in the {} only)",
                side_name(k.mixed.1)
            ));
        }
        if k.fa_differs() {
            if matches!(role, Role::Attn | Role::V) {
                return Some("layout differs between flash attention on and off".into());
            }
            if matches!(role, Role::Kq | Role::KqSoftMax) {
                return Some("traced only without flash attention".into());
            }
        }
        None
    }

    /// The reference role a current tensor of `role` (in `layer`) is compared with.
    fn counterpart(&self, role: Role, layer: i32) -> Role {
        if self.check.rot_v_differs(layer) {
            match role {
                Role::KqvOut if self.check.ref_rot_v.at(layer) => return Role::KqvOutUnrotated,
                Role::KqvOutUnrotated if self.check.cur_rot_v.at(layer) => return Role::KqvOut,
                _ => {}
            }
        }
        role
    }

    /// Compare one current tensor (its bytes in logical order, in its own type).
    pub fn compare(&mut self, meta: &TensorMeta, name: &str, data: &[u8]) {
        if !self.wants_layer(meta.layer) {
            self.current_other_layer += 1;
            return;
        }
        let unpaired = |reason| Unpaired {
            side: "current",
            name: name.to_owned(),
            role: meta.role,
            layer: meta.layer,
            step: meta.step,
            reason,
        };
        if let Some(why) = self.not_comparable(meta.role, meta.layer, true) {
            self.current_unpaired.push(unpaired(Some(why)));
            return;
        }
        let ref_role = self.counterpart(meta.role, meta.layer);
        let Some(&ri) = self.index.get(&(ref_role, meta.layer, meta.step)) else {
            self.current_unpaired.push(unpaired(None));
            return;
        };
        self.used[ri] = true;
        let rt = &self.reference.tensors[ri];
        let mut c = Comparison {
            role: meta.role,
            layer: meta.layer,
            step: meta.step,
            reference_role: ref_role,
            reference_name: rt.name.clone(),
            current_name: name.to_owned(),
            reference_type: rt.meta.layout.ty,
            current_type: meta.layout.ty,
            reference_shape: rt.meta.layout.ne,
            current_shape: meta.layout.ne,
            metrics: None,
            error: None,
            worst_abs_at: None,
            worst_rel_at: None,
            noise: None,
        };
        if c.shape_match() {
            let n = meta.layout.n_elements();
            match diff_bytes(
                meta.layout.ty,
                data,
                rt.meta.layout.ty,
                &le_data(self.reference, rt),
                n,
                self.tolerance,
                self.threads,
            ) {
                Ok(m) => {
                    let step = self
                        .cur_steps
                        .get(&meta.step)
                        .map(|&i| &self.current_steps[i]);
                    let at = |w: Option<tensor_stats::Worst>| {
                        w.map(|w| locate(meta, &self.current_run, step, w.index))
                    };
                    c.worst_abs_at = at(m.worst_abs);
                    c.worst_rel_at = at(m.worst_rel);
                    c.metrics = Some(m);
                }
                Err(e) => c.error = Some(e),
            }
        }
        self.comparisons.push(c);
    }

    /// Reference tensors of a layer `--layer` leaves out.
    pub fn reference_other_layer(&self) -> usize {
        self.reference
            .tensors
            .iter()
            .filter(|t| !self.wants_layer(t.meta.layer))
            .count()
    }

    /// Reference tensors (in the compared layers) that were not compared: (unmatched,
    /// not comparable).
    pub fn reference_unpaired(&self) -> Vec<Unpaired> {
        self.reference
            .tensors
            .iter()
            .enumerate()
            .filter(|(i, t)| !self.used[*i] && self.wants_layer(t.meta.layer))
            .map(|(_, t)| Unpaired {
                side: "reference",
                name: t.name.clone(),
                role: t.meta.role,
                layer: t.meta.layer,
                step: t.meta.step,
                reason: self.not_comparable(t.meta.role, t.meta.layer, false),
            })
            .collect()
    }

    /// Attach run-to-run differences: `noise` compares two runs of one configuration,
    /// the reference's (`of_reference`, keyed by the reference role) or the current one.
    pub fn attach_noise(&mut self, noise: &[Comparison], of_reference: bool) {
        let by_key: HashMap<(Role, i32, u32), &Comparison> = noise
            .iter()
            .map(|c| ((c.role, c.layer, c.step), c))
            .collect();
        for c in &mut self.comparisons {
            let role = if of_reference {
                c.reference_role
            } else {
                c.role
            };
            c.noise = by_key
                .get(&(role, c.layer, c.step))
                .and_then(|n| n.metrics.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tensor_stats::ToleranceMode;

    /// `n` values per side as little-endian bytes starting at `skew` bytes past a 4-byte
    /// boundary, with zeros, tiny references, NaN and infinities among them.
    fn sides(n: usize, seed: u64, skew: usize) -> (Vec<u8>, Vec<u8>, usize) {
        let mut s = seed | 1;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let (mut c, mut r) = (Vec::new(), Vec::new());
        for i in 0..n {
            let x = next();
            let v = ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
            let rv = match x % 101 {
                0 => 0.0,
                1 => 1e-13,
                2 if i % 3 == 0 => f32::NEG_INFINITY,
                _ => v,
            };
            let cv = match x % 103 {
                0 => f32::NAN,
                1 => rv,
                2 => f32::INFINITY,
                _ if rv.is_infinite() && i % 2 == 0 => rv,
                _ => rv + 1e-3 * (((x >> 8) & 0xffff) as f32 / 65536.0 - 0.5),
            };
            c.push(cv);
            r.push(rv);
        }
        let bytes = |v: &[f32]| {
            let mut b = vec![0u8; v.len() * 4 + 8];
            let at = b.as_ptr().align_offset(4) + skew;
            for (o, x) in b[at..].chunks_exact_mut(4).zip(v) {
                o.copy_from_slice(&x.to_le_bytes());
            }
            (b, at)
        };
        let ((cb, at), (rb, at2)) = (bytes(&c), bytes(&r));
        assert_eq!(at, at2);
        (cb, rb, at)
    }

    /// The in-place F32 path gives the dequantize-and-copy path's bits, whatever the
    /// values, tolerance, mismatch budget and threads.
    #[test]
    fn in_place_f32_matches_the_copying_path() {
        let tols = [
            Tolerance::default(),
            Tolerance {
                abs: 1e-4,
                rel: 1e-3,
                mode: ToleranceMode::Either,
                max_mismatch_pct: 2.0,
            },
            Tolerance {
                abs: 1e-4,
                rel: 1e-3,
                mode: ToleranceMode::Elementwise,
                max_mismatch_pct: 5.0,
            },
            Tolerance {
                abs: 1e-4,
                rel: 1e-3,
                mode: ToleranceMode::Mean,
                max_mismatch_pct: 0.0,
            },
        ];
        for (seed, n) in [(1u64, 1usize), (2, 4097), (3, 300_007), (4, 1 << 19)] {
            let (cb, rb, at) = sides(n, seed * 0x9e37_79b9, 0);
            let (c, r) = (&cb[at..at + 4 * n], &rb[at..at + 4 * n]);
            assert!(f32_in_place(c).is_some() && f32_in_place(r).is_some());
            for t in tols {
                for threads in [1, 2, 3] {
                    let run = |in_place| {
                        let m = diff_bytes_with(
                            GgmlType::F32,
                            c,
                            GgmlType::F32,
                            r,
                            n as u64,
                            t,
                            threads,
                            in_place,
                        )
                        .unwrap();
                        format!("{m:?}")
                    };
                    assert_eq!(run(true), run(false), "n {n} {t:?} threads {threads}");
                }
            }
            // Unaligned bytes are copied, with the same result.
            let (cu, ru, au) = sides(n, seed * 0x9e37_79b9, 1);
            let (c2, r2) = (&cu[au..au + 4 * n], &ru[au..au + 4 * n]);
            let t = Tolerance::default();
            let a = diff_bytes(GgmlType::F32, c, GgmlType::F32, r, n as u64, t, 2).unwrap();
            let b = diff_bytes(GgmlType::F32, c2, GgmlType::F32, r2, n as u64, t, 2).unwrap();
            assert_eq!(format!("{a:?}"), format!("{b:?}"));
        }
    }
}
