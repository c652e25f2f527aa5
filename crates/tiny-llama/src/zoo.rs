//! The tiny-model zoo: one tiny random-weight GGUF per attention shape llama.cpp builds,
//! so tracing and verification can be tested on every architecture without a download.
//!
//! Each [`Arch`] writes the hyperparameter keys, tensor names and shapes the vendored
//! llama.cpp's `load_arch_hparams` / `load_arch_tensors` (src/models/<arch>.cpp) ask for,
//! and the byte-level SentencePiece vocabulary of the tiny llama ([`crate::vocab`]).
//! Weights are drawn like the tiny llama's (uniform, standard deviation `gain /
//! sqrt(fan_in)` with `fan_in` the first dimension, Q/K-side projections with gain
//! [`QK_GAIN`], norms `1 ± 0.1`, biases of standard deviation 0.1), so the attention of
//! every model is neither uniform nor one-hot and every activation is finite.
//!
//! The common shape: n_embd [`N_EMBD`] = 4 heads of [`HEAD_DIM`] = 32 (a whole q8_0 block,
//! below the 64 at which llama.cpp rotates quantized caches), 2 KV heads where the
//! architecture allows GQA, n_ff [`N_FF`], context [`N_CTX_TRAIN`], 2 layers (more where
//! the architecture's pattern needs them: gemma4 3, llama4 and lfm2 4; mpt has 6 heads,
//! n_embd 192). What each model
//! exercises is in [`Arch::about`].

use std::path::{Path, PathBuf};

use gguf_io::{GgmlType, GgufError, HeaderSpec, Metadata, TensorSpec, Value};

use crate::{set_tokenizer, Init, Planned, BOS_ID, N_VOCAB, QK_GAIN};

/// Model width of every zoo model.
pub const N_EMBD: u64 = 128;
/// Head size of every zoo model (gemma4's full-attention layers use twice this).
pub const HEAD_DIM: u64 = 32;
/// Query heads.
pub const N_HEAD: u64 = 4;
/// Feed-forward width (and twice the expert width of the MoE models).
pub const N_FF: u64 = 256;
/// `<arch>.context_length`.
pub const N_CTX_TRAIN: u64 = 256;
/// Sliding window of the SWA models (shorter than the test prompts, so it masks).
pub const SLIDING_WINDOW: u32 = 16;
/// Seed of every zoo model's weights (each tensor has its own stream, see the crate docs).
pub const ZOO_SEED: u64 = 0x7a00_7a00_0000_0015;

/// An architecture of the zoo.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Phi3,
    Gemma2,
    Gemma3,
    Gemma4,
    Bloom,
    /// ALiBi over 6 heads: not a power of two, so two slope sequences.
    Mpt,
    StableLm,
    Olmo2,
    Granite,
    GptOss,
    /// DeepSeek-V2 with absorbed multi-head latent attention (`attn_k_b`/`attn_v_b`,
    /// `key_length_mla`: the K-only latent cache).
    Deepseek2Mla,
    /// DeepSeek-V2 decompressed to plain multi-head attention (`attn_kv_b`, no `*_mla`
    /// keys).
    Deepseek2,
    Falcon,
    Llama4,
    Grok,
    Bert,
    T5,
    Lfm2,
}

impl Arch {
    /// Every zoo architecture.
    pub const ALL: [Arch; 21] = [
        Arch::Llama,
        Arch::Qwen2,
        Arch::Qwen3,
        Arch::Phi3,
        Arch::Gemma2,
        Arch::Gemma3,
        Arch::Gemma4,
        Arch::Bloom,
        Arch::Mpt,
        Arch::StableLm,
        Arch::Olmo2,
        Arch::Granite,
        Arch::GptOss,
        Arch::Deepseek2Mla,
        Arch::Deepseek2,
        Arch::Falcon,
        Arch::Llama4,
        Arch::Grok,
        Arch::Bert,
        Arch::T5,
        Arch::Lfm2,
    ];

    /// The zoo's name (the file is `zoo-<name>.gguf`).
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Phi3 => "phi3",
            Arch::Gemma2 => "gemma2",
            Arch::Gemma3 => "gemma3",
            Arch::Gemma4 => "gemma4",
            Arch::Bloom => "bloom",
            Arch::Mpt => "mpt",
            Arch::StableLm => "stablelm",
            Arch::Olmo2 => "olmo2",
            Arch::Granite => "granite",
            Arch::GptOss => "gpt-oss",
            Arch::Deepseek2Mla => "deepseek2-mla",
            Arch::Deepseek2 => "deepseek2",
            Arch::Falcon => "falcon",
            Arch::Llama4 => "llama4",
            Arch::Grok => "grok",
            Arch::Bert => "bert",
            Arch::T5 => "t5",
            Arch::Lfm2 => "lfm2",
        }
    }

    /// `general.architecture` (llama-arch.cpp's LLM_ARCH_NAMES).
    pub fn gguf_arch(self) -> &'static str {
        match self {
            Arch::Deepseek2Mla => "deepseek2",
            other => other.name(),
        }
    }

    /// The architecture with zoo name `name`.
    pub fn from_name(name: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.name() == name)
    }

    /// What the model exercises, in one line.
    pub fn about(self) -> &'static str {
        match self {
            Arch::Llama => "GQA, RoPE, RMS norm (the reference shape)",
            Arch::Qwen2 => "Q/K/V biases",
            Arch::Qwen3 => "per-head Q/K RMS norms",
            Arch::Phi3 => "fused QKV projection, MHA",
            Arch::Gemma2 => "attention logit softcapping (50), alternating sliding window",
            Arch::Gemma3 => "Q/K norms, alternating sliding window (pattern 2)",
            Arch::Gemma4 => {
                "head size 64 on full layers and 32 on SWA layers, scale 1, \
                 proportional RoPE factors, the last layer sharing an earlier layer's KV"
            }
            Arch::Bloom => "ALiBi (max bias 8), fused QKV with bias, layer norm",
            Arch::Mpt => "ALiBi (max bias 4) over 6 heads (not a power of two), QKV clamp",
            Arch::StableLm => "partial rotary (8 of 32 dimensions), layer norm",
            Arch::Olmo2 => "whole-width Q/K norms, post-norms",
            Arch::Granite => {
                "attention.scale 0.125 (not 1/sqrt(head)), residual/embedding/logit scales"
            }
            Arch::GptOss => "attention sinks, alternating sliding window, MoE with biases",
            Arch::Deepseek2Mla => {
                "absorbed multi-head latent attention: one K-only latent cache row \
                 (64 latent + 32 rope), V a view of K, output through attn_v_b"
            }
            Arch::Deepseek2 => "MLA decompressed: K of 32 nope + 32 rope, V of 32, MHA cache",
            Arch::Falcon => "multi-query attention (one KV head), fused QKV, parallel residual",
            Arch::Llama4 => {
                "chunked attention on 3 of 4 layers, a NoPE full layer with temperature \
                 tuning, Q/K L2 norm, interleaved MoE"
            }
            Arch::Grok => "attention softcap and scale as explicit graph ops (tanh chain), MoE",
            Arch::Bert => "encoder: non-causal self-attention, no KV cache, absolute positions",
            Arch::T5 => {
                "encoder-decoder: relative position bias, decoder self- and cross-attention"
            }
            Arch::Lfm2 => "hybrid: short-convolution recurrent layers between attention layers",
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A zoo model: its metadata and tensor table (values are generated when written).
pub struct ZooModel {
    pub arch: Arch,
    metadata: Metadata,
    tensors: Vec<Planned>,
}

impl ZooModel {
    /// The model of `arch`.
    pub fn new(arch: Arch) -> ZooModel {
        let mut b = Builder::new(arch);
        match arch {
            Arch::Llama => llama(&mut b),
            Arch::Qwen2 => qwen2(&mut b),
            Arch::Qwen3 => qwen3(&mut b),
            Arch::Phi3 => phi3(&mut b),
            Arch::Gemma2 => gemma2(&mut b),
            Arch::Gemma3 => gemma3(&mut b),
            Arch::Gemma4 => gemma4(&mut b),
            Arch::Bloom => bloom(&mut b),
            Arch::Mpt => mpt(&mut b),
            Arch::StableLm => stablelm(&mut b),
            Arch::Olmo2 => olmo2(&mut b),
            Arch::Granite => granite(&mut b),
            Arch::GptOss => gpt_oss(&mut b),
            Arch::Deepseek2Mla => deepseek2(&mut b, true),
            Arch::Deepseek2 => deepseek2(&mut b, false),
            Arch::Falcon => falcon(&mut b),
            Arch::Llama4 => llama4(&mut b),
            Arch::Grok => grok(&mut b),
            Arch::Bert => bert(&mut b),
            Arch::T5 => t5(&mut b),
            Arch::Lfm2 => lfm2(&mut b),
        }
        ZooModel {
            arch,
            metadata: b.m,
            tensors: b.t,
        }
    }

    /// Metadata and tensor table of the file.
    pub fn header_spec(&self) -> HeaderSpec {
        HeaderSpec {
            metadata: self.metadata.clone(),
            tensors: self
                .tensors
                .iter()
                .map(|t| TensorSpec {
                    name: t.name.clone(),
                    dims: t.dims.clone(),
                    ty: t.ty,
                })
                .collect(),
            ..HeaderSpec::default()
        }
    }

    /// The f32 values of tensor `name`; `None` for a name the model does not have.
    pub fn tensor_values(&self, name: &str) -> Option<Vec<f32>> {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .and_then(|t| t.values(ZOO_SEED))
    }

    /// Write the model to `path` atomically.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<(), GgufError> {
        gguf_io::write_file(path, &self.header_spec(), |w| {
            for t in &self.tensors {
                w.write_tensor(&t.bytes(ZOO_SEED)?)?;
            }
            Ok(())
        })
    }
}

/// Write the zoo model of `arch` as `dir/zoo-<name>.gguf`; returns that path.
pub fn write_zoo_model(dir: impl AsRef<Path>, arch: Arch) -> Result<PathBuf, GgufError> {
    let path = dir.as_ref().join(format!("zoo-{}.gguf", arch.name()));
    ZooModel::new(arch).write(&path)?;
    Ok(path)
}

const F32: GgmlType = GgmlType::F32;
const NV: u64 = N_VOCAB as u64;
const E: u64 = N_EMBD;
const HD: u64 = HEAD_DIM;
const Q: u64 = N_HEAD * HEAD_DIM;
/// K/V width with 2 KV heads.
const KV2: u64 = 2 * HEAD_DIM;

fn w(i: usize, s: &str) -> String {
    format!("blk.{i}.{s}.weight")
}

fn bias(i: usize, s: &str) -> String {
    format!("blk.{i}.{s}.bias")
}

struct Builder {
    arch: &'static str,
    /// Model width (`embedding_length`; [`N_EMBD`] unless [`Builder::width`] changes it).
    e: u64,
    m: Metadata,
    t: Vec<Planned>,
}

impl Builder {
    fn new(arch: Arch) -> Builder {
        let mut b = Builder {
            arch: arch.gguf_arch(),
            e: E,
            m: Metadata::new(),
            t: Vec::new(),
        };
        b.m.set("general.architecture", b.arch);
        // Not the architecture's name: llama.cpp's vocabulary loader changes token
        // attributes by model name (a "phi3" in it asks for phi-3's `<|endoftext|>`).
        b.m.set("general.name", "tiny-zoo");
        b.m.set("general.file_type", 0u32); // LLAMA_FTYPE_ALL_F32
        b.kv("vocab_size", N_VOCAB as u32);
        b.kv("context_length", N_CTX_TRAIN as u32);
        b.kv("embedding_length", E as u32);
        b.kv("block_count", 2u32);
        b.kv("feed_forward_length", N_FF as u32);
        b.kv("attention.head_count", N_HEAD as u32);
        b.kv("attention.head_count_kv", 2u32);
        b.kv("rope.dimension_count", HD as u32);
        b.kv("rope.freq_base", 10000.0f32);
        set_tokenizer(&mut b.m);
        b
    }

    /// Set `<arch>.<key>`.
    fn kv(&mut self, key: &str, v: impl Into<Value>) {
        self.m.set(format!("{}.{key}", self.arch), v);
    }

    /// A model width other than [`N_EMBD`] (call before adding tensors).
    fn width(&mut self, e: u64) {
        self.e = e;
        self.kv("embedding_length", e as u32);
    }

    fn n_layer(&mut self, n: usize) -> std::ops::Range<usize> {
        self.kv("block_count", n as u32);
        0..n
    }

    fn push(&mut self, name: &str, dims: &[u64], init: Init) {
        self.t.push(Planned::new(name, dims, F32, init));
    }

    /// A matrix of gain 1 (fan-in = `dims[0]`).
    fn mat(&mut self, name: &str, dims: &[u64]) {
        self.push(name, dims, Init::fan_in(dims[0], 1.0));
    }

    /// A Q- or K-side matrix (gain [`QK_GAIN`]).
    fn qk(&mut self, name: &str, dims: &[u64]) {
        self.push(name, dims, Init::fan_in(dims[0], QK_GAIN));
    }

    fn norm(&mut self, name: &str, n: u64) {
        self.push(name, &[n], Init::Norm);
    }

    fn bias(&mut self, name: &str, dims: &[u64]) {
        self.push(name, dims, Init::Uniform { std: 0.1 });
    }

    /// A layer norm: weight and bias.
    fn layer_norm(&mut self, stem: &str, n: u64) {
        self.norm(&format!("{stem}.weight"), n);
        self.bias(&format!("{stem}.bias"), &[n]);
    }

    fn token_embd(&mut self) {
        self.push("token_embd.weight", &[self.e, NV], Init::Embedding);
    }

    fn output(&mut self) {
        self.mat("output.weight", &[self.e, NV]);
    }

    /// Separate Q/K/V and the output projection, Q of `q` and K/V of `kv` wide.
    fn attn(&mut self, i: usize, q: u64, kv: u64) {
        self.qk(&w(i, "attn_q"), &[self.e, q]);
        self.qk(&w(i, "attn_k"), &[self.e, kv]);
        self.mat(&w(i, "attn_v"), &[self.e, kv]);
        self.mat(&w(i, "attn_output"), &[q, self.e]);
    }

    /// Gated FFN (gate, up, down) of width `ff`.
    fn ffn(&mut self, i: usize, ff: u64) {
        self.mat(&w(i, "ffn_gate"), &[self.e, ff]);
        self.mat(&w(i, "ffn_up"), &[self.e, ff]);
        self.mat(&w(i, "ffn_down"), &[ff, self.e]);
    }

    /// Mixture of experts: router and `n` experts of width `ff`.
    fn experts(&mut self, i: usize, ff: u64, n: u64) {
        self.mat(&w(i, "ffn_gate_inp"), &[self.e, n]);
        self.mat(&w(i, "ffn_gate_exps"), &[self.e, ff, n]);
        self.mat(&w(i, "ffn_up_exps"), &[self.e, ff, n]);
        self.mat(&w(i, "ffn_down_exps"), &[ff, self.e, n]);
    }
}

/// Llama-like pre-norm blocks (attn_norm, Q/K/V/O, ffn_norm, gated FFN).
fn llama_blocks(b: &mut Builder, q: u64, kv: u64) {
    for i in b.n_layer(2) {
        b.norm(&w(i, "attn_norm"), E);
        b.attn(i, q, kv);
        b.norm(&w(i, "ffn_norm"), E);
        b.ffn(i, N_FF);
    }
}

fn llama(b: &mut Builder) {
    b.kv("attention.layer_norm_rms_epsilon", 1e-5f32);
    b.token_embd();
    b.norm("output_norm.weight", E);
    b.output();
    llama_blocks(b, Q, KV2);
}

fn qwen2(b: &mut Builder) {
    b.kv("attention.layer_norm_rms_epsilon", 1e-6f32);
    b.token_embd();
    b.norm("output_norm.weight", E);
    b.output();
    for i in b.n_layer(2) {
        b.norm(&w(i, "attn_norm"), E);
        b.attn(i, Q, KV2);
        b.bias(&bias(i, "attn_q"), &[Q]);
        b.bias(&bias(i, "attn_k"), &[KV2]);
        b.bias(&bias(i, "attn_v"), &[KV2]);
        b.norm(&w(i, "ffn_norm"), E);
        b.ffn(i, N_FF);
    }
}

fn qwen3(b: &mut Builder) {
    b.kv("attention.layer_norm_rms_epsilon", 1e-6f32);
    b.kv("attention.key_length", HD as u32);
    b.kv("attention.value_length", HD as u32);
    b.token_embd();
    b.norm("output_norm.weight", E);
    b.output();
    for i in b.n_layer(2) {
        b.norm(&w(i, "attn_norm"), E);
        b.attn(i, Q, KV2);
        b.norm(&w(i, "attn_q_norm"), HD);
        b.norm(&w(i, "attn_k_norm"), HD);
        b.norm(&w(i, "ffn_norm"), E);
        b.ffn(i, N_FF);
    }
}

fn phi3(b: &mut Builder) {
    b.kv("attention.layer_norm_rms_epsilon", 1e-5f32);
    b.kv("attention.head_count_kv", N_HEAD as u32);
    b.token_embd();
    b.norm("output_norm.weight", E);
    b.output();
    for i in b.n_layer(2) {
        b.norm(&w(i, "attn_norm"), E);
        b.qk(&w(i, "attn_qkv"), &[E, 3 * E]);
        b.mat(&w(i, "attn_output"), &[E, E]);
        b.norm(&w(i, "ffn_norm"), E);
        b.mat(&w(i, "ffn_up"), &[E, 2 * N_FF]);
        b.mat(&w(i, "ffn_down"), &[N_FF, E]);
    }
}

/// Gemma-style blocks: sandwich norms around attention and FFN, Q/K norms when `qk_norm`.
fn gemma_blocks(b: &mut Builder, qk_norm: bool) {
    for i in b.n_layer(2) {
        b.norm(&w(i, "attn_norm"), E);
        b.attn(i, Q, KV2);
        if qk_norm {
            b.norm(&w(i, "attn_q_norm"), HD);
            b.norm(&w(i, "attn_k_norm"), HD);
        }
        b.norm(&w(i, "post_attention_norm"), E);
        b.norm(&w(i, "ffn_norm"), E);
        b.ffn(i, N_FF);
        b.norm(&w(i, "post_ffw_norm"), E);
    }
}

fn gemma2(b: &mut Builder) {
    b.kv("attention.layer_norm_rms_epsilon", 1e-6f32);
    b.kv("attention.sliding_window", SLIDING_WINDOW);
    b.kv("attn_logit_softcapping", 50.0f32);
    b.kv("final_logit_softcapping", 30.0f32);
    b.token_embd();
    b.norm("output_norm.weight", E);
    gemma_blocks(b, false);
}

fn gemma3(b: &mut Builder) {
    b.kv("attention.layer_norm_rms_epsilon", 1e-6f32);
    b.kv("attention.sliding_window", SLIDING_WINDOW);
    b.kv("attention.sliding_window_pattern", 2u32);
    b.kv("rope.freq_base_swa", 10000.0f32);
    b.kv("rope.freq_base", 1_000_000.0f32);
    b.token_embd();
    b.norm("output_norm.weight", E);
    gemma_blocks(b, true);
}

fn gemma4(b: &mut Builder) {
    // Layers: SWA (head 32), full (head 64, proportional RoPE factors), SWA sharing
    // layer 0's KV.
    let swa = [true, false, true];
    let hd_full = 2 * HD;
    b.kv("attention.layer_norm_rms_epsilon", 1e-6f32);
    b.kv("attention.sliding_window", SLIDING_WINDOW);
    b.kv("attention.sliding_window_pattern", swa.to_vec());
    b.kv("attention.shared_kv_layers", 1u32);
    b.kv("attention.key_length", hd_full as u32);
    b.kv("attention.value_length", hd_full as u32);
    b.kv("attention.key_length_swa", HD as u32);
    b.kv("attention.value_length_swa", HD as u32);
    b.kv("rope.dimension_count", hd_full as u32);
    b.kv("rope.dimension_count_swa", HD as u32);
    b.kv("rope.freq_base_swa", 10000.0f32);
    b.kv("rope.freq_base", 1_000_000.0f32);
    b.kv("embedding_length_per_layer_input", 0u32);
    b.token_embd();
    b.norm("output_norm.weight", E);
    b.push("rope_freqs.weight", &[hd_full / 2], Init::Const(1.0));
    let n = swa.len();
    for i in b.n_layer(n) {
        let hd = if swa[i] { HD } else { hd_full };
        let has_kv = i + 1 < n;
        b.norm(&w(i, "attn_norm"), E);
        b.qk(&w(i, "attn_q"), &[E, N_HEAD * hd]);
        if has_kv {
            b.qk(&w(i, "attn_k"), &[E, 2 * hd]);
            b.mat(&w(i, "attn_v"), &[E, 2 * hd]);
        }
        b.mat(&w(i, "attn_output"), &[N_HEAD * hd, E]);
        b.norm(&w(i, "attn_q_norm"), hd);
        if has_kv {
            b.norm(&w(i, "attn_k_norm"), hd);
        }
        b.norm(&w(i, "post_attention_norm"), E);
        b.norm(&w(i, "ffn_norm"), E);
        b.ffn(i, N_FF);
        b.norm(&w(i, "post_ffw_norm"), E);
    }
}

fn bloom(b: &mut Builder) {
    b.kv("attention.layer_norm_epsilon", 1e-5f32);
    b.kv("attention.head_count_kv", N_HEAD as u32);
    b.token_embd();
    b.layer_norm("token_embd_norm", E);
    b.layer_norm("output_norm", E);
    for i in b.n_layer(2) {
        b.layer_norm(&format!("blk.{i}.attn_norm"), E);
        b.qk(&w(i, "attn_qkv"), &[E, 3 * E]);
        b.bias(&bias(i, "attn_qkv"), &[3 * E]);
        b.mat(&w(i, "attn_output"), &[E, E]);
        b.bias(&bias(i, "attn_output"), &[E]);
        b.layer_norm(&format!("blk.{i}.ffn_norm"), E);
        b.mat(&w(i, "ffn_up"), &[E, N_FF]);
        b.bias(&bias(i, "ffn_up"), &[N_FF]);
        b.mat(&w(i, "ffn_down"), &[N_FF, E]);
        b.bias(&bias(i, "ffn_down"), &[E]);
    }
}

fn mpt(b: &mut Builder) {
    // 6 heads of 32: n_embd 192.
    let (h, e) = (6u64, 6 * HD);
    b.width(e);
    b.kv("attention.head_count", h as u32);
    b.kv("attention.head_count_kv", h as u32);
    b.kv("attention.layer_norm_epsilon", 1e-5f32);
    b.kv("attention.max_alibi_bias", 4.0f32);
    b.kv("attention.clamp_kqv", 6.0f32);
    b.token_embd();
    b.norm("output_norm.weight", e);
    for i in b.n_layer(2) {
        b.norm(&w(i, "attn_norm"), e);
        b.qk(&w(i, "attn_qkv"), &[e, 3 * e]);
        b.mat(&w(i, "attn_output"), &[e, e]);
        b.norm(&w(i, "ffn_norm"), e);
        b.mat(&w(i, "ffn_up"), &[e, N_FF]);
        b.mat(&w(i, "ffn_down"), &[N_FF, e]);
    }
}

fn stablelm(b: &mut Builder) {
    b.kv("attention.layer_norm_epsilon", 1e-5f32);
    b.kv("rope.dimension_count", (HD / 4) as u32);
    b.token_embd();
    b.layer_norm("output_norm", E);
    b.output();
    for i in b.n_layer(2) {
        b.layer_norm(&format!("blk.{i}.attn_norm"), E);
        b.attn(i, Q, KV2);
        b.layer_norm(&format!("blk.{i}.ffn_norm"), E);
        b.ffn(i, N_FF);
    }
}

fn olmo2(b: &mut Builder) {
    b.kv("attention.layer_norm_rms_epsilon", 1e-6f32);
    b.token_embd();
    b.norm("output_norm.weight", E);
    b.output();
    for i in b.n_layer(2) {
        b.attn(i, Q, KV2);
        b.norm(&w(i, "attn_q_norm"), Q);
        b.norm(&w(i, "attn_k_norm"), KV2);
        b.norm(&w(i, "post_attention_norm"), E);
        b.ffn(i, N_FF);
        b.norm(&w(i, "post_ffw_norm"), E);
    }
}

fn granite(b: &mut Builder) {
    b.kv("attention.layer_norm_rms_epsilon", 1e-5f32);
    b.kv("attention.scale", 0.125f32);
    b.kv("logit_scale", 4.0f32);
    b.kv("residual_scale", 0.5f32);
    b.kv("embedding_scale", 2.0f32);
    b.token_embd();
    b.norm("output_norm.weight", E);
    b.output();
    llama_blocks(b, Q, KV2);
}

fn gpt_oss(b: &mut Builder) {
    let (n_exp, ff_exp) = (4u64, N_FF / 2);
    b.kv("attention.layer_norm_rms_epsilon", 1e-5f32);
    b.kv("attention.key_length", HD as u32);
    b.kv("attention.value_length", HD as u32);
    b.kv("attention.sliding_window", SLIDING_WINDOW);
    b.kv("expert_count", n_exp as u32);
    b.kv("expert_used_count", 2u32);
    b.kv("expert_feed_forward_length", ff_exp as u32);
    b.token_embd();
    b.norm("output_norm.weight", E);
    b.output();
    for i in b.n_layer(2) {
        b.norm(&w(i, "attn_norm"), E);
        b.attn(i, Q, KV2);
        b.bias(&bias(i, "attn_q"), &[Q]);
        b.bias(&bias(i, "attn_k"), &[KV2]);
        b.bias(&bias(i, "attn_v"), &[KV2]);
        b.bias(&bias(i, "attn_output"), &[E]);
        // Sink logits of the order of the scores, per head.
        b.push(&w(i, "attn_sinks"), &[N_HEAD], Init::Uniform { std: 1.0 });
        b.norm(&w(i, "post_attention_norm"), E);
        b.experts(i, ff_exp, n_exp);
        b.bias(&bias(i, "ffn_gate_inp"), &[n_exp]);
        b.bias(&bias(i, "ffn_gate_exps"), &[ff_exp, n_exp]);
        b.bias(&bias(i, "ffn_up_exps"), &[ff_exp, n_exp]);
        b.bias(&bias(i, "ffn_down_exps"), &[E, n_exp]);
    }
}

fn deepseek2(b: &mut Builder, absorbed: bool) {
    let (kv_lora, rope, nope, v) = (2 * HD, HD, HD, HD);
    b.kv("attention.layer_norm_rms_epsilon", 1e-6f32);
    b.kv("leading_dense_block_count", 2u32);
    b.kv("attention.q_lora_rank", 0u32);
    b.kv("attention.kv_lora_rank", kv_lora as u32);
    b.kv("rope.dimension_count", rope as u32);
    b.kv("expert_feed_forward_length", (N_FF / 2) as u32);
    b.kv("expert_shared_count", 1u32);
    if absorbed {
        // One latent KV "head": K = latent + rope, V = the latent (a view of K).
        b.kv("attention.head_count_kv", 1u32);
        b.kv("attention.key_length", (kv_lora + rope) as u32);
        b.kv("attention.value_length", kv_lora as u32);
        b.kv("attention.key_length_mla", (nope + rope) as u32);
        b.kv("attention.value_length_mla", v as u32);
    } else {
        b.kv("attention.head_count_kv", N_HEAD as u32);
        b.kv("attention.key_length", (nope + rope) as u32);
        b.kv("attention.value_length", v as u32);
    }
    b.token_embd();
    b.norm("output_norm.weight", E);
    b.output();
    for i in b.n_layer(2) {
        b.norm(&w(i, "attn_norm"), E);
        b.norm(&w(i, "attn_kv_a_norm"), kv_lora);
        b.qk(&w(i, "attn_q"), &[E, N_HEAD * (nope + rope)]);
        b.qk(&w(i, "attn_kv_a_mqa"), &[E, kv_lora + rope]);
        if absorbed {
            b.qk(&w(i, "attn_k_b"), &[nope, kv_lora, N_HEAD]);
            b.mat(&w(i, "attn_v_b"), &[kv_lora, v, N_HEAD]);
        } else {
            b.qk(&w(i, "attn_kv_b"), &[kv_lora, N_HEAD * (nope + v)]);
        }
        b.mat(&w(i, "attn_output"), &[N_HEAD * v, E]);
        b.norm(&w(i, "ffn_norm"), E);
        b.ffn(i, N_FF);
    }
}

fn falcon(b: &mut Builder) {
    b.kv("attention.layer_norm_epsilon", 1e-5f32);
    b.kv("attention.head_count_kv", 1u32);
    b.token_embd();
    b.layer_norm("output_norm", E);
    b.output();
    for i in b.n_layer(2) {
        b.layer_norm(&format!("blk.{i}.attn_norm"), E);
        b.qk(&w(i, "attn_qkv"), &[E, E + 2 * HD]);
        b.mat(&w(i, "attn_output"), &[E, E]);
        b.mat(&w(i, "ffn_up"), &[E, N_FF]);
        b.mat(&w(i, "ffn_down"), &[N_FF, E]);
    }
}

fn llama4(b: &mut Builder) {
    let (n_exp, ff_exp) = (2u64, N_FF / 2);
    b.kv("attention.layer_norm_rms_epsilon", 1e-5f32);
    b.kv("expert_count", n_exp as u32);
    b.kv("expert_used_count", 1u32);
    b.kv("expert_feed_forward_length", ff_exp as u32);
    b.kv("interleave_moe_layer_step", 2u32);
    b.token_embd();
    b.norm("output_norm.weight", E);
    b.output();
    for i in b.n_layer(4) {
        b.norm(&w(i, "attn_norm"), E);
        b.attn(i, Q, KV2);
        b.norm(&w(i, "ffn_norm"), E);
        if (i + 1) % 2 == 0 {
            b.experts(i, ff_exp, n_exp);
            b.mat(&w(i, "ffn_gate_shexp"), &[E, ff_exp]);
            b.mat(&w(i, "ffn_up_shexp"), &[E, ff_exp]);
            b.mat(&w(i, "ffn_down_shexp"), &[ff_exp, E]);
        } else {
            b.ffn(i, N_FF);
        }
    }
}

fn grok(b: &mut Builder) {
    b.kv("attention.layer_norm_rms_epsilon", 1e-5f32);
    b.kv("expert_count", 2u32);
    b.kv("expert_used_count", 1u32);
    b.kv("expert_feed_forward_length", (N_FF / 2) as u32);
    // Grok-1's values except the embedding scale (78.4 would swamp the tiny model).
    b.kv("embedding_scale", 1.0f32);
    b.kv("attention.output_scale", 0.088_388_35f32);
    b.kv("attn_logit_softcapping", 30.0f32);
    b.kv("router_logit_softcapping", 30.0f32);
    b.token_embd();
    b.norm("output_norm.weight", E);
    b.output();
    for i in b.n_layer(2) {
        b.norm(&w(i, "attn_norm"), E);
        b.attn(i, Q, KV2);
        b.norm(&w(i, "attn_output_norm"), E);
        b.norm(&w(i, "ffn_norm"), E);
        b.experts(i, N_FF / 2, 2);
        b.norm(&w(i, "layer_output_norm"), E);
    }
}

fn bert(b: &mut Builder) {
    b.kv("attention.layer_norm_epsilon", 1e-12f32);
    b.kv("attention.head_count_kv", N_HEAD as u32);
    b.kv("attention.causal", false);
    b.kv("pooling_type", 1u32); // mean
    b.m.set("tokenizer.ggml.token_type_count", 2u32);
    b.token_embd();
    b.push("token_types.weight", &[E, 2], Init::Uniform { std: 0.1 });
    b.push(
        "position_embd.weight",
        &[E, N_CTX_TRAIN],
        Init::Uniform { std: 0.1 },
    );
    b.layer_norm("token_embd_norm", E);
    for i in b.n_layer(2) {
        b.attn(i, E, E);
        b.bias(&bias(i, "attn_q"), &[E]);
        b.bias(&bias(i, "attn_k"), &[E]);
        b.bias(&bias(i, "attn_v"), &[E]);
        b.bias(&bias(i, "attn_output"), &[E]);
        b.layer_norm(&format!("blk.{i}.attn_output_norm"), E);
        b.mat(&w(i, "ffn_up"), &[E, N_FF]);
        b.bias(&bias(i, "ffn_up"), &[N_FF]);
        b.mat(&w(i, "ffn_down"), &[N_FF, E]);
        b.bias(&bias(i, "ffn_down"), &[E]);
        b.layer_norm(&format!("blk.{i}.layer_output_norm"), E);
    }
}

fn t5(b: &mut Builder) {
    let n_bkt = 32u64;
    b.kv("attention.layer_norm_rms_epsilon", 1e-6f32);
    b.kv("attention.head_count_kv", N_HEAD as u32);
    b.kv("attention.relative_buckets_count", n_bkt as u32);
    b.kv("decoder_start_token_id", BOS_ID);
    b.token_embd();
    b.norm("enc.output_norm.weight", E);
    b.norm("dec.output_norm.weight", E);
    b.output();
    let rel = Init::Uniform { std: 0.5 };
    for i in b.n_layer(2) {
        let n = |s: &str| format!("enc.blk.{i}.{s}.weight");
        b.norm(&n("attn_norm"), E);
        if i == 0 {
            b.push(&n("attn_rel_b"), &[N_HEAD, n_bkt], rel);
        }
        b.qk(&n("attn_q"), &[E, E]);
        b.qk(&n("attn_k"), &[E, E]);
        b.mat(&n("attn_v"), &[E, E]);
        b.mat(&n("attn_o"), &[E, E]);
        b.norm(&n("ffn_norm"), E);
        b.mat(&n("ffn_up"), &[E, N_FF]);
        b.mat(&n("ffn_down"), &[N_FF, E]);
    }
    for i in 0..2 {
        let n = |s: &str| format!("dec.blk.{i}.{s}.weight");
        b.norm(&n("attn_norm"), E);
        if i == 0 {
            b.push(&n("attn_rel_b"), &[N_HEAD, n_bkt], rel);
        }
        b.qk(&n("attn_q"), &[E, E]);
        b.qk(&n("attn_k"), &[E, E]);
        b.mat(&n("attn_v"), &[E, E]);
        b.mat(&n("attn_o"), &[E, E]);
        b.norm(&n("cross_attn_norm"), E);
        b.qk(&n("cross_attn_q"), &[E, E]);
        b.qk(&n("cross_attn_k"), &[E, E]);
        b.mat(&n("cross_attn_v"), &[E, E]);
        b.mat(&n("cross_attn_o"), &[E, E]);
        b.norm(&n("ffn_norm"), E);
        b.mat(&n("ffn_up"), &[E, N_FF]);
        b.mat(&n("ffn_down"), &[N_FF, E]);
    }
}

fn lfm2(b: &mut Builder) {
    // Layers 0 and 2 short convolutions (no KV heads), 1 and 3 attention.
    let n_kv: [u32; 4] = [0, 2, 0, 2];
    let l_cache = 3u64;
    b.kv("attention.layer_norm_rms_epsilon", 1e-5f32);
    b.kv("attention.head_count_kv", n_kv.to_vec());
    b.kv("shortconv.l_cache", l_cache as u32);
    b.token_embd();
    b.norm("token_embd_norm.weight", E);
    b.output();
    for i in b.n_layer(n_kv.len()) {
        b.norm(&w(i, "ffn_norm"), E);
        b.ffn(i, N_FF);
        b.norm(&w(i, "attn_norm"), E);
        if n_kv[i] > 0 {
            b.norm(&w(i, "attn_q_norm"), HD);
            b.norm(&w(i, "attn_k_norm"), HD);
            b.attn(i, Q, KV2);
        } else {
            b.mat(&w(i, "shortconv.conv"), &[l_cache, E]);
            b.mat(&w(i, "shortconv.in_proj"), &[E, 3 * E]);
            b.mat(&w(i, "shortconv.out_proj"), &[E, E]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_unique() {
        for a in Arch::ALL {
            assert_eq!(Arch::from_name(a.name()), Some(a));
        }
        let mut names: Vec<&str> = Arch::ALL.iter().map(|a| a.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Arch::ALL.len());
    }

    #[test]
    fn every_model_has_unique_tensor_names_and_its_arch_keys() {
        for a in Arch::ALL {
            let spec = ZooModel::new(a).header_spec();
            let mut names: Vec<&str> = spec.tensors.iter().map(|t| t.name.as_str()).collect();
            let n = names.len();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), n, "{a}: duplicate tensor names");
            let key = format!("{}.block_count", a.gguf_arch());
            assert!(spec.metadata.get(&key).is_some(), "{a}: {key}");
        }
    }
}
