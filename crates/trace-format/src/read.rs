//! Reading a trace back: the GGUF plus the metadata that says what each tensor is.

use std::collections::BTreeMap;
use std::path::Path;

use gguf_io::{Array, GgufFile, Metadata, Value};

use crate::keys;
use crate::layout::TensorLayout;
use crate::meta::{AttnParams, Role, RunMeta, StepMeta, TensorMeta};
use crate::write::AttnRecord;
use crate::TraceError;

/// A traced tensor in a file: where it sits in the GGUF and what it is.
#[derive(Clone, Debug, PartialEq)]
pub struct TracedTensor {
    /// Index in the GGUF tensor table.
    pub index: usize,
    /// GGUF tensor name.
    pub name: String,
    pub meta: TensorMeta,
}

/// An opened trace.
pub struct TraceFile {
    file: GgufFile,
    pub run: RunMeta,
    pub steps: Vec<StepMeta>,
    pub tensors: Vec<TracedTensor>,
    pub attn: Vec<AttnRecord>,
    /// Names of GGUF tensors that could not be given a role (files of other tools).
    pub unknown: Vec<String>,
    /// True when the file lacks this format's per-tensor metadata and roles were
    /// inferred from the seed tools' names.
    pub from_names_only: bool,
}

fn arr<'a>(m: &'a Metadata, key: &str) -> Option<&'a Array> {
    m.get(key).and_then(Value::as_array)
}

fn strings(m: &Metadata, key: &str) -> Result<Vec<String>, TraceError> {
    match arr(m, key) {
        Some(Array::String(v)) => Ok(v.clone()),
        Some(_) => Err(TraceError::Format(format!(
            "{key}: not an array of strings"
        ))),
        None => Err(TraceError::Format(format!("missing key {key}"))),
    }
}

macro_rules! typed_array {
    ($fn:ident, $variant:ident, $t:ty) => {
        fn $fn(m: &Metadata, key: &str) -> Result<Vec<$t>, TraceError> {
            match arr(m, key) {
                Some(Array::$variant(v)) => Ok(v.clone()),
                Some(_) => Err(TraceError::Format(format!(
                    "{key}: not an array of {}",
                    stringify!($t)
                ))),
                None => Err(TraceError::Format(format!("missing key {key}"))),
            }
        }
    };
}
typed_array!(i32s, I32, i32);
typed_array!(u32s, U32, u32);
typed_array!(u64s, U64, u64);
typed_array!(f32s, F32, f32);

fn get_str(m: &Metadata, key: &str) -> String {
    m.get_str(key).unwrap_or_default().to_owned()
}

fn run_meta(m: &Metadata) -> RunMeta {
    let u = |k| m.get_u64(k).unwrap_or(0) as u32;
    RunMeta {
        description: get_str(m, keys::DESCRIPTION),
        model_path: get_str(m, keys::RUN_MODEL_PATH),
        model_sha256: get_str(m, keys::RUN_MODEL_SHA256),
        architecture: get_str(m, keys::RUN_ARCHITECTURE),
        n_layer: u(keys::RUN_N_LAYER),
        n_head: u(keys::RUN_N_HEAD),
        n_head_kv: u(keys::RUN_N_HEAD_KV),
        cache_type_k: get_str(m, keys::RUN_CACHE_TYPE_K),
        cache_type_v: get_str(m, keys::RUN_CACHE_TYPE_V),
        flash_attn: get_str(m, keys::RUN_FLASH_ATTN),
        kv_rotation: m.get_bool(keys::RUN_KV_ROTATION).unwrap_or(false),
        mixed_kv_cache: m.get_bool(keys::RUN_MIXED_KV_CACHE).unwrap_or(false),
        n_ctx: u(keys::RUN_N_CTX),
        n_batch: u(keys::RUN_N_BATCH),
        n_ubatch: u(keys::RUN_N_UBATCH),
        n_predict: m.get_i64(keys::RUN_N_PREDICT).unwrap_or(0) as i32,
        seed: u(keys::RUN_SEED),
        prompt_tokens: i32s(m, keys::RUN_PROMPT_TOKENS).unwrap_or_default(),
        llama_version: get_str(m, keys::RUN_LLAMA_VERSION),
        target_layer: m.get_i64(keys::TARGET_LAYER).unwrap_or(-1) as i32,
        trace_sources: m.get_bool(keys::TRACE_SOURCES).unwrap_or(true),
        complete: m.get_bool(keys::COMPLETE).unwrap_or(true),
    }
}

/// Layer and role from a seed-style name (`kqv_out_kqv_out-0_step_3`, `src1_..._step_3`).
fn infer_from_name(name: &str) -> Option<(Role, i32, u32)> {
    let (base, step) = name.rsplit_once("_step_")?;
    let step: u32 = step.parse().ok()?;
    let (prefix, rest) = base.split_once('_')?;
    let role = match prefix {
        "kqv" if rest.starts_with("out_") => Role::KqvOut,
        "src0" => Role::Q,
        "src1" => Role::K,
        "src2" => Role::V,
        "src3" => Role::Mask,
        "src4" => Role::Sinks,
        _ => return None,
    };
    // The layer is the number after the last '-' or "_l" in the ggml name.
    let digits_after = |tag: &str| {
        rest.rfind(tag).and_then(|i| {
            let d: String = rest[i + tag.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            d.parse::<i32>().ok()
        })
    };
    let layer = digits_after("@l")
        .or_else(|| digits_after("-"))
        .or_else(|| digits_after("_l"))?;
    Some((role, layer, step))
}

impl TraceFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self, TraceError> {
        Self::from_gguf(GgufFile::open(path)?)
    }

    pub fn from_gguf(file: GgufFile) -> Result<Self, TraceError> {
        let m = file.metadata();
        if !m.iter().any(|(k, _)| k.starts_with("kqv_trace.")) {
            return Err(TraceError::NotATrace);
        }
        let run = run_meta(m);
        let mut unknown = Vec::new();
        let has_roles = m.contains(keys::TENSOR_ROLE);
        let mut tensors = Vec::new();
        if has_roles {
            let n = file.tensors().len();
            let roles = strings(m, keys::TENSOR_ROLE)?;
            let layers = i32s(m, keys::TENSOR_LAYER)?;
            let steps = u32s(m, keys::TENSOR_STEP)?;
            let names = strings(m, keys::TENSOR_GGML_NAME)?;
            let ops = strings(m, keys::TENSOR_OP)?;
            let nbs = u64s(m, keys::TENSOR_NB)?;
            let views = strings(m, keys::TENSOR_VIEW_OF)?;
            for (key, len) in [
                (keys::TENSOR_ROLE, roles.len()),
                (keys::TENSOR_LAYER, layers.len()),
                (keys::TENSOR_STEP, steps.len()),
                (keys::TENSOR_GGML_NAME, names.len()),
                (keys::TENSOR_OP, ops.len()),
                (keys::TENSOR_NB, nbs.len() / 4),
                (keys::TENSOR_VIEW_OF, views.len()),
            ] {
                if len != n {
                    return Err(TraceError::Format(format!(
                        "{key} describes {len} tensors, the file has {n}"
                    )));
                }
            }
            for (i, t) in file.tensors().iter().enumerate() {
                let Some(role) = Role::from_name(&roles[i]) else {
                    unknown.push(t.name.clone());
                    continue;
                };
                if t.dims.len() > 4 {
                    return Err(TraceError::Format(format!("{}: more than 4 dims", t.name)));
                }
                let mut ne = [1u64; 4];
                ne[..t.dims.len()].copy_from_slice(&t.dims);
                let nb = [nbs[4 * i], nbs[4 * i + 1], nbs[4 * i + 2], nbs[4 * i + 3]];
                tensors.push(TracedTensor {
                    index: i,
                    name: t.name.clone(),
                    meta: TensorMeta {
                        role,
                        layer: layers[i],
                        step: steps[i],
                        ggml_name: names[i].clone(),
                        op: ops[i].clone(),
                        layout: TensorLayout { ty: t.ty, ne, nb },
                        view_of: views[i].clone(),
                    },
                });
            }
        } else {
            for (i, t) in file.tensors().iter().enumerate() {
                let Some((role, layer, step)) = infer_from_name(&t.name) else {
                    unknown.push(t.name.clone());
                    continue;
                };
                let mut ne = [1u64; 4];
                ne[..t.dims.len().min(4)].copy_from_slice(&t.dims[..t.dims.len().min(4)]);
                let layout = TensorLayout::contiguous(t.ty, ne)?;
                tensors.push(TracedTensor {
                    index: i,
                    name: t.name.clone(),
                    meta: TensorMeta {
                        role,
                        layer,
                        step,
                        ggml_name: String::new(),
                        op: String::new(),
                        layout,
                        view_of: String::new(),
                    },
                });
            }
        }

        let steps = match u32s(m, keys::STEP_N_TOKENS) {
            Ok(counts) => {
                let pos = i32s(m, keys::STEP_POSITIONS).unwrap_or_default();
                let tok = i32s(m, keys::STEP_TOKENS).unwrap_or_default();
                let total: usize = counts.iter().map(|&c| c as usize).sum();
                if pos.len() != total || (!tok.is_empty() && tok.len() != total) {
                    return Err(TraceError::Format(format!(
                        "{} lists {total} tokens, positions/tokens hold {}/{}",
                        keys::STEP_N_TOKENS,
                        pos.len(),
                        tok.len()
                    )));
                }
                let mut at = 0;
                counts
                    .iter()
                    .enumerate()
                    .map(|(s, &c)| {
                        let r = at..at + c as usize;
                        at += c as usize;
                        StepMeta {
                            step: s as u32,
                            positions: pos[r.clone()].to_vec(),
                            tokens: tok.get(r).map(<[i32]>::to_vec).unwrap_or_default(),
                        }
                    })
                    .collect()
            }
            Err(_) => Vec::new(),
        };

        let attn = match u32s(m, keys::ATTN_STEP) {
            Ok(s) => {
                let l = i32s(m, keys::ATTN_LAYER)?;
                let op = strings(m, keys::ATTN_OP)?;
                let sc = f32s(m, keys::ATTN_SCALE)?;
                let mb = f32s(m, keys::ATTN_MAX_BIAS)?;
                let cap = f32s(m, keys::ATTN_SOFTCAP)?;
                if [l.len(), op.len(), sc.len(), mb.len(), cap.len()]
                    .iter()
                    .any(|&n| n != s.len())
                {
                    return Err(TraceError::Format("kqv_trace.attn.* lengths differ".into()));
                }
                (0..s.len())
                    .map(|i| AttnRecord {
                        step: s[i],
                        layer: l[i],
                        op: op[i].clone(),
                        params: AttnParams {
                            scale: sc[i],
                            max_bias: mb[i],
                            softcap: cap[i],
                        },
                    })
                    .collect()
            }
            Err(_) => Vec::new(),
        };

        Ok(Self {
            file,
            run,
            steps,
            tensors,
            attn,
            unknown,
            from_names_only: !has_roles,
        })
    }

    pub fn gguf(&self) -> &GgufFile {
        &self.file
    }

    /// The tensor's bytes in logical contiguous order, in its own type.
    pub fn data(&self, t: &TracedTensor) -> &[u8] {
        let info = &self.file.tensors()[t.index];
        self.file.tensor_data(info)
    }

    /// The tensor's values as f32 (dequantized if quantized).
    pub fn f32(&self, t: &TracedTensor) -> Result<Vec<f32>, TraceError> {
        let info = &self.file.tensors()[t.index];
        Ok(self.file.tensor_f32(info)?)
    }

    pub fn find(&self, role: Role, layer: i32, step: u32) -> Option<&TracedTensor> {
        self.tensors
            .iter()
            .find(|t| t.meta.role == role && t.meta.layer == layer && t.meta.step == step)
    }

    pub fn attn(&self, step: u32, layer: i32) -> Option<&AttnRecord> {
        self.attn
            .iter()
            .find(|a| a.step == step && a.layer == layer)
    }

    /// Tensors grouped by (step, layer), each group in file order.
    pub fn groups(&self) -> BTreeMap<(u32, i32), Vec<&TracedTensor>> {
        let mut g: BTreeMap<(u32, i32), Vec<&TracedTensor>> = BTreeMap::new();
        for t in &self.tensors {
            g.entry((t.meta.step, t.meta.layer)).or_default().push(t);
        }
        g
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_names_parse() {
        assert_eq!(
            infer_from_name("kqv_out_kqv_out-12_step_3"),
            Some((Role::KqvOut, 12, 3))
        );
        assert_eq!(
            infer_from_name("src1_cache_k_l4(view)(permuted)_step_0"),
            Some((Role::K, 4, 0))
        );
        assert_eq!(
            infer_from_name("src3_attn_inp_kq_mask@l5_step_7"),
            Some((Role::Mask, 5, 7))
        );
        assert_eq!(infer_from_name("token_embd.weight"), None);
    }
}
