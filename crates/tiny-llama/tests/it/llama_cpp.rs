//! The vendored llama.cpp (through `ggml_trace::sys`) loads the tiny model, tokenizes
//! and detokenizes text through its byte-level SPM vocabulary, and decodes a prompt
//! with flash attention on and off, giving finite, non-degenerate logits that agree.

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::Path;
use std::sync::Once;

use ggml_trace::sys;
use gguf_io::GgmlType;
use tiny_llama::{byte_token, write_model, TinyLlamaConfig, BOS_ID, N_VOCAB, SPACE_ID};

unsafe extern "C" fn log_warnings(level: sys::ggml_log_level, text: *const c_char, _: *mut c_void) {
    let wanted = level == sys::GGML_LOG_LEVEL_WARN || level == sys::GGML_LOG_LEVEL_ERROR;
    if wanted && !text.is_null() {
        // SAFETY: llama.cpp passes a NUL-terminated string valid for this call.
        let s = unsafe { CStr::from_ptr(text) }.to_string_lossy();
        eprint!("llama.cpp: {s}");
    }
}

fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        // SAFETY: plain global setup calls with a valid `extern "C"` callback.
        unsafe {
            sys::llama_log_set(Some(log_warnings), std::ptr::null_mut());
            sys::llama_backend_init();
        }
    });
}

struct Model(*mut sys::llama_model);

impl Model {
    fn load(path: &Path) -> Model {
        init();
        let c = CString::new(path.to_str().expect("utf-8 temp path")).unwrap();
        // SAFETY: default params, a valid NUL-terminated path; null is checked below.
        let m = unsafe {
            let params = sys::llama_model_default_params();
            sys::llama_model_load_from_file(c.as_ptr(), params)
        };
        assert!(!m.is_null(), "llama.cpp failed to load {}", path.display());
        Model(m)
    }

    fn vocab(&self) -> *const sys::llama_vocab {
        // SAFETY: self.0 is a live model.
        unsafe { sys::llama_model_get_vocab(self.0) }
    }

    fn tokenize(&self, text: &str) -> Vec<sys::llama_token> {
        let mut out = vec![0 as sys::llama_token; text.len() + 8];
        // SAFETY: text/len describe a valid buffer; `out` has room for out.len() tokens.
        let n = unsafe {
            sys::llama_tokenize(
                self.vocab(),
                text.as_ptr().cast(),
                text.len() as i32,
                out.as_mut_ptr(),
                out.len() as i32,
                true,
                false,
            )
        };
        assert!(n >= 0, "llama_tokenize failed: {n}");
        out.truncate(n as usize);
        out
    }

    fn detokenize(&self, tokens: &[sys::llama_token]) -> Vec<u8> {
        let mut buf = vec![0u8; 256];
        // SAFETY: tokens and buf are valid for the lengths given.
        let n = unsafe {
            sys::llama_detokenize(
                self.vocab(),
                tokens.as_ptr(),
                tokens.len() as i32,
                buf.as_mut_ptr().cast(),
                buf.len() as i32,
                true,
                false,
            )
        };
        assert!(n >= 0, "llama_detokenize failed: {n}");
        buf.truncate(n as usize);
        buf
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: loaded by llama_model_load_from_file, freed once.
        unsafe { sys::llama_model_free(self.0) }
    }
}

struct Context(*mut sys::llama_context);

impl Context {
    fn new(model: &Model, flash_attn: bool) -> Context {
        // SAFETY: default params adjusted by value; null is checked below.
        let ctx = unsafe {
            let mut p = sys::llama_context_default_params();
            p.n_ctx = 64;
            p.n_batch = 64;
            p.n_ubatch = 64;
            p.n_threads = 2;
            p.n_threads_batch = 2;
            p.flash_attn_type = if flash_attn {
                sys::LLAMA_FLASH_ATTN_TYPE_ENABLED
            } else {
                sys::LLAMA_FLASH_ATTN_TYPE_DISABLED
            };
            sys::llama_init_from_model(model.0, p)
        };
        assert!(!ctx.is_null(), "llama_init_from_model failed");
        Context(ctx)
    }

    /// Decode `tokens` as one batch; returns the last token's logits.
    fn decode(&self, tokens: &[sys::llama_token]) -> Vec<f32> {
        let mut toks = tokens.to_vec();
        // SAFETY: the batch borrows `toks`, alive for the call; logits are read right after,
        // N_VOCAB floats for the batch's output (its last token).
        unsafe {
            let batch = sys::llama_batch_get_one(toks.as_mut_ptr(), toks.len() as i32);
            let rc = sys::llama_decode(self.0, batch);
            assert_eq!(rc, 0, "llama_decode returned {rc}");
            let logits = sys::llama_get_logits_ith(self.0, -1);
            assert!(!logits.is_null());
            std::slice::from_raw_parts(logits, N_VOCAB).to_vec()
        }
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: created by llama_init_from_model, freed once.
        unsafe { sys::llama_free(self.0) }
    }
}

fn write(cfg: &TinyLlamaConfig) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_model(&path, cfg).unwrap();
    (dir, path)
}

fn check_logits(logits: &[f32]) {
    assert!(logits.iter().all(|x| x.is_finite()), "non-finite logits");
    let n = logits.len() as f64;
    let mean = logits.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let std = (logits
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / n)
        .sqrt();
    println!("logit std {std:.3}");
    assert!((0.1..100.0).contains(&std), "logit std {std}");
}

#[test]
fn llama_cpp_loads_tokenizes_and_decodes() {
    // Builds llama_context_params, whose committed layout has the mixed KV cache's fields.
    if ggml_trace::skip_without_mixed_kv("llama_cpp_loads_tokenizes_and_decodes") {
        return;
    }
    let cfg = TinyLlamaConfig::default();
    let (_dir, path) = write(&cfg);
    let model = Model::load(&path);
    // SAFETY: model is live.
    unsafe {
        assert_eq!(sys::llama_model_n_embd(model.0), cfg.n_embd as i32);
        assert_eq!(sys::llama_model_n_layer(model.0), cfg.n_layer as i32);
        assert_eq!(sys::llama_model_n_head(model.0), cfg.n_head as i32);
        assert_eq!(sys::llama_model_n_head_kv(model.0), cfg.n_head_kv as i32);
        assert_eq!(
            sys::llama_model_n_ctx_train(model.0),
            cfg.n_ctx_train as i32
        );
        assert_eq!(sys::llama_vocab_n_tokens(model.vocab()), N_VOCAB as i32);
        assert_eq!(sys::llama_vocab_bos(model.vocab()), BOS_ID as i32);
        assert_eq!(sys::llama_vocab_nl(model.vocab()), byte_token(b'\n') as i32);
    }

    // Byte-level SPM: BOS, then `▁` for each space (one prepended), bytes for the rest.
    let toks = model.tokenize("Hello world");
    let mut want = vec![BOS_ID as i32, SPACE_ID as i32];
    want.extend("Hello".bytes().map(|b| byte_token(b) as i32));
    want.push(SPACE_ID as i32);
    want.extend("world".bytes().map(|b| byte_token(b) as i32));
    assert_eq!(toks, want);
    // Without BOS, llama.cpp drops the prepended space; after a BOS it keeps it (its
    // `llama_vocab::impl::detokenize`, same for every SPM model).
    assert_eq!(model.detokenize(&toks[1..]), b"Hello world");
    assert_eq!(model.detokenize(&toks), b" Hello world");
    // Any bytes survive the round trip, multi-byte UTF-8 and newlines included.
    let text = "héllo\n\twörld ✓ 日本";
    let toks2 = model.tokenize(text);
    assert_eq!(model.detokenize(&toks2[1..]), text.as_bytes());

    let with_fa = Context::new(&model, true);
    let logits = with_fa.decode(&toks);
    check_logits(&logits);
    // One generation step after the prompt.
    let next = logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as i32)
        .unwrap();
    check_logits(&with_fa.decode(&[next]));

    // Flash attention off computes the same function.
    let without_fa = Context::new(&model, false);
    let plain = without_fa.decode(&toks);
    check_logits(&plain);
    let max_diff = logits
        .iter()
        .zip(&plain)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    // With an F16 KV cache, flash attention rounds Q to F16 for the dot products and (on
    // its scalar path) accumulates V in F16: ~1e-3 differences are expected, a wrong
    // mask or head mapping would change logits by O(1).
    println!("FA on/off: largest logit difference {max_diff}");
    assert!(max_diff < 1e-2, "FA on/off logits differ by {max_diff}");
    let argmax = |l: &[f32]| {
        l.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
    };
    assert_eq!(argmax(&logits), argmax(&plain));
}

#[test]
fn llama_cpp_runs_the_f16_and_tied_variants() {
    // Builds llama_context_params, whose committed layout has the mixed KV cache's fields.
    if ggml_trace::skip_without_mixed_kv("llama_cpp_runs_the_f16_and_tied_variants") {
        return;
    }
    for cfg in [
        TinyLlamaConfig {
            weight_type: GgmlType::F16,
            ..TinyLlamaConfig::default()
        },
        TinyLlamaConfig {
            tie_embeddings: true,
            n_embd: 48,
            head_dim: 8,
            n_head_kv: 1,
            ..TinyLlamaConfig::default()
        },
    ] {
        let (_dir, path) = write(&cfg);
        let model = Model::load(&path);
        let toks = model.tokenize("The quick brown fox");
        let ctx = Context::new(&model, true);
        check_logits(&ctx.decode(&toks));
    }
}

/// The performance preset (about 88M parameters; 180 MB as F16, written to a tempdir)
/// loads and decodes too (about 12 s here).
#[test]
fn llama_cpp_runs_the_larger_preset() {
    // Builds llama_context_params, whose committed layout has the mixed KV cache's fields.
    if ggml_trace::skip_without_mixed_kv("llama_cpp_runs_the_larger_preset") {
        return;
    }
    let cfg = TinyLlamaConfig {
        weight_type: GgmlType::F16,
        ..TinyLlamaConfig::larger()
    };
    let (_dir, path) = write(&cfg);
    let model = Model::load(&path);
    // SAFETY: model is live.
    unsafe {
        assert_eq!(sys::llama_model_n_layer(model.0), 8);
        assert_eq!(sys::llama_model_n_head_kv(model.0), 4);
    }
    let toks = model.tokenize("The quick brown fox jumps over the lazy dog");
    let ctx = Context::new(&model, true);
    check_logits(&ctx.decode(&toks));
}

/// Every zoo model loads with its architecture, layer count and head count, and (the
/// decoder-only ones) decodes a prompt with flash attention on and off to finite,
/// non-degenerate logits. BERT (an encoder: no logits) and T5 (llama_decode before
/// llama_encode aborts) are loaded only; the monitor's zoo test runs them.
#[test]
fn llama_cpp_loads_and_runs_every_zoo_model() {
    // Builds llama_context_params, whose committed layout has the mixed KV cache's fields.
    if ggml_trace::skip_without_mixed_kv("llama_cpp_loads_and_runs_every_zoo_model") {
        return;
    }
    use tiny_llama::zoo::{write_zoo_model, Arch, ZooModel};
    let dir = tempfile::tempdir().unwrap();
    for arch in Arch::ALL {
        let path = write_zoo_model(dir.path(), arch).unwrap();
        let spec = ZooModel::new(arch).header_spec();
        let key = |k: &str| {
            spec.metadata
                .get_u64(&format!("{}.{k}", arch.gguf_arch()))
                .unwrap()
        };
        let model = Model::load(&path);
        let mut buf = vec![0u8; 64];
        let key_c = CString::new("general.architecture").unwrap();
        // SAFETY: model is live; buf has room for buf.len() bytes.
        let n = unsafe {
            assert_eq!(
                sys::llama_model_n_layer(model.0) as u64,
                key("block_count"),
                "{arch}"
            );
            assert_eq!(
                sys::llama_model_n_head(model.0) as u64,
                key("attention.head_count"),
                "{arch}"
            );
            assert_eq!(
                sys::llama_model_n_embd(model.0) as u64,
                key("embedding_length"),
                "{arch}"
            );
            sys::llama_model_meta_val_str(
                model.0,
                key_c.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        assert!(n > 0, "{arch}");
        assert_eq!(&buf[..n as usize], arch.gguf_arch().as_bytes());
        if matches!(arch, Arch::Bert | Arch::T5) {
            continue;
        }
        let toks = model.tokenize("The quick brown fox");
        for fa in [true, false] {
            let ctx = Context::new(&model, fa);
            println!("{arch} fa={fa}");
            check_logits(&ctx.decode(&toks));
        }
    }
}
