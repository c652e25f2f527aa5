//! The comparison engine: the reference trace (memory-mapped) indexed by (role, layer,
//! step), the run metadata checked before any tensor, and each current tensor compared
//! as it arrives, a chunk at a time, so the current side is never held whole.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};

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
    /// The reference tensor's ggml name (`kqv_out-3`, `ffn_out-1`).
    pub ggml_name: String,
    /// Role `node`: which node of that name in its step (0 = the first; ggml names repeat
    /// in a graph); 0 for attention tensors.
    pub occurrence: u32,
    /// The reference tensor's graph order (`kqv_trace.tensor.graph_order`), when recorded:
    /// with the step, the order in which [`first divergence`](crate::report) looks.
    pub graph_order: Option<u32>,
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

    /// Within the noise band: within tolerance, or, when the run-to-run difference of
    /// the same tensor was measured (`--noise-floor`, `--noise-reference`), an NMSE no
    /// larger than that difference's (a tensor that differs no more than the
    /// configuration does from itself has not diverged).
    pub fn clean(&self) -> bool {
        if self.within() {
            return true;
        }
        match (&self.metrics, &self.noise) {
            (Some(m), Some(n)) if self.shape_match() && self.error.is_none() => {
                m.nmse <= n.nmse || (m.nmse.is_nan() && n.nmse.is_nan())
            }
            _ => false,
        }
    }

    /// The key a comparison of another pair of runs is matched by (noise).
    fn key(&self, role: Role) -> (Role, i32, u32, &str, u32) {
        let name = if role == Role::Node {
            self.ggml_name.as_str()
        } else {
            ""
        };
        (role, self.layer, self.step, name, self.occurrence)
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

/// The first step whose inputs differ from the reference's step of the same number: other
/// tokens (generation diverged) or other positions (another ubatch split). From it on the
/// two runs compute different things; a step present on one side only does not differ.
#[derive(Clone, Debug, PartialEq)]
pub struct Divergence {
    pub step: u32,
    /// The step's tokens, reference and current.
    pub tokens: (Vec<i32>, Vec<i32>),
    /// The step's positions, reference and current, when they differ.
    pub positions: Option<(Vec<i32>, Vec<i32>)>,
}

impl Divergence {
    /// What differs at the step, in words: `the reference decoded token(s) [..], this run
    /// [..]`.
    pub fn what(&self) -> String {
        match &self.positions {
            Some((r, c)) => format!(
                "the reference's step covers positions {:?}, this run's {:?}",
                Short(r),
                Short(c)
            ),
            None => format!(
                "the reference decoded token(s) {:?}, this run {:?}",
                Short(&self.tokens.0),
                Short(&self.tokens.1)
            ),
        }
    }
}

/// The tensors of the steps from the divergence on, left out of the comparison (the
/// default; `--include-diverged` compares them): "not compared: inputs differ".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InputsDiffer {
    pub from_step: u32,
    /// The steps from `from_step` on that hold a tensor (either side, compared layers).
    pub steps: Vec<u32>,
    /// Tensor pairs (matched by role, layer and step) not compared.
    pub pairs: usize,
    /// Tensors of those steps with no counterpart on the other side.
    pub one_sided: usize,
}

impl InputsDiffer {
    /// Tensors of either file left out: both of each pair, and the one-sided ones.
    pub fn tensors(&self) -> usize {
        2 * self.pairs + self.one_sided
    }
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
    /// The first step whose inputs differ ([`Divergence`]).
    divergence: Option<Divergence>,
    /// Compare the steps from the divergence on anyway (`--include-diverged`).
    pub include_diverged: bool,
    /// Left out because their inputs differ: pairs, current tensors without counterpart,
    /// and the current side's steps (the reference's are read at the end).
    skipped_pairs: usize,
    skipped_current_only: usize,
    skipped_steps: BTreeSet<u32>,
    used: Vec<bool>,
    /// Reference nodes (role `node`) by (step, ggml name, occurrence), and which were
    /// compared.
    node_index: HashMap<(u32, String, u32), usize>,
    node_used: Vec<bool>,
    /// Current nodes seen per (step, ggml name): the next one's occurrence.
    node_seen: HashMap<(u32, String), u32>,
    /// The graph order of the current tensor being compared, when known.
    current_order: Option<u32>,
    /// Which nodes are compared: those `--tensor-filter` matches; None: every node of
    /// either side (a comparison of saved traces without the option) unless
    /// `compare_nodes` is off.
    pub node_filter: Option<std::sync::Arc<ggml_trace::capture::NodeFilter>>,
    /// Compare nodes when no filter is given (saved traces: yes; a live run, which
    /// traces none without the option: no).
    pub compare_nodes: bool,
    /// The reference was imported (`--map`): its shapes are compared with size-1
    /// dimensions left out, and its node names carry their occurrence (`Qcur-0#2`).
    pub imported: bool,
    /// Imported reference: current tensors of a role it maps none of (q, k, mask, ...),
    /// not compared, by role name.
    pub current_not_mapped: std::collections::BTreeMap<&'static str, usize>,
    /// Imported reference: the roles it holds, and its nodes' (name, occurrence).
    imported_roles: BTreeSet<Role>,
    imported_nodes: std::collections::HashSet<(String, u32)>,
    pub layer: Option<i32>,
    pub tolerance: Tolerance,
    pub threads: usize,
    pub check: RunCheck,
    pub current_run: RunMeta,
    pub current_steps: Vec<StepMeta>,
    pub comparisons: Vec<Comparison>,
    /// kqv_out's difference per (layer, head, position).
    pub breakdown: crate::breakdown::Breakdown,
    /// Current tensors without a counterpart, or not comparable.
    pub current_unpaired: Vec<Unpaired>,
    /// Current tensors of a layer `--layer` leaves out.
    pub current_other_layer: usize,
    /// Current tensors without a trace role (a file of another tool).
    pub current_no_role: usize,
    /// Notes found while comparing (tensors without a trace role); the divergence note is
    /// added by [`Analyzer::late_notes`].
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
            divergence: None,
            include_diverged: false,
            skipped_pairs: 0,
            skipped_current_only: 0,
            skipped_steps: BTreeSet::new(),
            used: vec![false; reference.tensors.len()],
            node_index: reference
                .nodes
                .iter()
                .zip(trace_format::read::node_occurrences(&reference.nodes))
                .enumerate()
                .map(|(i, (t, k))| ((t.meta.step, t.meta.ggml_name.clone(), k), i))
                .collect(),
            node_used: vec![false; reference.nodes.len()],
            node_seen: HashMap::new(),
            current_order: None,
            node_filter: None,
            compare_nodes: true,
            imported: false,
            current_not_mapped: Default::default(),
            imported_roles: BTreeSet::new(),
            imported_nodes: Default::default(),
            layer,
            tolerance,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            check: RunCheck::default(),
            current_run: RunMeta::default(),
            current_steps: Vec::new(),
            comparisons: Vec::new(),
            breakdown: Default::default(),
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

    /// A step of the current run, before its tensors: checks it has the inputs of the
    /// reference's step of the same number (tokens and positions). The first that does
    /// not is the divergence: by default no tensor of it or of a later step is compared.
    pub fn add_current_step(&mut self, step: StepMeta) {
        if let Some(r) = self
            .ref_steps
            .get(&step.step)
            .map(|&i| &self.reference.steps[i])
        {
            // A side that did not record tokens (or positions) says nothing about them.
            let both = |a: &[i32], b: &[i32]| !a.is_empty() && !b.is_empty() && a != b;
            let positions = both(&r.positions, &step.positions);
            let tokens = both(&r.tokens, &step.tokens);
            if (positions || tokens) && self.diverged_at().is_none_or(|d| step.step < d) {
                self.divergence = Some(Divergence {
                    step: step.step,
                    tokens: (r.tokens.clone(), step.tokens.clone()),
                    positions: positions.then(|| (r.positions.clone(), step.positions.clone())),
                });
                self.leave_out_compared();
            }
        }
        self.cur_steps
            .entry(step.step)
            .or_insert(self.current_steps.len());
        self.current_steps.push(step);
    }

    /// The first step whose inputs differ from the reference's, if any.
    pub fn diverged_at(&self) -> Option<u32> {
        self.divergence.as_ref().map(|d| d.step)
    }

    pub fn divergence(&self) -> Option<&Divergence> {
        self.divergence.as_ref()
    }

    /// The step from which tensors are left out (not with `--include-diverged`).
    fn excluded_from(&self) -> Option<u32> {
        self.diverged_at().filter(|_| !self.include_diverged)
    }

    fn inputs_differ_at(&self, step: u32) -> bool {
        self.excluded_from().is_some_and(|d| step >= d)
    }

    /// Whether `step` is compared (not left out because its inputs differ).
    pub fn compares_step(&self, step: u32) -> bool {
        !self.inputs_differ_at(step)
    }

    /// Steps arrive before their tensors (live and offline), so nothing of a later step
    /// has been compared when a divergence is found; should a step arrive late, what was
    /// already compared from the divergence on is taken back here.
    fn leave_out_compared(&mut self) {
        let Some(d) = self.excluded_from() else {
            return;
        };
        let (late, kept): (Vec<Comparison>, Vec<Comparison>) =
            std::mem::take(&mut self.comparisons)
                .into_iter()
                .partition(|c| c.step >= d);
        self.comparisons = kept;
        self.skipped_pairs += late.len();
        self.skipped_steps.extend(late.iter().map(|c| c.step));
        let (late, kept): (Vec<Unpaired>, Vec<Unpaired>) =
            std::mem::take(&mut self.current_unpaired)
                .into_iter()
                .partition(|u| u.step >= d);
        self.current_unpaired = kept;
        for u in late {
            self.leave_out(u.role, u.layer, u.step);
        }
    }

    /// A current tensor of a step whose inputs differ: counted with its counterpart as a
    /// pair (the counterpart is then not unpaired), or as one-sided.
    fn leave_out(&mut self, role: Role, layer: i32, step: u32) {
        self.skipped_steps.insert(step);
        let ref_role = self.counterpart(role, layer);
        match self.index.get(&(ref_role, layer, step)) {
            Some(&ri) => {
                self.used[ri] = true;
                self.skipped_pairs += 1;
            }
            None => self.skipped_current_only += 1,
        }
    }

    /// Notes found while comparing, and the divergence: where the inputs first differ,
    /// and what is (not) compared from there on.
    pub fn late_notes(&self) -> Vec<String> {
        let mut n = self.late_notes.clone();
        if let Some(d) = &self.divergence {
            let head = if d.positions.is_some() {
                format!("the inputs differ from step {}: {}", d.step, d.what())
            } else {
                format!("generation diverged at step {}: {}", d.step, d.what())
            };
            let tail = if self.include_diverged {
                format!(
                    "steps from {} on are compared anyway (--include-diverged), but they compare \
                     different inputs: their differences include the divergence itself",
                    d.step
                )
            } else {
                format!(
                    "steps from {} on are not compared (--include-diverged compares them anyway)",
                    d.step
                )
            };
            let how = if d.positions.is_some() {
                "to compare them, use the reference's -ub, -b and prompt"
            } else {
                "to compare them, replay the reference's tokens (the live analyzer's default), \
                 or with sampling use --temp 0 or the same fixed --seed for both runs"
            };
            n.push(format!("{head}; {tail}; {how}"));
        }
        n
    }

    /// The tensors left out because their inputs differ; None when nothing was (no
    /// divergence, or `--include-diverged`).
    pub fn inputs_differ(&self) -> Option<InputsDiffer> {
        let from_step = self.excluded_from()?;
        let mut steps = self.skipped_steps.clone();
        let mut one_sided = self.skipped_current_only;
        for (i, t) in self.reference.tensors.iter().enumerate() {
            if t.meta.step >= from_step && self.wants_layer(t.meta.layer) {
                steps.insert(t.meta.step);
                one_sided += usize::from(!self.used[i]);
            }
        }
        for (i, t) in self.reference.nodes.iter().enumerate() {
            if t.meta.step >= from_step && self.wants_node(&t.meta) {
                steps.insert(t.meta.step);
                one_sided += usize::from(!self.node_used[i]);
            }
        }
        Some(InputsDiffer {
            from_step,
            steps: steps.into_iter().collect(),
            pairs: self.skipped_pairs,
            one_sided,
        })
    }

    pub fn wants_layer(&self, layer: i32) -> bool {
        self.layer.is_none_or(|l| l == layer)
    }

    /// Whether a node (role `node`) is compared: its layer is (nodes of no layer only
    /// without `--layer`), and `--tensor-filter` matches its name (without the option:
    /// [`compare_nodes`](Self::compare_nodes)).
    pub fn wants_node(&self, meta: &TensorMeta) -> bool {
        self.wants_layer(meta.layer)
            && match &self.node_filter {
                Some(f) => f.matches(&meta.ggml_name),
                None => self.compare_nodes,
            }
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

    /// The reference is an imported one (`--map`, [`crate::import`]): its node names
    /// say their occurrence (`Qcur-0#2` is the third `Qcur-0` of its step), and shapes
    /// are compared with their size-1 dimensions left out.
    pub fn set_imported(&mut self) {
        self.imported = true;
        self.imported_roles = self.reference.tensors.iter().map(|t| t.meta.role).collect();
        self.imported_nodes = self
            .reference
            .nodes
            .iter()
            .map(|t| {
                let (name, k) = crate::import::split_occurrence(&t.meta.ggml_name);
                (name.to_owned(), k)
            })
            .collect();
        self.node_index = self
            .reference
            .nodes
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let (name, k) = crate::import::split_occurrence(&t.meta.ggml_name);
                ((t.meta.step, name.to_owned(), k), i)
            })
            .collect();
    }

    /// Compare one current tensor (its bytes in logical order, in its own type). Nodes
    /// (role `node`) are paired by (step, ggml name, occurrence): call this for them in
    /// graph order, as the capture and the file give them.
    pub fn compare(&mut self, meta: &TensorMeta, name: &str, data: &[u8]) {
        self.compare_ordered(meta, name, data, None);
    }

    /// [`compare`](Self::compare) with the current tensor's graph order, when known: the
    /// first divergence follows it where the reference records none (an imported one).
    pub fn compare_ordered(
        &mut self,
        meta: &TensorMeta,
        name: &str,
        data: &[u8],
        graph_order: Option<u32>,
    ) {
        self.current_order = graph_order;
        if meta.role == Role::Node {
            return self.compare_node(meta, name, data);
        }
        // An imported reference maps some roles (kqv_out); the others are not its.
        if self.imported && !self.imported_roles.contains(&meta.role) {
            *self.current_not_mapped.entry(meta.role.name()).or_insert(0) += 1;
            return;
        }
        if !self.wants_layer(meta.layer) {
            self.current_other_layer += 1;
            return;
        }
        if self.inputs_differ_at(meta.step) {
            self.leave_out(meta.role, meta.layer, meta.step);
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
        self.push_comparison(meta, name, data, rt, ref_role, 0);
    }

    /// A current node: paired with the reference node of the same step, ggml name and
    /// occurrence.
    fn compare_node(&mut self, meta: &TensorMeta, name: &str, data: &[u8]) {
        let seen = self
            .node_seen
            .entry((meta.step, meta.ggml_name.clone()))
            .or_insert(0);
        let occurrence = *seen;
        *seen += 1;
        if !self.wants_node(meta) {
            if !self.wants_layer(meta.layer) {
                self.current_other_layer += 1;
            }
            return;
        }
        let ri = self
            .node_index
            .get(&(meta.step, meta.ggml_name.clone(), occurrence))
            .copied();
        // An imported reference maps some nodes (and some occurrences of a name: `Qcur-0`
        // but not `Qcur-0#2`); a node it maps in no step is not its.
        if ri.is_none()
            && self.imported
            && !self
                .imported_nodes
                .contains(&(meta.ggml_name.clone(), occurrence))
        {
            *self.current_not_mapped.entry("node").or_insert(0) += 1;
            return;
        }
        if self.inputs_differ_at(meta.step) {
            self.skipped_steps.insert(meta.step);
            match ri {
                Some(ri) => {
                    self.node_used[ri] = true;
                    self.skipped_pairs += 1;
                }
                None => self.skipped_current_only += 1,
            }
            return;
        }
        let Some(ri) = ri else {
            self.current_unpaired.push(Unpaired {
                side: "current",
                name: name.to_owned(),
                role: meta.role,
                layer: meta.layer,
                step: meta.step,
                reason: None,
            });
            return;
        };
        self.node_used[ri] = true;
        let rt = &self.reference.nodes[ri];
        // A type the analyzer cannot read as numbers (IQ2_XXS, ...): not comparable, not a
        // failure (I8/I16/I32 index tensors are compared as numbers).
        if let Some(ty) = [meta.layout.ty, rt.meta.layout.ty]
            .into_iter()
            .find(|&t| !quant::can_dequantize(t))
        {
            self.current_unpaired.push(Unpaired {
                side: "current",
                name: name.to_owned(),
                role: meta.role,
                layer: meta.layer,
                step: meta.step,
                reason: Some(format!("a {} node holds no values to compare", ty.name())),
            });
            return;
        }
        self.push_comparison(meta, name, data, rt, Role::Node, occurrence);
    }

    /// Compare the pair and keep the result.
    fn push_comparison(
        &mut self,
        meta: &TensorMeta,
        name: &str,
        data: &[u8],
        rt: &TracedTensor,
        ref_role: Role,
        occurrence: u32,
    ) {
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
            ggml_name: rt.meta.ggml_name.clone(),
            occurrence,
            graph_order: rt.graph_order.or(self.current_order),
        };
        // An imported reference's shape has its size-1 dimensions left out: the same
        // values in the same order as any shape that differs from it only in those.
        if self.imported
            && crate::import::squeezed(c.reference_shape)
                == crate::import::squeezed(c.current_shape)
        {
            c.reference_shape = c.current_shape;
        }
        if c.shape_match() {
            let n = meta.layout.n_elements();
            // Read (or rebuilt from a delta) once: the metrics and the breakdown use it.
            let reference = le_data(self.reference, rt);
            match diff_bytes(
                meta.layout.ty,
                data,
                rt.meta.layout.ty,
                &reference,
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
                    // Error where it lives: kqv_out per (head, position).
                    if meta.role == Role::KqvOut
                        && meta.layout.ty == GgmlType::F32
                        && rt.meta.layout.ty == GgmlType::F32
                    {
                        if let Some(step) = step {
                            self.breakdown.add(
                                meta.layer,
                                self.current_run.n_head,
                                meta.layout.ne,
                                &step.positions,
                                data,
                                &reference,
                            );
                        }
                    }
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
            .chain(&self.reference.nodes)
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
            .filter(|(i, t)| {
                !self.used[*i]
                    && self.wants_layer(t.meta.layer)
                    && !self.inputs_differ_at(t.meta.step)
            })
            .map(|(_, t)| Unpaired {
                side: "reference",
                name: t.name.clone(),
                role: t.meta.role,
                layer: t.meta.layer,
                step: t.meta.step,
                reason: self.not_comparable(t.meta.role, t.meta.layer, false),
            })
            .chain(
                self.reference
                    .nodes
                    .iter()
                    .enumerate()
                    .filter(|(i, t)| {
                        !self.node_used[*i]
                            && self.wants_node(&t.meta)
                            && !self.inputs_differ_at(t.meta.step)
                    })
                    .map(|(_, t)| Unpaired {
                        side: "reference",
                        name: t.name.clone(),
                        role: t.meta.role,
                        layer: t.meta.layer,
                        step: t.meta.step,
                        reason: None,
                    }),
            )
            .collect()
    }

    /// Attach run-to-run differences: `noise` compares two runs of one configuration,
    /// the reference's (`of_reference`, keyed by the reference role) or the current one.
    pub fn attach_noise(&mut self, noise: &[Comparison], of_reference: bool) {
        let by_key: HashMap<(Role, i32, u32, &str, u32), &Comparison> =
            noise.iter().map(|c| (c.key(c.role), c)).collect();
        for c in &mut self.comparisons {
            let role = if of_reference {
                c.reference_role
            } else {
                c.role
            };
            let noise = by_key.get(&c.key(role)).and_then(|n| n.metrics.clone());
            c.noise = noise;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tensor_stats::ToleranceMode;
    use trace_format::{TensorLayout, TraceWriter};

    /// One step of a synthetic trace: its number, tokens, positions and the offset added to
    /// its two 8-element kqv_out (layers 0 and 1).
    struct S(u32, Vec<i32>, Vec<i32>, f32);

    /// A trace of kqv_out only, written with the project's writer and read back.
    fn trace(steps: &[S]) -> TraceFile {
        let mut w = TraceWriter::new().unwrap();
        for S(step, tokens, positions, _) in steps {
            w.add_step(StepMeta {
                step: *step,
                positions: positions.clone(),
                tokens: tokens.clone(),
            });
        }
        for S(step, _, _, by) in steps {
            for layer in 0..2 {
                let data: Vec<u8> = (0..8)
                    .flat_map(|i| (*step as f32 * 0.5 + layer as f32 + i as f32 + by).to_le_bytes())
                    .collect();
                let meta = TensorMeta {
                    role: Role::KqvOut,
                    layer,
                    step: *step,
                    ggml_name: format!("kqv_out-{layer}"),
                    op: "RESHAPE".into(),
                    layout: TensorLayout::contiguous(GgmlType::F32, [8, 1, 1, 1]).unwrap(),
                    view_of: String::new(),
                };
                w.add_tensor(meta, &data, false).unwrap();
            }
        }
        let run = RunMeta {
            architecture: "llama".into(),
            n_layer: 2,
            n_head: 2,
            n_head_kv: 2,
            target_layer: -1,
            complete: true,
            ..Default::default()
        };
        let bytes = w.finish(&run, Vec::new()).unwrap();
        TraceFile::from_gguf(gguf_io::GgufFile::from_bytes(bytes).unwrap()).unwrap()
    }

    /// Steps 0..n of one token each (token 10 + step at position step), `by` added from
    /// step `from` on.
    fn run(n: u32, other_tokens_from: u32, by: f32) -> Vec<S> {
        (0..n)
            .map(|s| {
                let other = s >= other_tokens_from;
                let token = if other { 99 } else { 10 + s as i32 };
                S(s, vec![token], vec![s as i32], if other { by } else { 0.0 })
            })
            .collect()
    }

    /// What `compare_files` does: every step, then every tensor.
    fn offline<'r>(r: &'r TraceFile, c: &TraceFile, include: bool) -> Analyzer<'r> {
        let mut a = Analyzer::new(r, None, Tolerance::default()).unwrap();
        a.include_diverged = include;
        a.set_current_run(c.run.clone(), trust::observe(c).unwrap());
        for s in &c.steps {
            a.add_current_step(s.clone());
        }
        for t in &c.tensors {
            a.compare(&t.meta, &t.name, &le_data(c, t));
        }
        a
    }

    fn steps_of(a: &Analyzer) -> Vec<u32> {
        let mut v: Vec<u32> = a.comparisons.iter().map(|c| c.step).collect();
        v.dedup();
        v
    }

    /// Tokens differ from step 3 on, and so do the values (by 100): steps 3-5 are left out,
    /// listed as not compared, and not reported as unpaired; 0-2 are compared and pass.
    /// One step of kqv_out (layers 0, 1) and graph nodes: `Qcur-0` twice (ggml names
    /// repeat), `ffn_out-1` (its values offset by `by`), an I32 index node (compared as
    /// numbers), `result_norm`, an IQ2_XXS node (no values the analyzer reads);
    /// the second `Qcur-0` offset by `by_second`.
    fn node_trace(by: f32, by_second: f32) -> TraceFile {
        let mut w = TraceWriter::new().unwrap();
        w.add_step(StepMeta {
            step: 0,
            positions: vec![0],
            tokens: vec![1],
        });
        let f32s = |base: f32| -> Vec<u8> {
            (0..8)
                .flat_map(|i| (base + i as f32).to_le_bytes())
                .collect()
        };
        let meta = |role: Role, name: &str, ty: GgmlType| TensorMeta {
            role,
            layer: if role == Role::Node {
                trace_format::node_layer(name)
            } else {
                name.rsplit('-').next().unwrap().parse().unwrap()
            },
            step: 0,
            ggml_name: name.into(),
            op: "MUL_MAT".into(),
            // (IQ2_XXS: one block of 256)
            layout: TensorLayout::contiguous(
                ty,
                [if ty == GgmlType::IQ2_XXS { 256 } else { 8 }, 1, 1, 1],
            )
            .unwrap(),
            view_of: String::new(),
        };
        let nodes: [(&str, GgmlType, Vec<u8>, u32); 7] = [
            ("Qcur-0", GgmlType::F32, f32s(1.0), 2),
            ("Qcur-0", GgmlType::F32, f32s(2.0 + by_second), 3),
            ("kqv_out-0", GgmlType::F32, f32s(0.0), 5),
            ("ffn_moe_argsort-1", GgmlType::I32, vec![7u8; 32], 8),
            ("ffn_out-1", GgmlType::F32, f32s(3.0 + by), 9),
            ("result_norm", GgmlType::F32, f32s(4.0 + by), 12),
            ("iq2_view", GgmlType::IQ2_XXS, vec![1u8; 66], 13),
        ];
        w.add_tensor_ordered(
            meta(Role::KqvOut, "kqv_out-0", GgmlType::F32),
            &f32s(0.0),
            false,
            None,
            Some(5),
        )
        .unwrap();
        w.add_tensor_ordered(
            meta(Role::KqvOut, "kqv_out-1", GgmlType::F32),
            &f32s(0.5),
            false,
            None,
            Some(7),
        )
        .unwrap();
        for (name, ty, data, order) in nodes {
            w.add_tensor_ordered(meta(Role::Node, name, ty), &data, false, None, Some(order))
                .unwrap();
        }
        let run = RunMeta {
            architecture: "llama".into(),
            n_layer: 2,
            n_head: 2,
            n_head_kv: 2,
            target_layer: -1,
            complete: true,
            ..Default::default()
        };
        let bytes = w.finish(&run, Vec::new()).unwrap();
        TraceFile::from_gguf(gguf_io::GgufFile::from_bytes(bytes).unwrap()).unwrap()
    }

    fn offline_nodes<'r>(r: &'r TraceFile, c: &TraceFile) -> Analyzer<'r> {
        let mut a = Analyzer::new(r, None, Tolerance::default()).unwrap();
        a.set_current_run(c.run.clone(), trust::observe(c).unwrap());
        for s in &c.steps {
            a.add_current_step(s.clone());
        }
        for t in c.tensors.iter().chain(&c.nodes) {
            a.compare(&t.meta, &t.name, &le_data(c, t));
        }
        a
    }

    #[test]
    fn nodes_pair_by_name_and_occurrence_and_the_first_divergence_follows_graph_order() {
        let r = node_trace(0.0, 0.0);
        // Identical: every node compared, the index node not comparable, no divergence.
        let a = offline_nodes(&r, &node_trace(0.0, 0.0));
        let nodes: Vec<&Comparison> = a
            .comparisons
            .iter()
            .filter(|c| c.role == Role::Node)
            .collect();
        assert_eq!(nodes.len(), 6);
        assert_eq!(
            nodes
                .iter()
                .map(|c| (c.ggml_name.as_str(), c.occurrence))
                .collect::<Vec<_>>(),
            [
                ("Qcur-0", 0),
                ("Qcur-0", 1),
                ("kqv_out-0", 0),
                ("ffn_moe_argsort-1", 0),
                ("ffn_out-1", 0),
                ("result_norm", 0)
            ]
        );
        assert!(a.comparisons.iter().all(Comparison::within));
        assert_eq!(a.current_unpaired.len(), 1);
        assert!(a.current_unpaired[0]
            .reason
            .as_deref()
            .unwrap()
            .contains("iq2_xxs"));
        assert!(a.reference_unpaired().is_empty());
        let o = crate::report::Outcome::new("r".into(), "c".into(), &a, None);
        assert!(o.passed());
        assert!(o.first_divergence().is_none());

        // ffn_out-1 and result_norm differ: ffn_out-1 (graph order 9) is first, after the
        // kqv_out-1 attention tensor (order 7), the index node (8) and everything before.
        let a = offline_nodes(&r, &node_trace(1.0, 0.0));
        let o = crate::report::Outcome::new("r".into(), "c".into(), &a, None);
        let d = o.first_divergence().unwrap();
        assert_eq!(
            (d.at.ggml_name.as_str(), d.at.graph_order),
            ("ffn_out-1", Some(9))
        );
        let before: Vec<(&str, Role)> = d
            .before
            .iter()
            .map(|c| (c.ggml_name.as_str(), c.role))
            .collect();
        assert_eq!(
            before,
            [
                ("Qcur-0", Role::Node),
                ("Qcur-0", Role::Node),
                ("kqv_out-0", Role::KqvOut),
                ("kqv_out-0", Role::Node),
                ("kqv_out-1", Role::KqvOut),
                ("ffn_moe_argsort-1", Role::Node),
            ]
        );
        let text = crate::report::divergence_text(&d);
        assert!(
            text[0].starts_with("First divergence: step 0, layer 1: ffn_out-1 (graph order 9)"),
            "{text:?}"
        );
        assert!(
            text[1].contains("clean before it: 6 tensor(s); just before it: ffn_moe_argsort-1 (step 0, nmse=0.00e+00), kqv_out (kqv_out-1)"),
            "{text:?}"
        );
        // The first-failure line counts no-layer nodes after the layers.
        assert_eq!(o.first_failure().map(|f| (f.0, f.1)), Some((0, 1)));

        // Only the second Qcur-0 differs: it is found as occurrence 1.
        let a = offline_nodes(&r, &node_trace(0.0, 0.5));
        let o = crate::report::Outcome::new("r".into(), "c".into(), &a, None);
        let d = o.first_divergence().unwrap();
        assert_eq!((d.at.ggml_name.as_str(), d.at.occurrence), ("Qcur-0", 1));
        assert_eq!(crate::report::tensor_label(d.at), "Qcur-0 #1");
        assert_eq!(d.before.len(), 1);

        // Measured run-to-run noise as large widens the band: no divergence then.
        let mut a = offline_nodes(&r, &node_trace(0.0, 0.5));
        let noise = a.comparisons.clone();
        a.attach_noise(&noise, false);
        let o = crate::report::Outcome::new("r".into(), "c".into(), &a, None);
        assert!(o.first_divergence().is_none());
        assert!(!o.passed(), "the tolerance verdict is unchanged");

        // A filter keeps only the nodes it names (anchored at the start).
        let mut a = Analyzer::new(&r, None, Tolerance::default()).unwrap();
        a.node_filter = Some(std::sync::Arc::new(
            ggml_trace::capture::NodeFilter::new(&["ffn_out"]).unwrap(),
        ));
        let c = node_trace(1.0, 0.0);
        a.set_current_run(c.run.clone(), trust::observe(&c).unwrap());
        for t in c.tensors.iter().chain(&c.nodes) {
            a.compare(&t.meta, &t.name, &le_data(&c, t));
        }
        let names: Vec<&str> = a
            .comparisons
            .iter()
            .filter(|c| c.role == Role::Node)
            .map(|c| c.ggml_name.as_str())
            .collect();
        assert_eq!(names, ["ffn_out-1"]);
        assert!(a.reference_unpaired().is_empty());
    }

    #[test]
    fn steps_from_a_divergence_on_are_not_compared() {
        let r = trace(&run(6, 6, 0.0));
        let c = trace(&run(6, 3, 100.0));
        let a = offline(&r, &c, false);
        assert_eq!(a.diverged_at(), Some(3));
        assert_eq!(steps_of(&a), [0, 1, 2]);
        assert!(a.comparisons.iter().all(Comparison::within));
        assert!(a.reference_unpaired().is_empty());
        assert!(a.current_unpaired.is_empty());
        assert_eq!(
            a.inputs_differ(),
            Some(InputsDiffer {
                from_step: 3,
                steps: vec![3, 4, 5],
                pairs: 6,
                one_sided: 0
            })
        );
        let notes = a.late_notes().join("\n");
        assert!(
            notes.contains(
                "generation diverged at step 3: the reference decoded token(s) [13], this run [99]"
            ),
            "{notes}"
        );
        assert!(
            notes.contains("steps from 3 on are not compared"),
            "{notes}"
        );
        assert!(notes.contains("--include-diverged"), "{notes}");
        assert!(
            notes.contains("replay the reference's tokens (the live analyzer's default)"),
            "{notes}"
        );
        assert!(!notes.contains("smaller -n"), "{notes}");

        // --include-diverged: today's behaviour, every step compared, the later ones fail.
        let a = offline(&r, &c, true);
        assert_eq!(a.diverged_at(), Some(3));
        assert_eq!(steps_of(&a), [0, 1, 2, 3, 4, 5]);
        let failing: Vec<u32> = a
            .comparisons
            .iter()
            .filter(|c| !c.within())
            .map(|c| c.step)
            .collect();
        assert_eq!(failing, [3, 3, 4, 4, 5, 5]);
        assert_eq!(a.inputs_differ(), None);
        let notes = a.late_notes().join("\n");
        assert!(
            notes.contains("compared anyway (--include-diverged)"),
            "{notes}"
        );
        assert!(notes.contains("compare different inputs"), "{notes}");
    }

    /// The live sink's order: each step, then its tensors, as they are captured. A step
    /// that arrives after tensors of its own or a later step were compared takes them back.
    #[test]
    fn live_order_and_a_late_step_leave_out_the_same() {
        let r = trace(&run(6, 6, 0.0));
        let c = trace(&run(6, 3, 100.0));
        let mut a = Analyzer::new(&r, None, Tolerance::default()).unwrap();
        a.set_current_run(c.run.clone(), trust::observe(&c).unwrap());
        for s in &c.steps {
            a.add_current_step(s.clone());
            for t in c.tensors.iter().filter(|t| t.meta.step == s.step) {
                a.compare(&t.meta, &t.name, &le_data(&c, t));
            }
        }
        let live = (steps_of(&a), a.inputs_differ(), a.reference_unpaired());
        let off = offline(&r, &c, false);
        assert_eq!(live, (steps_of(&off), off.inputs_differ(), vec![]));

        // Step 4's tensors compared before step 3 (the divergence) arrives: taken back.
        let mut a = Analyzer::new(&r, None, Tolerance::default()).unwrap();
        a.set_current_run(c.run.clone(), trust::observe(&c).unwrap());
        for t in &c.tensors {
            a.compare(&t.meta, &t.name, &le_data(&c, t));
        }
        assert_eq!(steps_of(&a), [0, 1, 2, 3, 4, 5]);
        for s in &c.steps {
            a.add_current_step(s.clone());
        }
        assert_eq!(steps_of(&a), [0, 1, 2]);
        assert_eq!(a.inputs_differ(), off.inputs_differ());
        assert!(a.reference_unpaired().is_empty());
    }

    /// Other positions (another ubatch split) are other inputs too; a step on one side
    /// only, or tokens one side did not record, are not a divergence.
    #[test]
    fn what_counts_as_a_divergence() {
        let r = trace(&run(4, 4, 0.0));
        // Step 2 at position 5: the same token, other inputs.
        let mut moved = run(4, 4, 0.0);
        moved[2].2 = vec![5];
        let a = offline(&r, &trace(&moved), false);
        assert_eq!(a.diverged_at(), Some(2));
        assert_eq!(steps_of(&a), [0, 1]);
        let notes = a.late_notes().join("\n");
        assert!(
            notes.contains("the inputs differ from step 2: the reference's step covers positions [2], this run's [5]"),
            "{notes}"
        );
        // Two more steps than the reference: unmatched, not diverged.
        let a = offline(&r, &trace(&run(6, 6, 0.0)), false);
        assert_eq!(a.diverged_at(), None);
        assert_eq!(a.inputs_differ(), None);
        assert_eq!(a.current_unpaired.len(), 4);
        // No tokens recorded on the current side: nothing to tell.
        let mut bare = run(4, 2, 0.0);
        for s in &mut bare {
            s.1.clear();
        }
        let a = offline(&r, &trace(&bare), false);
        assert_eq!(a.diverged_at(), None);
        // The first step differs: nothing compared, every pair listed.
        let a = offline(&r, &trace(&run(4, 0, 100.0)), false);
        assert!(a.comparisons.is_empty());
        assert_eq!(
            a.inputs_differ().map(|x| (x.from_step, x.pairs)),
            Some((0, 8))
        );
        // The reference has a step the current run lacks: one-sided, not unmatched.
        let longer = trace(&run(5, 5, 0.0));
        let a = offline(&longer, &trace(&run(4, 2, 1.0)), false);
        let x = a.inputs_differ().unwrap();
        assert_eq!((x.steps, x.pairs, x.one_sided), (vec![2, 3, 4], 4, 2));
        assert!(a.reference_unpaired().is_empty());
    }

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
