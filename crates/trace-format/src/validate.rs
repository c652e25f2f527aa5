//! The validation pass over a trace's metadata and tensor table, run by
//! [`TraceFile`](crate::TraceFile) when a trace is opened, before any use
//! (docs/trace-format.md, "Validation").
//!
//! A trace is a valid GGUF whose `kqv_trace.*` metadata and tensor table may still
//! contradict each other (a truncated run, a buggy writer, a file edited by hand or made
//! to attack a job that verifies traces). Each contradiction is a [`Violation`] naming
//! what disagrees. Two kinds:
//!
//! - **file level** (the trace cannot be read as a whole): a per-tensor or per-attention
//!   array whose length is not the count it describes, a value of the wrong type or one
//!   that does not fit its field (a 64-bit `n_head` of 2^32+4 is an error, never 4), an
//!   unknown format version, a tensor of more than 4 dimensions, and run flags that the
//!   tensors contradict (flash attention, cache types, rotation, mixed cache, target
//!   layer, sources traced). `TraceFile::open` fails with the first one.
//! - **group level** (one (step, layer) cannot be trusted; the others still can): a
//!   duplicate (step, layer, role) or attention record, a layer or step out of range, a
//!   zero dimension, strides that overflow or overlap, shapes that disagree with the
//!   roles' documented layouts or with each other, an unknown attention op. They are kept
//!   per group ([`TraceFile::group_problems`](crate::TraceFile::group_problems));
//!   verification reports such a group as malformed.

use std::collections::{BTreeMap, HashMap};

use gguf_io::{GgmlType, Metadata};

use crate::escape::escape;
use crate::keys;
use crate::meta::{Role, RunMeta, StepMeta, MIXED_ATTN_OP};
use crate::read::TracedTensor;
use crate::write::{AttnRecord, FORMAT_VERSION, FORMAT_VERSION_FULL};

/// The op of flash attention in `kqv_trace.attn.op`.
pub const FLASH_OP: &str = "FLASH_ATTN_EXT";
/// The op recorded without flash attention.
pub const SOFT_MAX_OP: &str = "SOFT_MAX";

/// One contradiction in a trace. Strings taken from the file are escaped when shown.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Violation {
    /// A per-tensor, per-step or per-attention array does not have one entry per item.
    #[error("{key} has {len} entries for {count} {what}")]
    ArrayLength {
        key: &'static str,
        len: usize,
        count: usize,
        what: &'static str,
    },
    /// A value of the wrong type, out of its range, or unknown (`what` is escaped).
    #[error("{key}: {what}")]
    BadValue { key: &'static str, what: String },
    #[error(
        "{} = {version}: unknown format version (this reader reads versions {FORMAT_VERSION_FULL} and {FORMAT_VERSION})",
        keys::FORMAT_VERSION
    )]
    UnknownVersion { version: u64 },
    /// Format version 2's storage keys contradict the tensor table (`tensor` is escaped).
    #[error("tensor {tensor}: {what}")]
    Stored { tensor: String, what: String },
    #[error("tensor {}: {dims} dimensions, a traced tensor has at most 4", escape(.tensor))]
    TooManyDims { tensor: String, dims: usize },
    /// A run flag the tensors contradict (`claim` and `evidence` are escaped).
    #[error("{key} = {claim}, but {evidence}")]
    RunFlag {
        key: &'static str,
        claim: String,
        evidence: String,
    },
    /// A second tensor of the same (step, layer, role).
    #[error("{} (step {step}, layer {layer}): a second {role} for this step and layer (the first is {})", escape(.tensor), escape(.first))]
    Duplicate {
        tensor: String,
        step: u32,
        layer: i32,
        role: Role,
        first: String,
    },
    /// A second `kqv_trace.attn` record for the same (step, layer) (`first` and `second`
    /// are escaped).
    #[error(
        "step {step} layer {layer}: a second kqv_trace.attn record ({second}) besides ({first})"
    )]
    DuplicateAttn {
        step: u32,
        layer: i32,
        first: String,
        second: String,
    },
    #[error("{} (step {step}, layer {layer}): layer outside 0..{n_layer} ({})", escape(.tensor), keys::RUN_N_LAYER)]
    LayerRange {
        tensor: String,
        step: u32,
        layer: i32,
        n_layer: u32,
    },
    #[error("{} (step {step}, layer {layer}): step outside the trace's {n_steps} steps ({})", escape(.tensor), keys::STEP_N_TOKENS)]
    StepRange {
        tensor: String,
        step: u32,
        layer: i32,
        n_steps: usize,
    },
    /// Strides (`nb`) inconsistent with the shape and type.
    #[error("{} (step {step}, layer {layer}, {role}): nb {nb:?} {what}", escape(.tensor))]
    Strides {
        tensor: String,
        step: u32,
        layer: i32,
        role: Role,
        nb: [u64; 4],
        what: String,
    },
    /// A shape that disagrees with its role's documented layout or with the group's
    /// other tensors.
    #[error("{} (step {step}, layer {layer}, {role}): ne {ne:?} {what}", escape(.tensor))]
    Shape {
        tensor: String,
        step: u32,
        layer: i32,
        role: Role,
        ne: [u64; 4],
        what: String,
    },
    #[error("step {step} layer {layer}: attention op {} is none of {FLASH_OP}, {SOFT_MAX_OP}, {MIXED_ATTN_OP}", escape(.op))]
    UnknownOp { step: u32, layer: i32, op: String },
}

impl Violation {
    /// The (step, layer) group a group-level violation belongs to; `None` for the
    /// file-level ones.
    pub fn group(&self) -> Option<(u32, i32)> {
        match self {
            Violation::Duplicate { step, layer, .. }
            | Violation::DuplicateAttn { step, layer, .. }
            | Violation::LayerRange { step, layer, .. }
            | Violation::StepRange { step, layer, .. }
            | Violation::Strides { step, layer, .. }
            | Violation::Shape { step, layer, .. }
            | Violation::UnknownOp { step, layer, .. } => Some((*step, *layer)),
            _ => None,
        }
    }
}

/// Group-level violations, by (step, layer).
pub type GroupProblems = BTreeMap<(u32, i32), Vec<Violation>>;

// ---- reading typed metadata ----------------------------------------------------------

/// An integer key as `T`: absent is `None`; another type, or a value `T` cannot hold, is
/// an error (never truncated).
pub(crate) fn int<T: TryFrom<i128> + std::fmt::Display>(
    m: &Metadata,
    key: &'static str,
) -> Result<Option<T>, Violation> {
    let Some(v) = m.get(key) else { return Ok(None) };
    let Some(i) = v.as_int() else {
        return Err(Violation::BadValue {
            key,
            what: format!("a {} where an integer belongs", v.value_type().name()),
        });
    };
    T::try_from(i).map(Some).map_err(|_| Violation::BadValue {
        key,
        what: format!(
            "{i} does not fit in {}",
            std::any::type_name::<T>().rsplit("::").next().unwrap_or("")
        ),
    })
}

pub(crate) fn string(m: &Metadata, key: &'static str) -> Result<String, Violation> {
    match m.get(key) {
        None => Ok(String::new()),
        Some(v) => v
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| Violation::BadValue {
                key,
                what: format!("a {} where a string belongs", v.value_type().name()),
            }),
    }
}

pub(crate) fn boolean(m: &Metadata, key: &'static str, default: bool) -> Result<bool, Violation> {
    match m.get(key) {
        None => Ok(default),
        Some(v) => v.as_bool().ok_or_else(|| Violation::BadValue {
            key,
            what: format!("a {} where a bool belongs", v.value_type().name()),
        }),
    }
}

/// A per-layer INT8 array of 1 / 0 / -1 (not traced); empty when absent.
fn layer_flags(m: &Metadata, key: &'static str) -> Result<Vec<Option<bool>>, Violation> {
    let v = match m.get(key) {
        None => return Ok(Vec::new()),
        Some(gguf_io::Value::Array(gguf_io::Array::I8(v))) => v,
        Some(_) => {
            return Err(Violation::BadValue {
                key,
                what: "not an array of int8".into(),
            })
        }
    };
    v.iter()
        .map(|&x| match x {
            1 => Ok(Some(true)),
            0 => Ok(Some(false)),
            -1 => Ok(None),
            x => Err(Violation::BadValue {
                key,
                what: format!("{x} is none of 1, 0, -1"),
            }),
        })
        .collect()
}

/// The layers a record may have: the self-attention layers, then the cross-attention
/// ones (`n_cross_layer`, encoder-decoder models).
fn n_layers(run: &RunMeta) -> u64 {
    u64::from(run.n_layer) + u64::from(run.n_cross_layer)
}

/// Whether a record of `layer` is cross-attention (layers from `n_layer` on, when the
/// trace records cross-attention).
fn is_cross(run: &RunMeta, layer: i32) -> bool {
    run.n_cross_layer > 0 && layer >= 0 && layer as u64 >= u64::from(run.n_layer)
}

/// The run's facts, every integer checked to fit its field.
pub(crate) fn run_meta(m: &Metadata) -> Result<RunMeta, Violation> {
    let u = |k| int::<u32>(m, k).map(Option::unwrap_or_default);
    Ok(RunMeta {
        description: string(m, keys::DESCRIPTION)?,
        model_path: string(m, keys::RUN_MODEL_PATH)?,
        model_sha256: string(m, keys::RUN_MODEL_SHA256)?,
        architecture: string(m, keys::RUN_ARCHITECTURE)?,
        n_layer: u(keys::RUN_N_LAYER)?,
        n_head: u(keys::RUN_N_HEAD)?,
        n_head_kv: u(keys::RUN_N_HEAD_KV)?,
        cache_type_k: string(m, keys::RUN_CACHE_TYPE_K)?,
        cache_type_v: string(m, keys::RUN_CACHE_TYPE_V)?,
        flash_attn: string(m, keys::RUN_FLASH_ATTN)?,
        kv_rotation: boolean(m, keys::RUN_KV_ROTATION, false)?,
        rotated_k_layers: layer_flags(m, keys::RUN_ROTATED_K)?,
        rotated_v_layers: layer_flags(m, keys::RUN_ROTATED_V)?,
        mixed_kv_cache: boolean(m, keys::RUN_MIXED_KV_CACHE, false)?,
        mixed_swa_type: string(m, keys::RUN_MIXED_SWA_TYPE)?,
        n_ctx: u(keys::RUN_N_CTX)?,
        n_batch: u(keys::RUN_N_BATCH)?,
        n_ubatch: u(keys::RUN_N_UBATCH)?,
        n_predict: int::<i32>(m, keys::RUN_N_PREDICT)?.unwrap_or(0),
        seed: u(keys::RUN_SEED)?,
        prompt_tokens: match m.get(keys::RUN_PROMPT_TOKENS) {
            None => Vec::new(),
            Some(gguf_io::Value::Array(gguf_io::Array::I32(v))) => v.clone(),
            Some(_) => {
                return Err(Violation::BadValue {
                    key: keys::RUN_PROMPT_TOKENS,
                    what: "not an array of int32".into(),
                })
            }
        },
        llama_version: string(m, keys::RUN_LLAMA_VERSION)?,
        target_layer: int::<i32>(m, keys::TARGET_LAYER)?.unwrap_or(-1),
        trace_sources: boolean(m, keys::TRACE_SOURCES, true)?,
        complete: boolean(m, keys::COMPLETE, true)?,
        cpu_simd: string(m, keys::RUN_CPU_SIMD)?,
        n_cross_layer: u(keys::RUN_N_CROSS_LAYER)?,
        cross_flash_attn: string(m, keys::RUN_CROSS_FLASH_ATTN)?,
        replayed_from: string(m, keys::RUN_REPLAYED_FROM)?,
        rpc_endpoints: strings(m, keys::RUN_RPC_ENDPOINTS)?,
        tensor_filter: strings(m, keys::RUN_TENSOR_FILTER)?,
        rpc_read_bytes: match m.get(keys::RUN_RPC_READ_BYTES) {
            None => Vec::new(),
            Some(gguf_io::Value::Array(gguf_io::Array::U64(v))) => v.clone(),
            Some(_) => {
                return Err(Violation::BadValue {
                    key: keys::RUN_RPC_READ_BYTES,
                    what: "not an array of UINT64".into(),
                })
            }
        },
    })
}

/// An optional ARRAY[STRING] key (absent: empty).
fn strings(m: &Metadata, key: &'static str) -> Result<Vec<String>, Violation> {
    match m.get(key) {
        None => Ok(Vec::new()),
        Some(gguf_io::Value::Array(gguf_io::Array::String(v))) => Ok(v.clone()),
        Some(_) => Err(Violation::BadValue {
            key,
            what: "not an array of strings".into(),
        }),
    }
}

// ---- file level ----------------------------------------------------------------------

/// The keys that only say something about a file written in this format; the version
/// (1: every tensor whole, 2: the storage keys say how each is stored).
pub(crate) fn check_version(m: &Metadata) -> Result<u32, Violation> {
    match int::<u64>(m, keys::FORMAT_VERSION)? {
        Some(v) if v == u64::from(FORMAT_VERSION) || v == u64::from(FORMAT_VERSION_FULL) => {
            Ok(v as u32)
        }
        Some(v) => Err(Violation::UnknownVersion { version: v }),
        None => Err(Violation::BadValue {
            key: keys::FORMAT_VERSION,
            what: "missing, while kqv_trace.tensor.role is present".into(),
        }),
    }
}

fn describe(t: &TracedTensor) -> String {
    format!(
        "tensor {} (step {}, layer {}) is a {} {}",
        escape(&t.name),
        t.meta.step,
        t.meta.layer,
        t.meta.ty().name(),
        t.meta.role
    )
}

fn flag(key: &'static str, claim: impl std::fmt::Display, evidence: String) -> Violation {
    Violation::RunFlag {
        key,
        claim: escape(&claim.to_string()).into_owned(),
        evidence,
    }
}

/// Run flags against what the tensors and attention records show.
/// Per-layer rotation as recorded (`kqv_trace.run.rotated_k` / `rotated_v`): one entry
/// per layer, `kv_rotation` true exactly when some layer is rotated, a layer whose V is
/// rotated has `kqv_out_unrotated` beside each `kqv_out` and only such a layer has it,
/// and no layer of a traced tensor is recorded as not traced.
fn check_recorded_rotation(run: &RunMeta, tensors: &[TracedTensor]) -> Result<(), Violation> {
    for (key, v) in [
        (keys::RUN_ROTATED_K, &run.rotated_k_layers),
        (keys::RUN_ROTATED_V, &run.rotated_v_layers),
    ] {
        if run.n_layer > 0 && v.len() != run.n_layer as usize {
            return Err(Violation::BadValue {
                key,
                what: format!(
                    "{} entries for {} layers ({})",
                    v.len(),
                    run.n_layer,
                    keys::RUN_N_LAYER
                ),
            });
        }
    }
    let any = run.rotated_k() || run.rotated_v();
    if run.kv_rotation != any {
        return Err(flag(
            keys::RUN_KV_ROTATION,
            run.kv_rotation,
            format!(
                "{} / {} record {} layer as rotated",
                keys::RUN_ROTATED_K,
                keys::RUN_ROTATED_V,
                if any { "a" } else { "no" }
            ),
        ));
    }
    let entry = |v: &[Option<bool>], layer: i32| {
        usize::try_from(layer).ok().and_then(|l| v.get(l).copied())
    };
    let unrotated: std::collections::HashSet<(u32, i32)> = tensors
        .iter()
        .filter(|t| t.meta.role == Role::KqvOutUnrotated)
        .map(|t| (t.meta.step, t.meta.layer))
        .collect();
    for t in tensors {
        let layer = t.meta.layer;
        let (k, v) = (
            entry(&run.rotated_k_layers, layer),
            entry(&run.rotated_v_layers, layer),
        );
        if k == Some(None) || v == Some(None) {
            return Err(flag(
                if k == Some(None) {
                    keys::RUN_ROTATED_K
                } else {
                    keys::RUN_ROTATED_V
                },
                format!("-1 (not traced) for layer {layer}"),
                describe(t),
            ));
        }
        let rot_v = v.flatten() == Some(true);
        match t.meta.role {
            Role::KqvOutUnrotated if !rot_v => {
                return Err(flag(
                    keys::RUN_ROTATED_V,
                    format!("V not rotated in layer {layer}"),
                    format!("{} (only a rotated V has one)", describe(t)),
                ));
            }
            Role::KqvOut if rot_v && !unrotated.contains(&(t.meta.step, layer)) => {
                return Err(flag(
                    keys::RUN_ROTATED_V,
                    format!("V rotated in layer {layer}"),
                    format!(
                        "{} has no kqv_out_unrotated beside it (a rotated V traces one)",
                        describe(t)
                    ),
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

pub(crate) fn check_run_flags(
    m: &Metadata,
    run: &RunMeta,
    steps: &[StepMeta],
    n_tensors: usize,
    tensors: &[TracedTensor],
    attn: &[AttnRecord],
) -> Result<(), Violation> {
    // Cross-attention records (encoder-decoder models) are checked against their own
    // flag, `cross_flash_attn`, below; `flash_attn` describes the others.
    let first_role = |roles: &[Role]| {
        tensors
            .iter()
            .find(|t| roles.contains(&t.meta.role) && !is_cross(run, t.meta.layer))
    };
    let first_op = |op: &str| attn.iter().find(|a| a.op == op && !is_cross(run, a.layer));
    let rec = |a: &AttnRecord| {
        format!(
            "the attention record of step {} layer {} is {}",
            a.step,
            a.layer,
            escape(&a.op)
        )
    };

    if let Some(n) = int::<i64>(m, keys::TENSOR_COUNT)? {
        if n != n_tensors as i64 {
            return Err(flag(
                keys::TENSOR_COUNT,
                n,
                format!("the file holds {n_tensors} tensors"),
            ));
        }
    }
    if let (Some(n), true) = (
        int::<i64>(m, keys::TOTAL_STEPS)?,
        m.contains(keys::STEP_N_TOKENS),
    ) {
        if n != steps.len() as i64 {
            return Err(flag(
                keys::TOTAL_STEPS,
                n,
                format!("{} lists {} steps", keys::STEP_N_TOKENS, steps.len()),
            ));
        }
    }

    // Flash attention.
    let fa = run.flash_attn.as_str();
    if m.contains(keys::RUN_FLASH_ATTN) {
        let soft_max = first_op(SOFT_MAX_OP);
        let flash = first_op(FLASH_OP);
        let non_flash_tensor = first_role(&[Role::Kq, Role::KqSoftMax, Role::KqBias]);
        let evidence = match fa {
            "on" => soft_max.map(rec).or_else(|| non_flash_tensor.map(describe)),
            "off" => flash.map(rec).or_else(|| {
                tensors
                    .iter()
                    .find(|t| t.meta.op == FLASH_OP && !is_cross(run, t.meta.layer))
                    .map(|t| format!("{} made by {FLASH_OP}", describe(t)))
            }),
            // Not recorded (a writer that left it empty).
            "" => None,
            "auto" => flash
                .or(soft_max)
                .map(|a| format!("{} (auto means no attention op was seen)", rec(a))),
            other => {
                return Err(Violation::BadValue {
                    key: keys::RUN_FLASH_ATTN,
                    what: format!("{:?} is none of on, off, auto", escape(other)),
                })
            }
        };
        if let Some(e) = evidence {
            return Err(flag(keys::RUN_FLASH_ATTN, fa, e));
        }
    }
    if run.n_cross_layer > 0 {
        let cfa = run.cross_flash_attn.as_str();
        let want = match cfa {
            "on" => FLASH_OP,
            "off" => SOFT_MAX_OP,
            other => {
                return Err(Violation::BadValue {
                    key: keys::RUN_CROSS_FLASH_ATTN,
                    what: format!("{:?} is neither on nor off", escape(other)),
                })
            }
        };
        let wrong = attn
            .iter()
            .find(|a| is_cross(run, a.layer) && !a.op.is_empty() && a.op != want);
        if let Some(a) = wrong {
            return Err(flag(keys::RUN_CROSS_FLASH_ATTN, cfa, rec(a)));
        }
    }

    // Cache types.
    let mixed_groups: std::collections::HashSet<(u32, i32)> = tensors
        .iter()
        .filter(|t| matches!(t.meta.role, Role::KQuant | Role::VQuant))
        .map(|t| (t.meta.step, t.meta.layer))
        .chain(
            attn.iter()
                .filter(|a| a.op == MIXED_ATTN_OP)
                .map(|a| (a.step, a.layer)),
        )
        .collect();
    // The mixed cache's sliding-window layers (an iSWA model's groups without the mixed
    // node) may have a cache type of their own (`--mixed-swa-type`).
    let swa_type = if run.mixed_swa_type.is_empty() {
        None
    } else {
        let Some(ty) = GgmlType::from_name(&run.mixed_swa_type) else {
            return Err(Violation::BadValue {
                key: keys::RUN_MIXED_SWA_TYPE,
                what: format!("{:?} is not a ggml type", escape(&run.mixed_swa_type)),
            });
        };
        if !run.mixed_kv_cache {
            return Err(flag(
                keys::RUN_MIXED_SWA_TYPE,
                &run.mixed_swa_type,
                format!(
                    "the window layers' type of a mixed KV cache, and {} is false",
                    keys::RUN_MIXED_KV_CACHE
                ),
            ));
        }
        Some(ty)
    };
    for (key, name, plain, cold) in [
        (
            keys::RUN_CACHE_TYPE_K,
            &run.cache_type_k,
            Role::K,
            Role::KQuant,
        ),
        (
            keys::RUN_CACHE_TYPE_V,
            &run.cache_type_v,
            Role::V,
            Role::VQuant,
        ),
    ] {
        if name.is_empty() {
            continue;
        }
        let Some(ty) = GgmlType::from_name(name) else {
            return Err(Violation::BadValue {
                key,
                what: format!("{:?} is not a ggml type", escape(name)),
            });
        };
        // With flash attention llama.cpp casts an F32 cache to F16 before the op.
        let fits = |t: GgmlType| t == ty || (ty == GgmlType::F32 && t == GgmlType::F16);
        for t in tensors {
            let in_mixed = mixed_groups.contains(&(t.meta.step, t.meta.layer));
            // K and V activations (no cache: encoders, cross-attention), which llama.cpp
            // names `Kcur-<layer>` / `Vcur-<layer>` (then views, casts of them) or, V made
            // contiguous without flash attention, `v_cont-<layer>`, are in the compute
            // type, not the cache's.
            let activation = ["Kcur", "Vcur", "v_cont"]
                .iter()
                .any(|p| t.meta.ggml_name.starts_with(p));
            let wrong = if t.meta.role == plain && !in_mixed && !activation {
                match swa_type {
                    // A window layer of the mixed cache: its own type.
                    Some(swa) => {
                        !(t.meta.ty() == swa
                            || (swa == GgmlType::F32 && t.meta.ty() == GgmlType::F16))
                    }
                    None => !fits(t.meta.ty()),
                }
            } else if t.meta.role == cold {
                // The mixed cache: the cold store has the cache type (the hot one is F16).
                !fits(t.meta.ty()) && ty != GgmlType::F16
            } else {
                false
            };
            if wrong && swa_type.is_some() && t.meta.role == plain && !in_mixed {
                return Err(flag(
                    keys::RUN_MIXED_SWA_TYPE,
                    &run.mixed_swa_type,
                    describe(t),
                ));
            }
            if wrong {
                return Err(flag(key, name, describe(t)));
            }
        }
    }

    // Rotation.
    let quant = |s: &str| GgmlType::from_name(s).is_some_and(|t| t.is_quantized());
    let unrotated = first_role(&[Role::KqvOutUnrotated]);
    if run.rotation_recorded() {
        check_recorded_rotation(run, tensors)?;
    } else {
        if run.kv_rotation && !quant(&run.cache_type_k) && !quant(&run.cache_type_v) {
            return Err(flag(
                keys::RUN_KV_ROTATION,
                true,
                format!(
                    "neither cache type ({}, {}) is quantized, and only quantized caches are rotated",
                    escape(&run.cache_type_k),
                    escape(&run.cache_type_v)
                ),
            ));
        }
        if let Some(t) = unrotated {
            if !run.rotated_v() {
                return Err(flag(
                    keys::RUN_KV_ROTATION,
                    run.kv_rotation,
                    format!(
                        "{} (only a rotated, quantized V cache has one; cache_type_v {})",
                        describe(t),
                        escape(&run.cache_type_v)
                    ),
                ));
            }
        } else if run.rotated_v() {
            if let Some(t) = first_role(&[Role::KqvOut]) {
                return Err(flag(
                    keys::RUN_KV_ROTATION,
                    true,
                    format!(
                        "with a quantized V cache ({}) a rotated run traces kqv_out_unrotated, and the trace has none ({} has none beside it)",
                        escape(&run.cache_type_v),
                        escape(&t.name)
                    ),
                ));
            }
        }
    }

    // Mixed KV cache.
    let cold = first_role(&[Role::KQuant, Role::VQuant]);
    let mixed_op = first_op(MIXED_ATTN_OP);
    if !run.mixed_kv_cache {
        if let Some(e) = cold.map(describe).or_else(|| mixed_op.map(rec)) {
            return Err(flag(keys::RUN_MIXED_KV_CACHE, false, e));
        }
    } else if cold.is_none() && mixed_op.is_none() {
        if let Some(a) = attn.first() {
            return Err(flag(
                keys::RUN_MIXED_KV_CACHE,
                true,
                format!("{} and no cold store (k_quant, v_quant) is traced", rec(a)),
            ));
        }
    }

    // Target layer and sources.
    if run.target_layer < -1 {
        return Err(Violation::BadValue {
            key: keys::TARGET_LAYER,
            what: format!("{} (a layer, or -1 for all)", run.target_layer),
        });
    }
    if run.target_layer >= 0 {
        if let Some(t) = tensors.iter().find(|t| t.meta.layer != run.target_layer) {
            return Err(flag(keys::TARGET_LAYER, run.target_layer, describe(t)));
        }
        if let Some(a) = attn.iter().find(|a| a.layer != run.target_layer) {
            return Err(flag(
                keys::TARGET_LAYER,
                run.target_layer,
                format!("the trace has an attention record for layer {}", a.layer),
            ));
        }
    }
    if !run.trace_sources {
        if let Some(t) = tensors
            .iter()
            .find(|t| !matches!(t.meta.role, Role::KqvOut | Role::KqvOutUnrotated))
        {
            return Err(flag(keys::TRACE_SOURCES, false, describe(t)));
        }
        if let Some(a) = attn.first() {
            return Err(flag(keys::TRACE_SOURCES, false, rec(a)));
        }
    }
    Ok(())
}

// ---- group level ---------------------------------------------------------------------

/// Strides that cannot describe this shape and type: a quantized row that is not
/// contiguous, a span that overflows, or dimensions whose elements overlap (each
/// dimension, by increasing stride, must step past the whole extent of the ones before).
fn stride_problem(t: &TracedTensor) -> Option<String> {
    let l = &t.meta.layout;
    let Some(info) = l.ty.info() else {
        return Some(format!("with unknown type {}", l.ty));
    };
    let (bs, ts) = (u64::from(info.block_size), u64::from(info.type_size));
    if bs == 0 || l.ne[0] % bs != 0 {
        return Some(format!(
            "for ne0 = {} that is not a whole number of {} blocks",
            l.ne[0],
            l.ty.name()
        ));
    }
    if bs > 1 && l.ne[0] > 0 && l.nb[0] != ts {
        return Some(format!(
            "for {} rows that must be contiguous (nb0 = {ts})",
            l.ty.name()
        ));
    }
    if l.span_bytes().is_err() {
        return Some("span more bytes than a 64-bit size holds".into());
    }
    // Dimension 0 counts blocks of `ts` bytes.
    let count = |i: usize| if i == 0 { l.ne[0] / bs } else { l.ne[i] };
    let mut dims: Vec<usize> = (0..4).filter(|&i| count(i) > 1).collect();
    dims.sort_by_key(|&i| (l.nb[i], i));
    let mut need = ts;
    for i in dims {
        if l.nb[i] < need {
            return Some(format!(
                "overlap: dimension {i} (ne {}) steps {} bytes, less than the {need} bytes the dimensions before it span",
                l.ne[i], l.nb[i]
            ));
        }
        need = match l.nb[i].checked_mul(count(i)) {
            Some(n) => n,
            None => return Some("span more bytes than a 64-bit size holds".into()),
        };
    }
    None
}

/// What one group's tensors say, and where they disagree.
struct GroupCheck<'a> {
    step: u32,
    layer: i32,
    run: &'a RunMeta,
    by_role: HashMap<Role, &'a TracedTensor>,
    out: Vec<Violation>,
}

impl<'a> GroupCheck<'a> {
    fn get(&self, r: Role) -> Option<[u64; 4]> {
        self.by_role.get(&r).map(|t| t.meta.layout.ne)
    }

    fn bad(&mut self, r: Role, what: String) {
        if let Some(t) = self.by_role.get(&r) {
            self.out.push(Violation::Shape {
                tensor: t.name.clone(),
                step: self.step,
                layer: self.layer,
                role: r,
                ne: t.meta.layout.ne,
                what,
            });
        }
    }

    /// `want` with `None` for "any": `ne` of role `r` must match it.
    fn expect(&mut self, r: Role, want: [Option<u64>; 4], layout: &str) {
        let Some(ne) = self.get(r) else { return };
        if ne.iter().zip(want).any(|(&n, w)| w.is_some_and(|w| w != n)) {
            let shown: Vec<String> = want
                .iter()
                .map(|w| w.map_or("_".to_owned(), |w| w.to_string()))
                .collect();
            self.bad(
                r,
                format!(
                    "is not [{}] ({layout}, from the group's other tensors)",
                    shown.join(", ")
                ),
            );
        }
    }

    fn shapes(&mut self, op: Option<&str>) {
        let has = |c: &Self, r: Role| c.by_role.contains_key(&r);
        let mixed = op == Some(MIXED_ATTN_OP) || has(self, Role::KQuant) || has(self, Role::VQuant);
        // The layout family: flash attention (and the mixed node) or the kq/softmax path.
        let flash = if mixed {
            Some(true)
        } else {
            match op {
                Some(FLASH_OP) => Some(true),
                Some(SOFT_MAX_OP) => Some(false),
                _ if has(self, Role::Kq)
                    || has(self, Role::KqSoftMax)
                    || has(self, Role::KqBias) =>
                {
                    Some(false)
                }
                _ => None,
            }
        };
        let q = self.get(Role::Q);
        let (d, nt, nh, ns) = match q {
            Some([d, nt, nh, ns]) => (Some(d), Some(nt), Some(nh), Some(ns)),
            None => (None, None, None, None),
        };
        if let Some(h) = nh {
            if self.run.n_head > 0 && h != u64::from(self.run.n_head) {
                self.bad(
                    Role::Q,
                    format!(
                        "has {h} heads (ne2), {} = {}",
                        keys::RUN_N_HEAD,
                        self.run.n_head
                    ),
                );
            }
        }
        let divides = |heads: Option<u64>, by: u64| heads.is_none_or(|h| by > 0 && h % by == 0);

        // K (the hot store with the mixed cache).
        let mut n_kv = None;
        let mut nhk = None;
        if let Some([dk, cells, hk, _]) = self.get(Role::K) {
            self.expect(Role::K, [d, None, None, ns], "k is [D, n_kv, H_kv, S]");
            if !divides(nh, hk) {
                self.bad(
                    Role::K,
                    format!(
                        "has {hk} KV heads, which do not divide q's {}",
                        nh.unwrap_or(0)
                    ),
                );
            }
            if self.run.n_head_kv > 0 && hk != u64::from(self.run.n_head_kv) {
                self.bad(
                    Role::K,
                    format!(
                        "has {hk} KV heads (ne2), {} = {}",
                        keys::RUN_N_HEAD_KV,
                        self.run.n_head_kv
                    ),
                );
            }
            let _ = dk;
            n_kv = Some(cells);
            nhk = Some(hk);
        }
        let dk = self.get(Role::K).map(|k| k[0]).or(d);

        // V: [Dv, n_kv, H_v, S] with flash attention, transposed without.
        let mut dv = None;
        if let Some(v) = self.get(Role::V) {
            let (vd, cells, hv) = match flash {
                Some(false) => (v[1], v[0], v[2]),
                _ => (v[0], v[1], v[2]),
            };
            if flash.is_some() {
                let want = match flash {
                    Some(false) => [n_kv, None, None, ns],
                    _ => [None, n_kv, None, ns],
                };
                let layout = if flash == Some(false) {
                    "v is [n_kv, D_v, H_kv, S] without flash attention"
                } else {
                    "v is [D_v, n_kv, H_kv, S]"
                };
                self.expect(Role::V, want, layout);
                let _ = cells;
                dv = Some(vd);
            }
            if !divides(nh, hv) {
                self.bad(
                    Role::V,
                    format!(
                        "has {hv} KV heads, which do not divide q's {}",
                        nh.unwrap_or(0)
                    ),
                );
            }
        }

        // The mixed cache's cold stores.
        let mut n_cold = 0;
        if let Some(kq) = self.get(Role::KQuant) {
            n_cold = kq[1];
            self.expect(
                Role::KQuant,
                [dk, None, nhk, ns],
                "k_quant is [D, n_cold, H_kv, S]",
            );
        }
        if self.get(Role::VQuant).is_some() {
            let cold = self.get(Role::KQuant).map(|k| k[1]);
            self.expect(
                Role::VQuant,
                [dv, cold, None, ns],
                "v_quant is [D_v, n_cold, H_kv, S]",
            );
        }
        let cells = n_kv.map(|n| n + n_cold);

        if let Some([_, rows, m2, m3]) = self.get(Role::Mask) {
            self.expect(
                Role::Mask,
                [cells, None, None, None],
                "the mask covers the cells: [n_kv, >= T, _, _]",
            );
            if nt.is_some_and(|t| rows < t) {
                self.bad(
                    Role::Mask,
                    format!("has {rows} rows for {} tokens", nt.unwrap_or(0)),
                );
            }
            if !divides(nh, m2) || !divides(ns, m3) {
                self.bad(
                    Role::Mask,
                    "ne2 and ne3 must divide q's heads and sequences".into(),
                );
            }
        }
        if let Some(s) = self.get(Role::Sinks) {
            if nh.is_some_and(|h| s.iter().product::<u64>() != h) {
                self.bad(
                    Role::Sinks,
                    format!("is not one value per q head ({})", nh.unwrap_or(0)),
                );
            }
        }

        // Outputs and intermediates.
        let mut hd = dv.zip(nh).and_then(|(a, b)| a.checked_mul(b));
        // Absorbed MLA: kqv_out is W · attn, W (v_mla) [D_v (latent), D_v_out, H].
        if let Some(w) = self.get(Role::VMla) {
            self.expect(
                Role::VMla,
                [dv, None, nh, Some(1)],
                "v_mla is [D_v, D_v_out, H, 1]",
            );
            hd = nh.and_then(|h| w[1].checked_mul(h));
        }
        self.expect(
            Role::KqvOut,
            [hd, nt, None, None],
            "kqv_out is [D_v*H, T, 1, 1]",
        );
        if let (Some(o), Some(t), Some(s)) = (self.get(Role::KqvOut), nt, ns) {
            if o[2].checked_mul(o[3]) != Some(s) || (o[1] != t && hd.is_some()) {
                self.bad(Role::KqvOut, format!("is not [D_v*H, {t}, {s}, 1]"));
            }
        } else if let (Some(o), None) = (self.get(Role::KqvOut), q) {
            let h = u64::from(self.run.n_head);
            if h > 0 && o[0] % h != 0 {
                self.bad(
                    Role::KqvOut,
                    format!("ne0 is not a multiple of {} = {h}", keys::RUN_N_HEAD),
                );
            }
        }
        if let Some(o) = self.get(Role::KqvOut) {
            let want = o.map(Some);
            self.expect(
                Role::KqvOutUnrotated,
                want,
                "kqv_out_unrotated has kqv_out's shape",
            );
        }
        match flash {
            Some(true) => self.expect(
                Role::Attn,
                [dv, nh, nt, ns],
                "attn is [D_v, H, T, S] with flash attention",
            ),
            Some(false) => self.expect(
                Role::Attn,
                [dv, nt, nh, ns],
                "attn (kqv) is [D_v, T, H, S] without flash attention",
            ),
            None => {}
        }
        for r in [Role::Kq, Role::KqSoftMax] {
            self.expect(
                r,
                [n_kv, nt, nh, ns],
                "kq and kq_soft_max are [n_kv, T, H, S]",
            );
        }
        // An additive score bias broadcasts onto kq as ggml's ADD does: each of its
        // dimensions divides kq's.
        if let Some(b) = self.get(Role::KqBias) {
            let kq = [n_kv, nt, nh, ns];
            let fits = (0..4).all(|i| divides(kq[i], b[i]));
            if !fits {
                self.bad(
                    Role::KqBias,
                    "kq_bias does not broadcast onto kq [n_kv, T, H, S]".into(),
                );
            }
        }
    }
}

/// Group-level checks over all tensors and attention records.
pub(crate) fn check_groups(
    run: &RunMeta,
    steps: Option<usize>,
    tensors: &[TracedTensor],
    attn: &[AttnRecord],
) -> GroupProblems {
    let mut problems = GroupProblems::new();
    let mut groups: BTreeMap<(u32, i32), Vec<&TracedTensor>> = BTreeMap::new();
    for t in tensors {
        groups
            .entry((t.meta.step, t.meta.layer))
            .or_default()
            .push(t);
    }
    let mut records: HashMap<(u32, i32), Vec<&AttnRecord>> = HashMap::new();
    for a in attn {
        records.entry((a.step, a.layer)).or_default().push(a);
    }
    let show = |a: &AttnRecord| {
        format!(
            "op {}, scale {}, max_bias {}, softcap {}",
            escape(&a.op),
            a.params.scale,
            a.params.max_bias,
            a.params.softcap
        )
    };
    for (&(step, layer), members) in &groups {
        let mut c = GroupCheck {
            step,
            layer,
            run,
            by_role: HashMap::new(),
            out: Vec::new(),
        };
        let mut zero = false;
        for &t in members {
            let m = &t.meta;
            if layer < 0 || (run.n_layer > 0 && layer as u64 >= n_layers(run)) {
                c.out.push(Violation::LayerRange {
                    tensor: t.name.clone(),
                    step,
                    layer,
                    n_layer: n_layers(run) as u32,
                });
            }
            if let Some(n) = steps.filter(|&n| step as usize >= n) {
                c.out.push(Violation::StepRange {
                    tensor: t.name.clone(),
                    step,
                    layer,
                    n_steps: n,
                });
            }
            // Only the cold stores' cell count may be zero (an empty cold store).
            let zero_ok = |i: usize| i == 1 && matches!(m.role, Role::KQuant | Role::VQuant);
            if let Some(i) = (0..4).find(|&i| m.layout.ne[i] == 0 && !zero_ok(i)) {
                zero = true;
                c.out.push(Violation::Shape {
                    tensor: t.name.clone(),
                    step,
                    layer,
                    role: m.role,
                    ne: m.layout.ne,
                    what: format!("has a zero dimension (ne{i}): a {} holds no data", m.role),
                });
            }
            if let Some(what) = stride_problem(t) {
                c.out.push(Violation::Strides {
                    tensor: t.name.clone(),
                    step,
                    layer,
                    role: m.role,
                    nb: m.layout.nb,
                    what,
                });
            }
            if let Some(first) = c.by_role.get(&m.role) {
                c.out.push(Violation::Duplicate {
                    tensor: t.name.clone(),
                    step,
                    layer,
                    role: m.role,
                    first: first.name.clone(),
                });
            } else {
                c.by_role.insert(m.role, t);
            }
        }
        let recs = records.get(&(step, layer)).map_or(&[][..], Vec::as_slice);
        if let [first, rest @ ..] = recs {
            for a in rest {
                c.out.push(Violation::DuplicateAttn {
                    step,
                    layer,
                    first: show(first),
                    second: show(a),
                });
            }
            if ![FLASH_OP, SOFT_MAX_OP, MIXED_ATTN_OP].contains(&first.op.as_str()) {
                c.out.push(Violation::UnknownOp {
                    step,
                    layer,
                    op: first.op.clone(),
                });
            }
        }
        if !zero {
            c.shapes(recs.first().map(|a| a.op.as_str()));
        }
        if !c.out.is_empty() {
            problems.insert((step, layer), c.out);
        }
    }
    problems
}

/// Attention records whose layer or step is out of range (file level: they belong to no
/// group of tensors necessarily).
pub(crate) fn check_attn_ranges(
    run: &RunMeta,
    steps: Option<usize>,
    attn: &[AttnRecord],
) -> Result<(), Violation> {
    for a in attn {
        if a.layer < 0 || (run.n_layer > 0 && a.layer as u64 >= n_layers(run)) {
            return Err(Violation::BadValue {
                key: keys::ATTN_LAYER,
                what: format!(
                    "layer {} (step {}) outside 0..{} ({})",
                    a.layer,
                    a.step,
                    n_layers(run),
                    keys::RUN_N_LAYER
                ),
            });
        }
        if let Some(n) = steps.filter(|&n| a.step as usize >= n) {
            return Err(Violation::BadValue {
                key: keys::ATTN_STEP,
                what: format!(
                    "step {} (layer {}) outside the trace's {n} steps",
                    a.step, a.layer
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::arrays::{i32s, set_array, u32s, u64s};
    use crate::synth::{self, Shapes};
    use crate::{TraceError, TraceFile};
    use gguf_io::{Array, GgufFile, HeaderSpec};

    /// 2 steps x 2 layers, zeros (validation reads no values); stored full (version 1),
    /// as the tests rewrite shapes in the GGUF tensor table.
    fn honest(s: Shapes) -> Vec<u8> {
        let groups = (0..2u32).flat_map(|step| {
            (0..2i32).map(move |layer| synth::Group {
                step,
                layer,
                tensors: s
                    .roles()
                    .into_iter()
                    .map(|(r, ne)| (r, ne, vec![0.0; ne.iter().product::<u64>() as usize]))
                    .collect(),
                op: s.op().into(),
                params: crate::AttnParams {
                    scale: 0.5,
                    ..Default::default()
                },
            })
        });
        synth::write_with(
            crate::KvStorage::Full,
            &synth::run_meta(&s, 2),
            &synth::steps(2, s.n_tokens as u32),
            groups,
        )
        .unwrap()
    }

    fn open(bytes: Vec<u8>) -> Result<TraceFile, TraceError> {
        TraceFile::from_gguf(GgufFile::from_bytes(bytes).unwrap())
    }

    fn edit(s: Shapes, f: impl FnOnce(&mut HeaderSpec, &mut Vec<Vec<u8>>)) -> Vec<u8> {
        synth::rewrite(&honest(s), f).unwrap()
    }

    /// The index of the tensor of (role, step, layer) in the honest trace.
    fn at(s: Shapes, role: Role, step: u32, layer: i32) -> usize {
        open(honest(s))
            .unwrap()
            .find(role, layer, step)
            .unwrap()
            .index
    }

    fn f32s(a: &Array) -> Option<&Vec<f32>> {
        match a {
            Array::F32(v) => Some(v),
            _ => None,
        }
    }
    fn strs(a: &Array) -> Option<&Vec<String>> {
        match a {
            Array::String(v) => Some(v),
            _ => None,
        }
    }

    fn invalid(bytes: Vec<u8>) -> Violation {
        match open(bytes) {
            Err(TraceError::Invalid(v)) => v,
            Err(e) => panic!("another error: {e}"),
            Ok(_) => panic!("accepted"),
        }
    }

    /// The trace opens; its only problems are in `group`, and one matches `want`.
    fn group_problem(bytes: Vec<u8>, group: (u32, i32), want: impl Fn(&Violation) -> bool) {
        let t = open(bytes).unwrap();
        let p = t.group_problems(group.0, group.1);
        assert!(p.iter().any(want), "{p:#?}");
        for v in p {
            assert_eq!(v.group(), Some(group));
            assert!(!v.to_string().contains('\n'), "{v}");
        }
    }

    #[test]
    fn honest_traces_have_no_problems() {
        for flash in [true, false] {
            let s = Shapes {
                flash,
                ..Shapes::default()
            };
            let t = open(honest(s)).unwrap();
            assert!(t.problems().is_empty(), "{:#?}", t.problems());
            assert_eq!(t.groups().len(), 4);
            assert_eq!(t.find(Role::Q, 1, 1).unwrap().meta.step, 1);
            assert_eq!(t.attn(1, 1).unwrap().op, s.op());
        }
    }

    #[test]
    fn per_tensor_arrays_must_have_one_entry_per_tensor() {
        let b = edit(Shapes::default(), |spec, _| {
            set_array(spec, keys::TENSOR_LAYER, i32s, |v| {
                v.pop();
            })
        });
        assert!(matches!(
            invalid(b),
            Violation::ArrayLength { key: keys::TENSOR_LAYER, len, count, .. } if len + 1 == count
        ));
        let b = edit(Shapes::default(), |spec, _| {
            set_array(spec, keys::TENSOR_NB, u64s, |v| v.push(4))
        });
        assert!(matches!(
            invalid(b),
            Violation::ArrayLength {
                key: keys::TENSOR_NB,
                ..
            }
        ));
        let b = edit(Shapes::default(), |spec, _| {
            set_array(spec, keys::ATTN_SCALE, f32s, |v| {
                v.pop();
            })
        });
        assert!(matches!(
            invalid(b),
            Violation::ArrayLength {
                key: keys::ATTN_SCALE,
                ..
            }
        ));
    }

    #[test]
    fn integers_that_do_not_fit_are_errors_never_truncated() {
        let b = edit(Shapes::default(), |spec, _| {
            spec.metadata.set(keys::RUN_N_HEAD, (1u64 << 32) + 4)
        });
        let v = invalid(b);
        assert!(
            matches!(&v, Violation::BadValue { key: keys::RUN_N_HEAD, what } if what.contains("4294967300 does not fit in u32")),
            "{v}"
        );
        let b = edit(Shapes::default(), |spec, _| {
            spec.metadata.set(keys::RUN_N_LAYER, "two")
        });
        assert!(matches!(
            invalid(b),
            Violation::BadValue {
                key: keys::RUN_N_LAYER,
                ..
            }
        ));
    }

    #[test]
    fn an_unknown_format_version_is_refused() {
        let b = edit(Shapes::default(), |spec, _| {
            spec.metadata.set(keys::FORMAT_VERSION, 999u32)
        });
        assert_eq!(invalid(b), Violation::UnknownVersion { version: 999 });
    }

    #[test]
    fn a_duplicate_role_is_a_finding_of_its_group() {
        // Group (1, 0)'s kqv_out relabelled step 0: (0, 0) has two.
        let s = Shapes::default();
        let i = at(s, Role::KqvOut, 1, 0);
        let b = edit(s, |spec, _| {
            set_array(spec, keys::TENSOR_STEP, u32s, |v| v[i] = 0)
        });
        group_problem(b, (0, 0), |v| {
            matches!(
                v,
                Violation::Duplicate {
                    role: Role::KqvOut,
                    ..
                }
            )
        });
        // Every tensor labelled (0, 0): one group, all duplicates reported.
        let b = edit(s, |spec, _| {
            set_array(spec, keys::TENSOR_STEP, u32s, |v| v.fill(0));
            set_array(spec, keys::TENSOR_LAYER, i32s, |v| v.fill(0));
        });
        let t = open(b).unwrap();
        assert_eq!(t.groups().len(), 1);
        let dups = t
            .group_problems(0, 0)
            .iter()
            .filter(|v| matches!(v, Violation::Duplicate { .. }))
            .count();
        assert_eq!(dups, 3 * s.roles().len());
    }

    #[test]
    fn a_second_attention_record_is_a_finding() {
        let b = edit(Shapes::default(), |spec, _| {
            set_array(spec, keys::ATTN_STEP, u32s, |v| v[1] = v[0]);
            set_array(spec, keys::ATTN_LAYER, i32s, |v| v[1] = v[0]);
            set_array(spec, keys::ATTN_SCALE, f32s, |v| v[1] = 0.25);
        });
        group_problem(
            b,
            (0, 0),
            |v| matches!(v, Violation::DuplicateAttn { second, .. } if second.contains("scale 0.25")),
        );
    }

    #[test]
    fn layers_and_steps_out_of_range_are_findings() {
        let s = Shapes::default();
        let i = at(s, Role::Q, 1, 1);
        let b = edit(s, |spec, _| {
            set_array(spec, keys::TENSOR_LAYER, i32s, |v| v[i] = 7)
        });
        group_problem(b, (1, 7), |v| {
            matches!(v, Violation::LayerRange { n_layer: 2, .. })
        });
        let b = edit(s, |spec, _| {
            set_array(spec, keys::TENSOR_STEP, u32s, |v| v[i] = 9)
        });
        group_problem(b, (9, 1), |v| {
            matches!(v, Violation::StepRange { n_steps: 2, .. })
        });
    }

    #[test]
    fn shapes_must_agree_with_the_layouts_and_each_other() {
        let s = Shapes::default();
        // kqv_out reshaped with the same bytes: [8, 2] -> [16, 1].
        let i = at(s, Role::KqvOut, 0, 1);
        let b = edit(s, |spec, _| spec.tensors[i].dims = vec![16, 1]);
        group_problem(b, (0, 1), |v| {
            matches!(
                v,
                Violation::Shape {
                    role: Role::KqvOut,
                    ..
                }
            )
        });
        // A mask that does not cover the cells.
        let i = at(s, Role::Mask, 1, 0);
        let b = edit(s, |spec, data| {
            spec.tensors[i].dims = vec![5, 2];
            data[i].truncate(5 * 2 * 4);
        });
        group_problem(
            b,
            (1, 0),
            |v| matches!(v, Violation::Shape { role: Role::Mask, what, .. } if what.contains("covers the cells")),
        );
        // n_head disagreeing with q.
        let b = edit(s, |spec, _| spec.metadata.set(keys::RUN_N_HEAD, 3u32));
        group_problem(
            b,
            (0, 0),
            |v| matches!(v, Violation::Shape { role: Role::Q, what, .. } if what.contains("n_head = 3")),
        );
        // Non-flash: kq of the wrong shape.
        let nf = Shapes { flash: false, ..s };
        let i = at(nf, Role::Kq, 1, 1);
        let b = edit(nf, |spec, _| spec.tensors[i].dims = vec![6, 4, 1, 1]);
        group_problem(b, (1, 1), |v| {
            matches!(v, Violation::Shape { role: Role::Kq, .. })
        });
    }

    #[test]
    fn a_zero_byte_k_claiming_2_pow_60_cells_is_a_finding() {
        let s = Shapes::default();
        let i = at(s, Role::K, 0, 0);
        let b = edit(s, |spec, data| {
            spec.tensors[i].dims = vec![0, 1 << 60, 1, 1];
            data[i].clear();
        });
        group_problem(
            b,
            (0, 0),
            |v| matches!(v, Violation::Shape { role: Role::K, what, .. } if what.contains("zero dimension")),
        );
    }

    #[test]
    fn strides_that_overflow_or_overlap_are_findings() {
        let s = Shapes::default();
        let i = at(s, Role::K, 1, 1);
        for (nb, word) in [
            ([4, u64::MAX, 96, 96], "64-bit"),
            ([4, 2, 96, 96], "overlap"),
        ] {
            let b = edit(s, |spec, _| {
                set_array(spec, keys::TENSOR_NB, u64s, |v| {
                    v[4 * i..4 * i + 4].copy_from_slice(&nb)
                })
            });
            group_problem(
                b,
                (1, 1),
                |v| matches!(v, Violation::Strides { role: Role::K, what, .. } if what.contains(word)),
            );
        }
    }

    #[test]
    fn an_unknown_attention_op_is_a_finding() {
        let b = edit(Shapes::default(), |spec, _| {
            set_array(spec, keys::ATTN_OP, strs, |v| v[3] = "MUL_MAT\n".into())
        });
        group_problem(b, (1, 1), |v| {
            matches!(v, Violation::UnknownOp { .. }) && v.to_string().contains("MUL_MAT\\n")
        });
    }

    /// Encoder-decoder traces: cross-attention (layers from `n_layer` on, with
    /// `n_cross_layer`) is checked against `cross_flash_attn`, the others against
    /// `flash_attn`; without `n_cross_layer` the same records contradict `flash_attn`.
    #[test]
    fn cross_attention_has_its_own_flash_flag() {
        let s = Shapes::default();
        assert!(s.flash);
        // Layer 0 ran the softmax path (T5's self-attention, refused fa for its bias),
        // layer 1 is cross-attention and ran FLASH_ATTN_EXT.
        let cross = |n_cross: u32, cfa: &'static str| {
            edit(s, move |spec, _| {
                set_array(spec, keys::ATTN_OP, strs, |v| {
                    v[0] = SOFT_MAX_OP.into();
                    v[2] = SOFT_MAX_OP.into();
                });
                spec.metadata.set(keys::RUN_FLASH_ATTN, "off");
                if n_cross > 0 {
                    spec.metadata.set(keys::RUN_N_LAYER, 1u32);
                    spec.metadata.set(keys::RUN_N_CROSS_LAYER, n_cross);
                    spec.metadata.set(keys::RUN_CROSS_FLASH_ATTN, cfa);
                }
            })
        };
        let t = open(cross(1, "on")).unwrap();
        assert_eq!(t.run.n_cross_layer, 1);
        assert_eq!(t.run.cross_flash_attn, "on");
        // The ordinary check is untouched: the FA records of layer 1 contradict "off".
        let v = invalid(cross(0, ""));
        assert!(
            matches!(&v, Violation::RunFlag { key, .. } if *key == keys::RUN_FLASH_ATTN),
            "{v}"
        );
        let v = invalid(cross(1, "off"));
        assert!(
            matches!(&v, Violation::RunFlag { key, .. } if *key == keys::RUN_CROSS_FLASH_ATTN),
            "{v}"
        );
        assert!(v.to_string().contains("step 0 layer 1"), "{v}");
        let v = invalid(cross(1, "auto"));
        assert!(
            matches!(&v, Violation::BadValue { key, .. } if *key == keys::RUN_CROSS_FLASH_ATTN),
            "{v}"
        );
    }

    #[test]
    fn run_flags_the_tensors_contradict_are_errors() {
        let s = Shapes::default();
        let flag = |key: &'static str, b: Vec<u8>| {
            let v = invalid(b);
            assert!(
                matches!(&v, Violation::RunFlag { key: k, .. } if *k == key),
                "{key}: {v}"
            );
            assert!(!v.to_string().contains('\n'));
        };
        flag(
            keys::RUN_FLASH_ATTN,
            edit(s, |spec, _| spec.metadata.set(keys::RUN_FLASH_ATTN, "off")),
        );
        let nf = Shapes { flash: false, ..s };
        flag(
            keys::RUN_FLASH_ATTN,
            edit(nf, |spec, _| spec.metadata.set(keys::RUN_FLASH_ATTN, "on")),
        );
        flag(
            keys::RUN_CACHE_TYPE_K,
            edit(s, |spec, _| {
                spec.metadata.set(keys::RUN_CACHE_TYPE_K, "q8_0")
            }),
        );
        flag(
            keys::RUN_KV_ROTATION,
            edit(s, |spec, _| spec.metadata.set(keys::RUN_KV_ROTATION, true)),
        );
        flag(
            keys::RUN_MIXED_KV_CACHE,
            edit(s, |spec, _| {
                spec.metadata.set(keys::RUN_MIXED_KV_CACHE, true)
            }),
        );
        flag(
            keys::TARGET_LAYER,
            edit(s, |spec, _| spec.metadata.set(keys::TARGET_LAYER, 1i32)),
        );
        flag(
            keys::TRACE_SOURCES,
            edit(s, |spec, _| spec.metadata.set(keys::TRACE_SOURCES, false)),
        );
        // A cold store in a run that says it had no mixed cache.
        let i = at(s, Role::Mask, 0, 0);
        flag(
            keys::RUN_MIXED_KV_CACHE,
            edit(s, |spec, _| {
                set_array(spec, keys::TENSOR_ROLE, strs, |v| v[i] = "k_quant".into())
            }),
        );
    }

    /// `mixed_swa_type`: the window layers' (non-mixed groups') K/V type of a mixed run.
    #[test]
    fn mixed_swa_type_is_the_type_of_the_groups_without_the_mixed_node() {
        let s = Shapes::default();
        // Group (step 0, layer 0) becomes a mixed one (a cold store); the others are the
        // window layers, whose K and V are F32 in this trace.
        let i = at(s, Role::Mask, 0, 0);
        let mixed = |swa: &'static str, mixed_flag: bool| {
            edit(s, move |spec, _| {
                set_array(spec, keys::TENSOR_ROLE, strs, |v| v[i] = "k_quant".into());
                spec.metadata.set(keys::RUN_MIXED_KV_CACHE, mixed_flag);
                spec.metadata.set(keys::RUN_MIXED_SWA_TYPE, swa);
            })
        };
        let t = open(mixed("f32", true)).unwrap();
        assert_eq!(t.run.mixed_swa_type, "f32");
        let v = invalid(mixed("q8_0", true));
        assert!(
            matches!(&v, Violation::RunFlag { key, .. } if *key == keys::RUN_MIXED_SWA_TYPE),
            "{v}"
        );
        assert!(v.to_string().contains("q8_0"), "{v}");
        let v = invalid(mixed("q9_9", true));
        assert!(
            matches!(&v, Violation::BadValue { key, .. } if *key == keys::RUN_MIXED_SWA_TYPE),
            "{v}"
        );
        let plain = edit(s, |spec, _| {
            spec.metadata.set(keys::RUN_MIXED_SWA_TYPE, "f16")
        });
        let v = invalid(plain);
        assert!(
            matches!(&v, Violation::RunFlag { key, .. } if *key == keys::RUN_MIXED_SWA_TYPE),
            "{v}"
        );
        assert!(v.to_string().contains("mixed_kv_cache is false"), "{v}");
    }

    #[test]
    fn file_strings_in_violations_are_escaped() {
        let s = Shapes::default();
        let i = at(s, Role::KqvOut, 1, 0);
        let b = edit(s, |spec, _| {
            spec.tensors[i].name = "evil\n\u{1b}[2Jname".into();
            set_array(spec, keys::TENSOR_STEP, u32s, |v| v[i] = 0);
        });
        let t = open(b).unwrap();
        let line = t.group_problems(0, 0)[0].to_string();
        assert!(line.contains("evil\\n\\u{1b}[2Jname"), "{line}");
        assert!(!line.contains(['\n', '\u{1b}']));
    }
}
