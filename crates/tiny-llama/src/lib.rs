//! A deterministic tiny LLaMA-architecture model, written as GGUF with `gguf-io`, that
//! the vendored llama.cpp loads and runs. It exists so that attention tracing can be
//! tested end to end without downloading a model.
//!
//! - [`TinyLlamaConfig`] sets the shape (default: 2 layers, 4 query heads over 2 KV heads,
//!   head_dim 16, n_embd 64, n_ff 128, context 512; [`TinyLlamaConfig::larger`] for
//!   performance work), the seed and the weight type (F32 or F16; norms are always F32).
//! - [`write_model`] writes it atomically; [`model_bytes`] returns the same bytes.
//! - The vocabulary ([`vocab`]) is byte-level SentencePiece: `<unk>`, `<s>`, `</s>`, the
//!   256 byte tokens `<0x00>`..`<0xFF>` (type BYTE) and `▁` (U+2581, NORMAL), so
//!   llama.cpp's SPM tokenizer turns any text into byte tokens (a space becomes `▁`) and
//!   decodes it back exactly.
//!
//! Weights come from splitmix64, seeded per tensor from the config seed and the tensor
//! name (so one tensor's values do not depend on which others exist). They are uniform
//! with standard deviation `gain / sqrt(fan_in)`, so activations stay O(1); Q and K use
//! gain [`QK_GAIN`], which makes the scaled attention scores spread with a standard
//! deviation of about `QK_GAIN^2` (≈ 1.6): softmax weights that are neither uniform nor
//! one-hot. Norm weights are `1 ± 0.1`.

use std::io::Write;
use std::path::{Path, PathBuf};

use gguf_io::{quant, GgmlType, GgufError, GgufWriter, HeaderSpec, Metadata, TensorSpec, Value};

pub mod zoo;

/// `llama_token_type` values (llama.h) used in `tokenizer.ggml.token_type`.
pub const TOKEN_TYPE_NORMAL: i32 = 1;
pub const TOKEN_TYPE_UNKNOWN: i32 = 2;
pub const TOKEN_TYPE_CONTROL: i32 = 3;
pub const TOKEN_TYPE_BYTE: i32 = 6;

pub const UNK_ID: u32 = 0;
pub const BOS_ID: u32 = 1;
pub const EOS_ID: u32 = 2;
/// Id of the byte token `<0x00>`; byte `b` is `FIRST_BYTE_ID + b` ([`byte_token`]).
pub const FIRST_BYTE_ID: u32 = 3;
/// Id of `▁` (U+2581), SentencePiece's space.
pub const SPACE_ID: u32 = FIRST_BYTE_ID + 256;
pub const SPACE_PIECE: &str = "\u{2581}";
/// Vocabulary size.
pub const N_VOCAB: usize = SPACE_ID as usize + 1;

/// Gain of the Q and K projections (see the crate docs).
pub const QK_GAIN: f32 = 1.25;
/// Norm weights are `1 + NORM_NOISE * u`, `u` uniform in [-1, 1).
pub const NORM_NOISE: f32 = 0.1;

/// Token id of a byte.
pub fn byte_token(b: u8) -> u32 {
    FIRST_BYTE_ID + u32::from(b)
}

/// The token table as written to `tokenizer.ggml.{tokens,scores,token_type}`.
#[derive(Clone, Debug, PartialEq)]
pub struct Vocab {
    pub tokens: Vec<String>,
    pub scores: Vec<f32>,
    pub token_types: Vec<i32>,
}

/// The byte-level SentencePiece vocabulary (see the crate docs).
pub fn vocab() -> Vocab {
    let mut tokens = vec!["<unk>".to_owned(), "<s>".to_owned(), "</s>".to_owned()];
    let mut token_types = vec![TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_CONTROL];
    for b in 0..=255u8 {
        // Upper-case hex, as llama.cpp's byte_to_token looks it up.
        tokens.push(format!("<0x{b:02X}>"));
        token_types.push(TOKEN_TYPE_BYTE);
    }
    tokens.push(SPACE_PIECE.to_owned());
    token_types.push(TOKEN_TYPE_NORMAL);
    let mut scores = vec![0.0f32; tokens.len()];
    // SentencePiece gives pieces negative log-probabilities; the byte fallbacks and
    // specials score 0. Only merges consult scores, and there are none here.
    scores[SPACE_ID as usize] = -1.0;
    Vocab {
        tokens,
        scores,
        token_types,
    }
}

/// The `tokenizer.ggml.*` keys of the byte-level SentencePiece vocabulary ([`vocab`]).
pub(crate) fn set_tokenizer(m: &mut Metadata) {
    let v = vocab();
    m.set("tokenizer.ggml.model", "llama");
    m.set("tokenizer.ggml.tokens", v.tokens);
    m.set("tokenizer.ggml.scores", v.scores);
    m.set("tokenizer.ggml.token_type", v.token_types);
    m.set("tokenizer.ggml.bos_token_id", BOS_ID);
    m.set("tokenizer.ggml.eos_token_id", EOS_ID);
    m.set("tokenizer.ggml.unknown_token_id", UNK_ID);
    m.set("tokenizer.ggml.add_bos_token", true);
    m.set("tokenizer.ggml.add_eos_token", false);
    m.set("tokenizer.ggml.add_space_prefix", true);
}

/// The model's shape and contents.
#[derive(Clone, Debug, PartialEq)]
pub struct TinyLlamaConfig {
    pub n_layer: usize,
    pub n_embd: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads; must divide `n_head` (GQA).
    pub n_head_kv: usize,
    /// Per-head size of Q, K and V (= `llama.rope.dimension_count`); even. When
    /// `n_head * head_dim != n_embd`, `llama.attention.key_length`/`value_length` are
    /// written too.
    pub head_dim: usize,
    pub n_ff: usize,
    /// `llama.context_length`.
    pub n_ctx_train: usize,
    pub rms_eps: f32,
    pub rope_freq_base: f32,
    pub seed: u64,
    /// Type of the matrices (F32 or F16); 1-d norm weights are always F32.
    pub weight_type: GgmlType,
    /// Leave out `output.weight`, so llama.cpp reuses `token_embd.weight`.
    pub tie_embeddings: bool,
    /// `general.name`.
    pub name: String,
}

impl Default for TinyLlamaConfig {
    fn default() -> Self {
        Self {
            n_layer: 2,
            n_embd: 64,
            n_head: 4,
            n_head_kv: 2,
            head_dim: 16,
            n_ff: 128,
            n_ctx_train: 512,
            rms_eps: 1e-5,
            rope_freq_base: 10000.0,
            seed: 0x7179_11a3_a000_0001,
            weight_type: GgmlType::F32,
            tie_embeddings: false,
            name: "tiny-llama".to_owned(),
        }
    }
}

/// A configuration that cannot make a model llama.cpp accepts.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("{field} must be at least 1")]
    Zero { field: &'static str },
    #[error("n_head_kv = {n_head_kv} does not divide n_head = {n_head}")]
    HeadsNotDivisible { n_head: usize, n_head_kv: usize },
    #[error("head_dim = {0} must be even (RoPE rotates pairs)")]
    OddHeadDim(usize),
    #[error("{field} = {value} does not fit in the u32 GGUF field")]
    TooLarge { field: &'static str, value: usize },
    #[error("weight type {0} is not supported (F32 or F16)")]
    WeightType(GgmlType),
    #[error("{field} = {value} must be finite and positive")]
    BadFloat { field: &'static str, value: f32 },
    #[error("tensor '{0}' has more elements than this machine can address")]
    Overflow(String),
}

impl ConfigError {
    /// The GGUF metadata key the problem shows up in.
    pub fn key(&self) -> &'static str {
        match self {
            ConfigError::Zero { field } | ConfigError::TooLarge { field, .. } => key_of(field),
            ConfigError::HeadsNotDivisible { .. } => "llama.attention.head_count_kv",
            ConfigError::OddHeadDim(_) => "llama.rope.dimension_count",
            ConfigError::WeightType(_) => "general.file_type",
            ConfigError::BadFloat { field, .. } => key_of(field),
            ConfigError::Overflow(_) => "llama.embedding_length",
        }
    }
}

fn key_of(field: &str) -> &'static str {
    match field {
        "n_layer" => "llama.block_count",
        "n_embd" => "llama.embedding_length",
        "n_head" => "llama.attention.head_count",
        "n_head_kv" => "llama.attention.head_count_kv",
        "head_dim" => "llama.rope.dimension_count",
        "n_ff" => "llama.feed_forward_length",
        "n_ctx_train" => "llama.context_length",
        "rms_eps" => "llama.attention.layer_norm_rms_epsilon",
        "rope_freq_base" => "llama.rope.freq_base",
        _ => "general.architecture",
    }
}

impl From<ConfigError> for GgufError {
    fn from(e: ConfigError) -> Self {
        GgufError::BadKey {
            key: e.key().to_owned(),
            problem: e.to_string(),
        }
    }
}

impl TinyLlamaConfig {
    /// The preset for performance work: 8 layers, n_embd 1024, 16 query heads over 4 KV
    /// heads, head_dim 64, n_ff 2816, context 4096 (about 88M parameters).
    pub fn larger() -> Self {
        Self {
            n_layer: 8,
            n_embd: 1024,
            n_head: 16,
            n_head_kv: 4,
            head_dim: 64,
            n_ff: 2816,
            n_ctx_train: 4096,
            name: "tiny-llama-larger".to_owned(),
            ..Self::default()
        }
    }

    /// Width of Q (and of the attention output): `n_head * head_dim`.
    pub fn n_embd_q(&self) -> usize {
        self.n_head * self.head_dim
    }

    /// Width of K and V: `n_head_kv * head_dim`.
    pub fn n_embd_kv(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    /// Check everything llama.cpp (and GGUF) will insist on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let sizes = [
            ("n_layer", self.n_layer),
            ("n_embd", self.n_embd),
            ("n_head", self.n_head),
            ("n_head_kv", self.n_head_kv),
            ("head_dim", self.head_dim),
            ("n_ff", self.n_ff),
            ("n_ctx_train", self.n_ctx_train),
        ];
        for (field, value) in sizes {
            if value == 0 {
                return Err(ConfigError::Zero { field });
            }
            if u32::try_from(value).is_err() {
                return Err(ConfigError::TooLarge { field, value });
            }
        }
        if self.n_head % self.n_head_kv != 0 {
            return Err(ConfigError::HeadsNotDivisible {
                n_head: self.n_head,
                n_head_kv: self.n_head_kv,
            });
        }
        if self.head_dim % 2 != 0 {
            return Err(ConfigError::OddHeadDim(self.head_dim));
        }
        for (field, value) in [
            ("rms_eps", self.rms_eps),
            ("rope_freq_base", self.rope_freq_base),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(ConfigError::BadFloat { field, value });
            }
        }
        if self.weight_type != GgmlType::F32 && self.weight_type != GgmlType::F16 {
            return Err(ConfigError::WeightType(self.weight_type));
        }
        for (field, value) in [
            ("n_head", self.n_head.checked_mul(self.head_dim)),
            ("n_head_kv", self.n_head_kv.checked_mul(self.head_dim)),
        ] {
            match value {
                Some(v) if u32::try_from(v).is_ok() => {}
                _ => {
                    return Err(ConfigError::TooLarge {
                        field,
                        value: self.head_dim,
                    })
                }
            }
        }
        for t in self.tensor_layout() {
            if t.n_elements().is_none() {
                return Err(ConfigError::Overflow(t.name));
            }
        }
        Ok(())
    }

    /// The tensors in file order with their shapes; call after [`Self::validate`].
    fn tensor_layout(&self) -> Vec<Planned> {
        let (e, q, kv, ff, nv) = (
            self.n_embd as u64,
            self.n_embd_q() as u64,
            self.n_embd_kv() as u64,
            self.n_ff as u64,
            N_VOCAB as u64,
        );
        let w = self.weight_type;
        let f32_ = GgmlType::F32;
        let mut out = vec![
            Planned::new("token_embd.weight", &[e, nv], w, Init::Embedding),
            Planned::new("output_norm.weight", &[e], f32_, Init::Norm),
        ];
        if !self.tie_embeddings {
            out.push(Planned::new(
                "output.weight",
                &[e, nv],
                w,
                Init::fan_in(e, 1.0),
            ));
        }
        for i in 0..self.n_layer {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            out.extend([
                Planned::new(&n("attn_norm"), &[e], f32_, Init::Norm),
                Planned::new(&n("attn_q"), &[e, q], w, Init::fan_in(e, QK_GAIN)),
                Planned::new(&n("attn_k"), &[e, kv], w, Init::fan_in(e, QK_GAIN)),
                Planned::new(&n("attn_v"), &[e, kv], w, Init::fan_in(e, 1.0)),
                Planned::new(&n("attn_output"), &[q, e], w, Init::fan_in(q, 1.0)),
                Planned::new(&n("ffn_norm"), &[e], f32_, Init::Norm),
                Planned::new(&n("ffn_gate"), &[e, ff], w, Init::fan_in(e, 1.0)),
                Planned::new(&n("ffn_up"), &[e, ff], w, Init::fan_in(e, 1.0)),
                Planned::new(&n("ffn_down"), &[ff, e], w, Init::fan_in(ff, 1.0)),
            ]);
        }
        out
    }

    /// The tensor table (names, ggml `ne` shapes, types) in file order.
    pub fn tensor_specs(&self) -> Result<Vec<TensorSpec>, ConfigError> {
        self.validate()?;
        Ok(self
            .tensor_layout()
            .into_iter()
            .map(|t| TensorSpec {
                name: t.name,
                dims: t.dims,
                ty: t.ty,
            })
            .collect())
    }

    /// Metadata and tensor table of the file.
    pub fn header_spec(&self) -> Result<HeaderSpec, ConfigError> {
        let tensors = self.tensor_specs()?;
        let u = |x: usize| Value::U32(x as u32); // validated to fit
        let mut m = Metadata::new();
        m.set("general.architecture", "llama");
        m.set("general.name", self.name.as_str());
        let file_type = if self.weight_type == GgmlType::F16 {
            1u32 // LLAMA_FTYPE_MOSTLY_F16
        } else {
            0u32 // LLAMA_FTYPE_ALL_F32
        };
        m.set("general.file_type", file_type);
        m.set("llama.vocab_size", u(N_VOCAB));
        m.set("llama.context_length", u(self.n_ctx_train));
        m.set("llama.embedding_length", u(self.n_embd));
        m.set("llama.block_count", u(self.n_layer));
        m.set("llama.feed_forward_length", u(self.n_ff));
        m.set("llama.attention.head_count", u(self.n_head));
        m.set("llama.attention.head_count_kv", u(self.n_head_kv));
        if self.n_embd_q() != self.n_embd {
            m.set("llama.attention.key_length", u(self.head_dim));
            m.set("llama.attention.value_length", u(self.head_dim));
        }
        m.set("llama.attention.layer_norm_rms_epsilon", self.rms_eps);
        m.set("llama.rope.dimension_count", u(self.head_dim));
        m.set("llama.rope.freq_base", self.rope_freq_base);
        set_tokenizer(&mut m);
        Ok(HeaderSpec {
            metadata: m,
            tensors,
            ..HeaderSpec::default()
        })
    }

    /// The f32 values of tensor `name` before conversion to the file's type (an F16 file
    /// holds their f16 rounding); `None` for a name the model does not have or an invalid
    /// config.
    pub fn tensor_values(&self, name: &str) -> Option<Vec<f32>> {
        self.validate().ok()?;
        self.tensor_layout()
            .into_iter()
            .find(|t| t.name == name)
            .and_then(|t| t.values(self.seed))
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Init {
    /// Uniform, standard deviation 1.
    Embedding,
    /// `1 + NORM_NOISE * u`.
    Norm,
    /// Uniform with standard deviation `std`.
    Uniform { std: f32 },
    /// Every value `c` (RoPE frequency factors of 1).
    Const(f32),
}

impl Init {
    pub(crate) fn fan_in(fan_in: u64, gain: f32) -> Self {
        Init::Uniform {
            std: gain / (fan_in as f32).sqrt(),
        }
    }
}

pub(crate) struct Planned {
    pub(crate) name: String,
    pub(crate) dims: Vec<u64>,
    pub(crate) ty: GgmlType,
    pub(crate) init: Init,
}

impl Planned {
    pub(crate) fn new(name: &str, dims: &[u64], ty: GgmlType, init: Init) -> Self {
        Self {
            name: name.to_owned(),
            dims: dims.to_vec(),
            ty,
            init,
        }
    }

    pub(crate) fn n_elements(&self) -> Option<usize> {
        let n = self.dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d))?;
        // f32 staging buffer must be addressable too.
        usize::try_from(n)
            .ok()
            .filter(|n| n.checked_mul(4).is_some())
    }

    fn values(&self, seed: u64) -> Option<Vec<f32>> {
        let n = self.n_elements()?;
        let mut rng = SplitMix64::for_tensor(seed, &self.name);
        let (offset, amp) = match self.init {
            Init::Embedding => (0.0, 3f32.sqrt()),
            Init::Norm => (1.0, NORM_NOISE),
            // Uniform on [-a, a) has standard deviation a / sqrt(3).
            Init::Uniform { std } => (0.0, std * 3f32.sqrt()),
            Init::Const(c) => (c, 0.0),
        };
        Some((0..n).map(|_| offset + amp * rng.unit()).collect())
    }

    pub(crate) fn bytes(&self, seed: u64) -> Result<Vec<u8>, GgufError> {
        let values = self.values(seed).ok_or_else(|| GgufError::SizeOverflow {
            name: self.name.clone(),
            dims: self.dims.clone(),
            ty: self.ty,
        })?;
        quant::quantize(self.ty, &values).map_err(|source| GgufError::Dequantize {
            name: self.name.clone(),
            source,
        })
    }
}

/// splitmix64 (Steele, Lea, Flood 2014), one stream per tensor.
struct SplitMix64(u64);

impl SplitMix64 {
    fn for_tensor(seed: u64, name: &str) -> Self {
        // FNV-1a of the name, mixed into the seed.
        let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        let mut s = SplitMix64(seed ^ h);
        s.0 = s.next();
        s
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform on [-1, 1) in steps of 2^-23 (exact in f32, so platform independent).
    fn unit(&mut self) -> f32 {
        let k = (self.next() >> 40) as i32 - (1 << 23);
        k as f32 / (1u32 << 23) as f32
    }
}

fn write_tensors<W: Write>(w: &mut GgufWriter<W>, cfg: &TinyLlamaConfig) -> Result<(), GgufError> {
    for t in cfg.tensor_layout() {
        w.write_tensor(&t.bytes(cfg.seed)?)?;
    }
    Ok(())
}

/// Write the model to any `Write` (tensors are generated one at a time); returns the sink.
pub fn write_to<W: Write>(out: W, cfg: &TinyLlamaConfig) -> Result<W, GgufError> {
    let spec = cfg.header_spec()?;
    let mut w = GgufWriter::new(out, &spec)?;
    write_tensors(&mut w, cfg)?;
    w.finish()
}

/// Write the model to `path` atomically (a failure leaves whatever was there).
/// An invalid config is reported as [`GgufError::BadKey`] naming the offending key.
pub fn write_model(path: impl AsRef<Path>, cfg: &TinyLlamaConfig) -> Result<(), GgufError> {
    let spec = cfg.header_spec()?;
    gguf_io::write_file(path, &spec, |w| write_tensors(w, cfg))
}

/// The default model with a head size of `head_dim` (and `n_embd` = 4 heads of it):
/// quantized caches need whole 32-value blocks, and at 64 llama.cpp rotates Q/K/V.
/// Written as `dir/tiny-hd<head_dim>.gguf`; returns that path.
pub fn write_with_head_dim(dir: impl AsRef<Path>, head_dim: usize) -> Result<PathBuf, GgufError> {
    let path = dir.as_ref().join(format!("tiny-hd{head_dim}.gguf"));
    let cfg = TinyLlamaConfig {
        head_dim,
        n_embd: 4 * head_dim,
        ..Default::default()
    };
    write_model(&path, &cfg)?;
    Ok(path)
}

/// The default model made to end every generation at once: greedy decoding picks EOS
/// at every position, by a margin no rounding can close. Embedding dimension 0 is 1 for
/// every token and no layer writes to it (row 0 of `attn_output` and `ffn_down` is zero),
/// so the final RMS norm gives it a positive value; `output.weight`'s EOS row is
/// [`EOS_LOGIT_GAIN`] on that dimension and zero elsewhere, so EOS's logit is hundreds
/// while the others stay O(1). For testing that `--ignore-eos` (llama.cpp's EOS logit
/// bias of -inf) makes a run generate every `-n` token. Written as `dir/tiny-eos.gguf`.
pub fn write_eos_first(dir: impl AsRef<Path>) -> Result<PathBuf, GgufError> {
    let path = dir.as_ref().join("tiny-eos.gguf");
    let cfg = TinyLlamaConfig {
        name: "tiny-llama-eos".to_owned(),
        ..Default::default()
    };
    let spec = cfg.header_spec()?;
    let (e, q, ff) = (cfg.n_embd, cfg.n_embd_q(), cfg.n_ff);
    gguf_io::write_file(&path, &spec, |w| {
        for t in cfg.tensor_layout() {
            let mut v = t.values(cfg.seed).ok_or_else(|| GgufError::SizeOverflow {
                name: t.name.clone(),
                dims: t.dims.clone(),
                ty: t.ty,
            })?;
            let name = t.name.as_str();
            if name == "token_embd.weight" {
                v.iter_mut().step_by(e).for_each(|x| *x = 1.0);
            } else if name == "output.weight" {
                let row = &mut v[EOS_ID as usize * e..(EOS_ID as usize + 1) * e];
                row.fill(0.0);
                row[0] = EOS_LOGIT_GAIN;
            } else if name.ends_with("attn_output.weight") {
                v[..q].fill(0.0);
            } else if name.ends_with("ffn_down.weight") {
                v[..ff].fill(0.0);
            }
            let bytes = quant::quantize(t.ty, &v).map_err(|source| GgufError::Dequantize {
                name: t.name.clone(),
                source,
            })?;
            w.write_tensor(&bytes)?;
        }
        Ok(())
    })?;
    Ok(path)
}

/// The weight of EOS's output row on dimension 0 in [`write_eos_first`]'s model.
pub const EOS_LOGIT_GAIN: f32 = 1000.0;

/// The model file's bytes (identical to what [`write_model`] writes).
pub fn model_bytes(cfg: &TinyLlamaConfig) -> Result<Vec<u8>, GgufError> {
    write_to(Vec::new(), cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_is_in_range_and_centred() {
        let mut r = SplitMix64::for_tensor(1, "x");
        let v: Vec<f32> = (0..100_000).map(|_| r.unit()).collect();
        assert!(v.iter().all(|x| (-1.0..1.0).contains(x)));
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.01, "{mean}");
        assert!((var - 1.0 / 3.0).abs() < 0.01, "{var}");
    }

    #[test]
    fn streams_differ_per_tensor_and_seed() {
        let a: Vec<u64> = (0..4)
            .map({
                let mut r = SplitMix64::for_tensor(1, "a");
                move |_| r.next()
            })
            .collect();
        let b: Vec<u64> = (0..4)
            .map({
                let mut r = SplitMix64::for_tensor(1, "b");
                move |_| r.next()
            })
            .collect();
        let c: Vec<u64> = (0..4)
            .map({
                let mut r = SplitMix64::for_tensor(2, "a");
                move |_| r.next()
            })
            .collect();
        assert_ne!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn vocab_layout() {
        let v = vocab();
        assert_eq!(v.tokens.len(), N_VOCAB);
        assert_eq!(v.scores.len(), N_VOCAB);
        assert_eq!(v.token_types.len(), N_VOCAB);
        assert_eq!(v.tokens[byte_token(0x0A) as usize], "<0x0A>");
        assert_eq!(v.tokens[byte_token(0xFF) as usize], "<0xFF>");
        assert_eq!(v.tokens[SPACE_ID as usize], "\u{2581}");
        let mut sorted = v.tokens.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), N_VOCAB, "token texts are unique");
    }
}
