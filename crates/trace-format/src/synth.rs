//! Synthetic traces for tests and benches: the documented layouts of one (step, layer)
//! group ([`Shapes`]), a writer that turns groups into trace bytes ([`write`]) and a
//! rewriter that edits a trace's header and data the way a buggy or hostile tool would
//! ([`rewrite`]). `attn_verify::synth` fills the groups with values that verify.

use gguf_io::{GgmlType, GgufFile, GgufWriter, HeaderSpec};

use crate::layout::TensorLayout;
use crate::meta::{AttnParams, Role, RunMeta, StepMeta, TensorMeta};
use crate::write::{AttnRecord, KvStorage, TraceWriter};
use crate::TraceError;

/// The sizes of a synthetic group (all F32, one sequence).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shapes {
    pub head_dim: u64,
    pub n_tokens: u64,
    pub n_head: u64,
    pub n_head_kv: u64,
    pub n_kv: u64,
    /// Flash attention's layouts (else the kq / softmax path: V transposed, kq and
    /// kq_soft_max traced).
    pub flash: bool,
}

impl Default for Shapes {
    fn default() -> Self {
        Self {
            head_dim: 4,
            n_tokens: 2,
            n_head: 2,
            n_head_kv: 1,
            n_kv: 6,
            flash: true,
        }
    }
}

impl Shapes {
    /// Each traced role's `ne`, in capture order (docs/trace-format.md, "Layouts").
    pub fn roles(&self) -> Vec<(Role, [u64; 4])> {
        let Shapes {
            head_dim: d,
            n_tokens: t,
            n_head: h,
            n_head_kv: hk,
            n_kv,
            flash,
        } = *self;
        let mut v = vec![
            (Role::KqvOut, [d * h, t, 1, 1]),
            (Role::Attn, if flash { [d, h, t, 1] } else { [d, t, h, 1] }),
            (Role::Q, [d, t, h, 1]),
            (Role::K, [d, n_kv, hk, 1]),
        ];
        if !flash {
            v.push((Role::Kq, [n_kv, t, h, 1]));
        }
        v.push((Role::Mask, [n_kv, t, 1, 1]));
        if !flash {
            v.push((Role::KqSoftMax, [n_kv, t, h, 1]));
        }
        v.push((
            Role::V,
            if flash {
                [d, n_kv, hk, 1]
            } else {
                [n_kv, d, hk, 1]
            },
        ));
        v
    }

    pub fn op(&self) -> &'static str {
        if self.flash {
            crate::validate::FLASH_OP
        } else {
            crate::validate::SOFT_MAX_OP
        }
    }
}

/// One group's tensors (F32 values in logical order) and its attention record.
#[derive(Clone, Debug)]
pub struct Group {
    pub step: u32,
    pub layer: i32,
    pub tensors: Vec<(Role, [u64; 4], Vec<f32>)>,
    pub op: String,
    pub params: AttnParams,
}

/// The run metadata of a synthetic trace: F32 caches, `n_layer` layers.
pub fn run_meta(s: &Shapes, n_layer: u32) -> RunMeta {
    RunMeta {
        description: "synthetic trace".into(),
        architecture: "llama".into(),
        n_layer,
        n_head: s.n_head as u32,
        n_head_kv: s.n_head_kv as u32,
        cache_type_k: "f32".into(),
        cache_type_v: "f32".into(),
        flash_attn: if s.flash { "on" } else { "off" }.into(),
        target_layer: -1,
        trace_sources: true,
        complete: true,
        ..RunMeta::default()
    }
}

/// Steps of `n_tokens` tokens each, positions counting up from 0.
pub fn steps(n_steps: u32, n_tokens: u32) -> Vec<StepMeta> {
    (0..n_steps)
        .map(|s| {
            let p0 = (s * n_tokens) as i32;
            StepMeta {
                step: s,
                positions: (p0..p0 + n_tokens as i32).collect(),
                tokens: (p0..p0 + n_tokens as i32).collect(),
            }
        })
        .collect()
}

/// The trace of these groups as GGUF bytes (through [`TraceWriter`], as the monitor
/// writes it, in the default storage).
pub fn write(
    run: &RunMeta,
    steps: &[StepMeta],
    groups: impl IntoIterator<Item = Group>,
) -> Result<Vec<u8>, TraceError> {
    write_with(KvStorage::default(), run, steps, groups)
}

/// [`write`] in the storage given ([`KvStorage::Full`]: every GGUF tensor is its
/// tensor, for tests that rewrite shapes in the tensor table).
pub fn write_with(
    storage: KvStorage,
    run: &RunMeta,
    steps: &[StepMeta],
    groups: impl IntoIterator<Item = Group>,
) -> Result<Vec<u8>, TraceError> {
    let mut w = TraceWriter::with_storage(storage)?;
    for s in steps {
        w.add_step(s.clone());
    }
    for g in groups {
        w.add_attn(AttnRecord {
            step: g.step,
            layer: g.layer,
            op: g.op.clone(),
            params: g.params,
            backend: String::new(),
            n_threads: 0,
        });
        for (role, ne, values) in g.tensors {
            let meta = TensorMeta {
                role,
                layer: g.layer,
                step: g.step,
                ggml_name: format!("{}-{}", role.name(), g.layer),
                op: "NONE".into(),
                layout: TensorLayout::contiguous(GgmlType::F32, ne)?,
                view_of: String::new(),
            };
            let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
            w.add_tensor(meta, &bytes, false)?;
        }
    }
    w.finish(run, Vec::new())
}

/// Rewrite a trace: `edit` gets its header and every tensor's bytes.
pub fn rewrite(
    bytes: &[u8],
    edit: impl FnOnce(&mut HeaderSpec, &mut Vec<Vec<u8>>),
) -> Result<Vec<u8>, TraceError> {
    let file = GgufFile::from_bytes(bytes.to_vec())?;
    let mut spec = HeaderSpec::from_header(file.header());
    let mut data: Vec<Vec<u8>> = file
        .tensors()
        .iter()
        .map(|t| file.tensor_data(t).to_vec())
        .collect();
    edit(&mut spec, &mut data);
    let mut w = GgufWriter::new(Vec::new(), &spec)?;
    for d in &data {
        w.write_tensor(d)?;
    }
    Ok(w.finish()?)
}

/// Test helpers shared by the crate's tests that rewrite a trace's metadata arrays.
#[cfg(test)]
pub(crate) mod arrays {
    use gguf_io::{Array, HeaderSpec, Value};

    /// Replace the metadata array `key` (of `T`, read with `get`) by `f` of it.
    pub(crate) fn set_array<T: Clone>(
        spec: &mut HeaderSpec,
        key: &str,
        get: impl Fn(&Array) -> Option<&Vec<T>>,
        f: impl FnOnce(&mut Vec<T>),
    ) where
        Value: From<Vec<T>>,
    {
        let Some(Value::Array(a)) = spec.metadata.get(key) else {
            panic!("{key}")
        };
        let mut v = get(a).unwrap().clone();
        f(&mut v);
        spec.metadata.set(key, v);
    }

    pub(crate) fn i32s(a: &Array) -> Option<&Vec<i32>> {
        match a {
            Array::I32(v) => Some(v),
            _ => None,
        }
    }

    pub(crate) fn u32s(a: &Array) -> Option<&Vec<u32>> {
        match a {
            Array::U32(v) => Some(v),
            _ => None,
        }
    }

    pub(crate) fn u64s(a: &Array) -> Option<&Vec<u64>> {
        match a {
            Array::U64(v) => Some(v),
            _ => None,
        }
    }
}
