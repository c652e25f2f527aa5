//! The unit of verification: a [`Group`], the traced q, k, v, mask, sinks and `kqv_out`
//! of one (step, layer) with the attention op's parameters, assembled from a saved trace
//! or from live captures; the [`Fingerprint`]s of its inputs (for the stale-buffer check);
//! and [`Missing`], what a group lacks for a recomputation.

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::fmt;
use std::hash::Hasher;

use gguf_io::{quant, GgmlType};
use trace_format::meta::{AttnParams, Role, RunMeta, TensorMeta};
use trace_format::{TensorLayout, TraceFile};

use crate::VerifyError;

/// The op name of flash attention; anything else is the non-flash `kq`/softmax/`kqv` path.
pub const FLASH_OP: &str = "FLASH_ATTN_EXT";

/// The roles a verification reads.
const ROLES: [Role; 9] = [
    Role::Q,
    Role::K,
    Role::V,
    Role::Mask,
    Role::Sinks,
    Role::KqvOut,
    // the mixed KV cache's cold stores (crate::mixed)
    Role::KQuant,
    Role::VQuant,
    // an additive score bias before the softmax (T5's relative-position bias)
    Role::KqBias,
];

/// The intermediates a saved trace's group is also checked against (check/intermediate.rs;
/// absorbed MLA's weight v_mla: check/mla.rs).
const INTERMEDIATES: [Role; 4] = [Role::Attn, Role::Kq, Role::KqSoftMax, Role::VMla];

/// Identity of a tensor's stored data: type, shape and a hash of its bytes. Two steps'
/// inputs with equal fingerprints hold the same bytes (up to a 64-bit hash collision).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fingerprint {
    pub ty: GgmlType,
    pub ne: [u64; 4],
    pub hash: u64,
}

impl Fingerprint {
    pub fn of(layout: &TensorLayout, bytes: &[u8]) -> Self {
        // DefaultHasher::new() has fixed keys: the same bytes hash the same in every run.
        let mut h = DefaultHasher::new();
        h.write(bytes);
        Self {
            ty: layout.ty,
            ne: layout.ne,
            hash: h.finish(),
        }
    }
}

/// The fingerprints of one group's inputs, by role.
pub type Fingerprints = BTreeMap<Role, Fingerprint>;

/// Fingerprints of the verified inputs of (step, layer) in a trace (hashes only, no
/// dequantization).
pub fn trace_fingerprints(trace: &TraceFile, step: u32, layer: i32) -> Fingerprints {
    ROLES
        .iter()
        .filter_map(|&r| {
            let t = trace.find(r, layer, step)?;
            Some((r, Fingerprint::of(&t.meta.layout, &trace.data(t))))
        })
        .collect()
}

/// One input or output of a group.
#[derive(Clone, Debug)]
pub struct Operand {
    pub role: Role,
    /// The GGUF tensor name in a file, the ggml name in a live capture.
    pub name: String,
    /// Type, shape and the strides it had in ggml.
    pub layout: TensorLayout,
    /// The values in logical order (ne0 fastest), dequantized.
    pub values: Vec<f32>,
    pub fingerprint: Fingerprint,
}

/// Everything one (step, layer) verification reads.
#[derive(Clone, Debug)]
pub struct Group {
    pub step: u32,
    pub layer: i32,
    /// The attention op (`FLASH_ATTN_EXT` or `SOFT_MAX`) and its parameters, when recorded.
    pub op: Option<String>,
    pub params: Option<AttnParams>,
    /// Token positions of the step, in batch order (empty when unknown).
    pub positions: Vec<i32>,
    pub operands: Vec<Operand>,
    /// Where and how the op ran, when recorded: picks the kernel model of the reference.
    pub kernel: KernelFacts,
    /// Whether the step's tokens are the previous step's (`None`: unknown): a repeated Q is
    /// stale only when they differ.
    pub same_tokens_as_previous: Option<bool>,
}

/// Where and how a traced attention op ran (`kqv_trace.attn.backend`,
/// `kqv_trace.attn.n_threads`). The default is unknown.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelFacts {
    /// The backend buffer of the op's output (`CPU`, ...); empty when unknown.
    pub backend: String,
    /// The threads the step's graph was computed with; 0 when unknown.
    pub n_threads: u32,
    /// The SIMD ggml-cpu was built with (`kqv_trace.run.cpu_simd`: `avx2 fma f16c`, ...);
    /// empty when unknown.
    pub simd: String,
}

/// Inputs a group lacks for a recomputation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Missing(pub Vec<&'static str>);

impl Missing {
    /// What to do about it: which run options produce the missing inputs.
    pub fn hint(&self, run: Option<&RunMeta>) -> String {
        let model = run
            .map(|r| r.model_path.as_str())
            .filter(|m| !m.is_empty())
            .unwrap_or("MODEL");
        let retrace =
            format!("kqv-trace-monitor -m {model} <the same llama.cpp options> --save-gguf FILE");
        let sources = self.0.iter().any(|m| matches!(*m, "q" | "k" | "v"));
        if sources && run.is_some_and(|r| !r.trace_sources) {
            format!(
                "the trace holds kqv_out only (it was made with --no-trace-sources); re-trace without that option: {retrace}"
            )
        } else if self.0 == ["attention op parameters"] {
            format!(
                "the trace records no kqv_trace.attn.* op parameters for this group (not written by kqv-trace-monitor?); re-trace: {retrace}"
            )
        } else {
            format!("re-trace with the attention inputs: {retrace}")
        }
    }
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(", "))
    }
}

impl Group {
    /// The group of (step, layer) in a saved trace.
    pub fn from_trace(trace: &TraceFile, step: u32, layer: i32) -> Result<Self, VerifyError> {
        let mut operands = Vec::new();
        for role in ROLES.into_iter().chain(INTERMEDIATES) {
            if let Some(t) = trace.find(role, layer, step) {
                operands.push(Operand {
                    role,
                    name: t.name.clone(),
                    layout: t.meta.layout,
                    values: trace.f32(t)?,
                    fingerprint: Fingerprint::of(&t.meta.layout, &trace.data(t)),
                });
            }
        }
        let attn = trace.attn(step, layer);
        Ok(Self {
            step,
            layer,
            op: attn.map(|a| a.op.clone()),
            params: attn.map(|a| a.params),
            positions: trace
                .step(step)
                .map(|s| s.positions.clone())
                .unwrap_or_default(),
            operands,
            same_tokens_as_previous: step.checked_sub(1).and_then(|p| {
                let (a, b) = (trace.step(step)?, trace.step(p)?);
                Some(a.tokens == b.tokens)
            }),
            kernel: attn
                .map(|a| KernelFacts {
                    backend: a.backend.clone(),
                    n_threads: a.n_threads,
                    simd: trace.run.cpu_simd.clone(),
                })
                .unwrap_or_default(),
        })
    }

    /// The group from live captures: each tensor's description and its bytes in logical
    /// contiguous order in its own type (what the capture engine hands over). Roles that
    /// are not verified (`attn`, `kq`, ...) are skipped. An empty `op` means none recorded.
    pub fn from_tensors<'a>(
        step: u32,
        layer: i32,
        op: &str,
        params: AttnParams,
        positions: &[i32],
        tensors: impl IntoIterator<Item = (&'a TensorMeta, &'a [u8])>,
    ) -> Result<Self, VerifyError> {
        let tensors: Vec<(&TensorMeta, &[u8])> = tensors.into_iter().collect();
        // Absorbed MLA is verified on the attention op's output and v_mla (check/mla.rs).
        let mla = tensors.iter().any(|(m, _)| m.role == Role::VMla);
        let wanted = |r: Role| ROLES.contains(&r) || (mla && matches!(r, Role::Attn | Role::VMla));
        let mut operands = Vec::new();
        for (meta, bytes) in tensors {
            if !wanted(meta.role) || operands.iter().any(|o: &Operand| o.role == meta.role) {
                continue;
            }
            let n = usize::try_from(meta.layout.n_elements())
                .map_err(|_| VerifyError::Malformed(format!("{}: too large", meta.ggml_name)))?;
            let values = quant::dequantize_to_vec(meta.layout.ty, bytes, n)
                .map_err(|e| VerifyError::Malformed(format!("{}: {e}", meta.ggml_name)))?;
            operands.push(Operand {
                role: meta.role,
                name: meta.ggml_name.clone(),
                layout: meta.layout,
                values,
                fingerprint: Fingerprint::of(&meta.layout, bytes),
            });
        }
        Ok(Self {
            step,
            layer,
            op: (!op.is_empty()).then(|| op.to_owned()),
            params: (!op.is_empty()).then_some(params),
            positions: positions.to_vec(),
            operands,
            kernel: KernelFacts::default(),
            same_tokens_as_previous: None,
        })
    }

    /// Every operand's values fill its shape, and no dimension is zero (but a cold
    /// store's cell count): what the recomputation's allocations are sized from is backed
    /// by data. Checked before anything is recomputed.
    pub fn check_sizes(&self) -> Result<(), VerifyError> {
        for o in &self.operands {
            let ne = o.layout.ne;
            let zero_ok = |i: usize| i == 1 && matches!(o.role, Role::KQuant | Role::VQuant);
            if let Some(i) = (0..4).find(|&i| ne[i] == 0 && !zero_ok(i)) {
                return Err(VerifyError::Malformed(format!(
                    "{} ({}): ne {ne:?} has a zero dimension (ne{i})",
                    o.name, o.role
                )));
            }
            let n = ne.iter().try_fold(1u64, |a, &x| a.checked_mul(x));
            if n != Some(o.values.len() as u64) {
                return Err(VerifyError::Malformed(format!(
                    "{} ({}): ne {ne:?} but {} values",
                    o.name,
                    o.role,
                    o.values.len()
                )));
            }
        }
        Ok(())
    }

    pub fn get(&self, role: Role) -> Option<&Operand> {
        self.operands.iter().find(|o| o.role == role)
    }

    pub fn fingerprints(&self) -> Fingerprints {
        self.operands
            .iter()
            .map(|o| (o.role, o.fingerprint))
            .collect()
    }

    /// What the recomputation needs and the group lacks.
    pub fn missing(&self) -> Missing {
        let mut m = Vec::new();
        for role in [Role::Q, Role::K, Role::V, Role::KqvOut] {
            if self.get(role).is_none() {
                m.push(role.name());
            }
        }
        if self.params.is_none() {
            m.push("attention op parameters");
        }
        Missing(m)
    }

    pub(crate) fn flash(&self) -> bool {
        self.op.as_deref() == Some(FLASH_OP)
    }
}
