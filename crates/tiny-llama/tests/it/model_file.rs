//! The written file parses with gguf-io, has the metadata and tensor shapes llama.cpp's
//! LLaMA loader expects, holds the generated values, is deterministic, and rejects
//! impossible configurations without writing anything.

use gguf_io::{quant, Array, GgmlType, GgufError, GgufFile, Value};
use tiny_llama::{
    model_bytes, vocab, write_model, ConfigError, TinyLlamaConfig, BOS_ID, EOS_ID, N_VOCAB,
    SPACE_ID, TOKEN_TYPE_BYTE, TOKEN_TYPE_CONTROL, TOKEN_TYPE_NORMAL, TOKEN_TYPE_UNKNOWN, UNK_ID,
};

fn parse(cfg: &TinyLlamaConfig) -> GgufFile {
    GgufFile::from_bytes(model_bytes(cfg).expect("valid config")).expect("parses")
}

fn u(f: &GgufFile, key: &str) -> Value {
    f.metadata()
        .get(key)
        .unwrap_or_else(|| panic!("missing {key}"))
        .clone()
}

#[test]
fn metadata_is_what_llama_cpp_reads() {
    let cfg = TinyLlamaConfig::default();
    let f = parse(&cfg);
    assert_eq!(u(&f, "general.architecture"), Value::from("llama"));
    assert_eq!(u(&f, "general.name"), Value::from("tiny-llama"));
    assert_eq!(u(&f, "general.file_type"), Value::U32(0));
    for (key, want) in [
        ("llama.context_length", 512),
        ("llama.embedding_length", 64),
        ("llama.block_count", 2),
        ("llama.feed_forward_length", 128),
        ("llama.attention.head_count", 4),
        ("llama.attention.head_count_kv", 2),
        ("llama.rope.dimension_count", 16),
        ("llama.vocab_size", N_VOCAB as u32),
        ("tokenizer.ggml.bos_token_id", BOS_ID),
        ("tokenizer.ggml.eos_token_id", EOS_ID),
        ("tokenizer.ggml.unknown_token_id", UNK_ID),
    ] {
        assert_eq!(u(&f, key), Value::U32(want), "{key}");
    }
    // n_head * head_dim == n_embd: no explicit key/value length.
    assert!(!f.metadata().contains("llama.attention.key_length"));
    assert_eq!(
        u(&f, "llama.attention.layer_norm_rms_epsilon"),
        Value::F32(1e-5)
    );
    assert_eq!(u(&f, "llama.rope.freq_base"), Value::F32(10000.0));
    assert_eq!(u(&f, "tokenizer.ggml.model"), Value::from("llama"));
    assert_eq!(u(&f, "tokenizer.ggml.add_bos_token"), Value::Bool(true));

    let v = vocab();
    let Value::Array(Array::String(tokens)) = u(&f, "tokenizer.ggml.tokens") else {
        panic!("tokens are not a string array")
    };
    assert_eq!(tokens, v.tokens);
    assert_eq!(tokens.len(), N_VOCAB);
    assert_eq!(&tokens[..4], &["<unk>", "<s>", "</s>", "<0x00>"]);
    assert_eq!(tokens[3 + 0x41], "<0x41>");
    assert_eq!(tokens[SPACE_ID as usize], "\u{2581}");
    let Value::Array(Array::I32(types)) = u(&f, "tokenizer.ggml.token_type") else {
        panic!("token_type is not an i32 array")
    };
    assert_eq!(
        &types[..3],
        &[TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_CONTROL]
    );
    assert!(types[3..3 + 256].iter().all(|&t| t == TOKEN_TYPE_BYTE));
    assert_eq!(types[SPACE_ID as usize], TOKEN_TYPE_NORMAL);
    let Value::Array(Array::F32(scores)) = u(&f, "tokenizer.ggml.scores") else {
        panic!("scores are not an f32 array")
    };
    assert_eq!(scores.len(), N_VOCAB);
}

/// Shapes as `create_tensor` in vendor/llama.cpp/src/models/llama.cpp asks for them.
#[test]
fn tensor_shapes_match_the_llama_loader() {
    for cfg in [
        TinyLlamaConfig::default(),
        TinyLlamaConfig {
            weight_type: GgmlType::F16,
            ..TinyLlamaConfig::default()
        },
    ] {
        let f = parse(&cfg);
        let (e, q, kv, ff, nv) = (64u64, 64u64, 32u64, 128u64, N_VOCAB as u64);
        let w = cfg.weight_type;
        let mut want: Vec<(String, Vec<u64>, GgmlType)> = vec![
            ("token_embd.weight".into(), vec![e, nv], w),
            ("output_norm.weight".into(), vec![e], GgmlType::F32),
            ("output.weight".into(), vec![e, nv], w),
        ];
        for i in 0..2 {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            want.extend([
                (n("attn_norm"), vec![e], GgmlType::F32),
                (n("attn_q"), vec![e, q], w),
                (n("attn_k"), vec![e, kv], w),
                (n("attn_v"), vec![e, kv], w),
                (n("attn_output"), vec![q, e], w),
                (n("ffn_norm"), vec![e], GgmlType::F32),
                (n("ffn_gate"), vec![e, ff], w),
                (n("ffn_up"), vec![e, ff], w),
                (n("ffn_down"), vec![ff, e], w),
            ]);
        }
        let got: Vec<(String, Vec<u64>, GgmlType)> = f
            .tensors()
            .iter()
            .map(|t| (t.name.clone(), t.dims.clone(), t.ty))
            .collect();
        assert_eq!(got, want);
        let ft = if w == GgmlType::F16 { 1 } else { 0 };
        assert_eq!(u(&f, "general.file_type"), Value::U32(ft));
    }
}

#[test]
fn tensor_data_is_the_generated_values() {
    for ty in [GgmlType::F32, GgmlType::F16] {
        let cfg = TinyLlamaConfig {
            weight_type: ty,
            ..TinyLlamaConfig::default()
        };
        let f = parse(&cfg);
        for t in f.tensors() {
            let values = cfg.tensor_values(&t.name).expect("known tensor");
            let want = quant::quantize(t.ty, &values).expect("F32/F16");
            assert_eq!(f.tensor_data(t), want.as_slice(), "{}", t.name);
        }
    }
    assert_eq!(
        TinyLlamaConfig::default().tensor_values("no.such.tensor"),
        None
    );
}

fn std_of(v: &[f32]) -> f64 {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    (v.iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / n)
        .sqrt()
}

#[test]
fn weights_are_scaled_by_fan_in() {
    let cfg = TinyLlamaConfig::default();
    let val = |n: &str| cfg.tensor_values(n).expect("tensor");
    let close = |got: f64, want: f64, what: &str| {
        assert!(
            (got / want - 1.0).abs() < 0.05,
            "{what}: std {got}, want {want}"
        )
    };
    close(std_of(&val("token_embd.weight")), 1.0, "token_embd");
    close(
        std_of(&val("blk.0.attn_q.weight")),
        f64::from(tiny_llama::QK_GAIN) / 8.0,
        "attn_q",
    );
    close(std_of(&val("blk.1.attn_v.weight")), 1.0 / 8.0, "attn_v");
    close(
        std_of(&val("blk.0.ffn_down.weight")),
        1.0 / 128f64.sqrt(),
        "ffn_down",
    );
    let norm = val("blk.0.attn_norm.weight");
    assert!(norm.iter().all(|&x| (0.9..1.1).contains(&x)));
    assert!(std_of(&norm) > 0.01, "norms carry noise");
}

#[test]
fn bytes_are_deterministic_and_seeded() {
    let cfg = TinyLlamaConfig::default();
    let a = model_bytes(&cfg).unwrap();
    assert_eq!(a, model_bytes(&cfg).unwrap());
    let other = TinyLlamaConfig {
        seed: cfg.seed + 1,
        ..cfg.clone()
    };
    let b = model_bytes(&other).unwrap();
    assert_eq!(a.len(), b.len());
    assert_ne!(a, b);
    // Same header, different data.
    let fa = GgufFile::from_bytes(a.clone()).unwrap();
    let fb = GgufFile::from_bytes(b).unwrap();
    assert_eq!(fa.header().metadata, fb.header().metadata);
    for (ta, tb) in fa.tensors().iter().zip(fb.tensors()) {
        assert_ne!(fa.tensor_data(ta), fb.tensor_data(tb), "{}", ta.name);
    }
    // A tensor's values depend only on its name and the seed, not on the model's depth.
    let deeper = TinyLlamaConfig {
        n_layer: 3,
        ..cfg.clone()
    };
    assert_eq!(
        deeper.tensor_values("blk.1.attn_k.weight"),
        cfg.tensor_values("blk.1.attn_k.weight")
    );

    // write_model writes exactly these bytes, atomically (no temporary left behind).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_model(&path, &cfg).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), a);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("tiny.gguf")]);
}

#[test]
fn variants_tied_f16_and_nonsquare_heads() {
    let tied = parse(&TinyLlamaConfig {
        tie_embeddings: true,
        ..TinyLlamaConfig::default()
    });
    assert!(tied.tensor("output.weight").is_none());
    assert!(tied.tensor("token_embd.weight").is_some());

    let f32_len = model_bytes(&TinyLlamaConfig::default()).unwrap().len();
    let f16_len = model_bytes(&TinyLlamaConfig {
        weight_type: GgmlType::F16,
        ..TinyLlamaConfig::default()
    })
    .unwrap()
    .len();
    assert!(f16_len < f32_len * 6 / 10, "{f16_len} vs {f32_len}");

    // head_dim * n_head != n_embd: the explicit head sizes are written.
    let cfg = TinyLlamaConfig {
        n_embd: 48,
        n_head: 4,
        n_head_kv: 1,
        head_dim: 8,
        ..TinyLlamaConfig::default()
    };
    let f = parse(&cfg);
    assert_eq!(u(&f, "llama.attention.key_length"), Value::U32(8));
    assert_eq!(u(&f, "llama.attention.value_length"), Value::U32(8));
    assert_eq!(f.tensor("blk.0.attn_q.weight").unwrap().dims, vec![48, 32]);
    assert_eq!(f.tensor("blk.0.attn_k.weight").unwrap().dims, vec![48, 8]);
    assert_eq!(
        f.tensor("blk.0.attn_output.weight").unwrap().dims,
        vec![32, 48]
    );
}

#[test]
fn larger_preset_shapes() {
    let cfg = TinyLlamaConfig::larger();
    assert_eq!(
        (
            cfg.n_layer,
            cfg.n_embd,
            cfg.n_head,
            cfg.n_head_kv,
            cfg.head_dim,
            cfg.n_ff
        ),
        (8, 1024, 16, 4, 64, 2816)
    );
    let specs = cfg.tensor_specs().unwrap();
    assert_eq!(specs.len(), 3 + 8 * 9);
    let q = specs
        .iter()
        .find(|t| t.name == "blk.7.attn_k.weight")
        .unwrap();
    assert_eq!(q.dims, vec![1024, 256]);
    let header = cfg.header_spec().unwrap();
    assert!(!header.metadata.contains("llama.attention.key_length"));
}

#[test]
fn invalid_configs_are_errors_and_write_nothing() {
    let base = TinyLlamaConfig::default;
    let cases: Vec<(TinyLlamaConfig, ConfigError)> = vec![
        (
            TinyLlamaConfig {
                n_head_kv: 3,
                ..base()
            },
            ConfigError::HeadsNotDivisible {
                n_head: 4,
                n_head_kv: 3,
            },
        ),
        (
            TinyLlamaConfig {
                n_head_kv: 0,
                ..base()
            },
            ConfigError::Zero { field: "n_head_kv" },
        ),
        (
            TinyLlamaConfig {
                n_layer: 0,
                ..base()
            },
            ConfigError::Zero { field: "n_layer" },
        ),
        (
            TinyLlamaConfig {
                head_dim: 15,
                ..base()
            },
            ConfigError::OddHeadDim(15),
        ),
        (
            TinyLlamaConfig {
                weight_type: GgmlType::Q8_0,
                ..base()
            },
            ConfigError::WeightType(GgmlType::Q8_0),
        ),
        (
            TinyLlamaConfig {
                rms_eps: f32::NAN,
                ..base()
            },
            ConfigError::BadFloat {
                field: "rms_eps",
                value: f32::NAN,
            },
        ),
        (
            TinyLlamaConfig {
                n_ff: 1 << 33,
                ..base()
            },
            ConfigError::TooLarge {
                field: "n_ff",
                value: 1 << 33,
            },
        ),
        (
            TinyLlamaConfig {
                n_head: 1 << 20,
                n_head_kv: 1 << 20,
                head_dim: 1 << 20,
                ..base()
            },
            ConfigError::TooLarge {
                field: "n_head",
                value: 1 << 20,
            },
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (cfg, want) in cases {
        let got = cfg.validate().unwrap_err();
        // NaN != NaN: compare the message.
        assert_eq!(got.to_string(), want.to_string());
        let path = dir.path().join("bad.gguf");
        match write_model(&path, &cfg) {
            Err(GgufError::BadKey { key, problem }) => {
                assert_eq!(key, want.key());
                assert_eq!(problem, want.to_string());
            }
            other => panic!("{cfg:?}: {other:?}"),
        }
        assert!(model_bytes(&cfg).is_err());
        assert!(cfg.tensor_values("token_embd.weight").is_none());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}

/// Layer-0 attention of the prompt "Hello world" computed here in f64 (RMS norm, Q/K
/// projections, RoPE as llama.cpp's NORM mode, causal softmax): the weights are neither
/// uniform nor one-hot, so traced attention is a meaningful test.
#[test]
fn layer0_attention_is_neither_uniform_nor_one_hot() {
    let cfg = TinyLlamaConfig::default();
    let val = |n: &str| -> Vec<f64> {
        cfg.tensor_values(n)
            .expect("tensor")
            .into_iter()
            .map(f64::from)
            .collect()
    };
    let (e, d, nh, nkv) = (cfg.n_embd, cfg.head_dim, cfg.n_head, cfg.n_head_kv);
    let embd = val("token_embd.weight");
    let norm = val("blk.0.attn_norm.weight");
    let wq = val("blk.0.attn_q.weight");
    let wk = val("blk.0.attn_k.weight");
    let mut ids = vec![BOS_ID, SPACE_ID];
    ids.extend("Hello".bytes().map(tiny_llama::byte_token));
    ids.push(SPACE_ID);
    ids.extend("world".bytes().map(tiny_llama::byte_token));

    let project = |x: &[f64], w: &[f64], out: usize| -> Vec<f64> {
        (0..out)
            .map(|r| (0..e).map(|c| w[r * e + c] * x[c]).sum())
            .collect()
    };
    let rope = |v: &mut [f64], pos: usize| {
        for h in 0..v.len() / d {
            for i in (0..d).step_by(2) {
                let theta = pos as f64 * 10000f64.powf(-(i as f64) / d as f64);
                let (s, c) = theta.sin_cos();
                let (a, b) = (v[h * d + i], v[h * d + i + 1]);
                v[h * d + i] = a * c - b * s;
                v[h * d + i + 1] = a * s + b * c;
            }
        }
    };
    let mut qs = Vec::new();
    let mut ks = Vec::new();
    for (pos, &id) in ids.iter().enumerate() {
        let row = &embd[id as usize * e..(id as usize + 1) * e];
        let rms = (row.iter().map(|x| x * x).sum::<f64>() / e as f64 + 1e-5).sqrt();
        let x: Vec<f64> = row.iter().zip(&norm).map(|(v, g)| v / rms * g).collect();
        let mut q = project(&x, &wq, nh * d);
        let mut k = project(&x, &wk, nkv * d);
        rope(&mut q, pos);
        rope(&mut k, pos);
        qs.push(q);
        ks.push(k);
    }
    let scale = 1.0 / (d as f64).sqrt();
    let (mut max_weight, mut min_top) = (0.0f64, f64::INFINITY);
    let mut score_sq = (0.0, 0usize);
    for h in 0..nh {
        let kh = h / (nh / nkv);
        // From the 5th position on, so every row has at least 5 keys.
        for (t, q) in qs.iter().enumerate().skip(4) {
            let s: Vec<f64> = ks[..=t]
                .iter()
                .map(|k| {
                    let dot: f64 = (0..d).map(|i| q[h * d + i] * k[kh * d + i]).sum();
                    dot * scale
                })
                .collect();
            let mean = s.iter().sum::<f64>() / s.len() as f64;
            for x in &s {
                score_sq.0 += (x - mean).powi(2);
                score_sq.1 += 1;
            }
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
            let top = 1.0 / z; // largest weight
            max_weight = max_weight.max(top);
            // Uniform would be 1/(t+1).
            min_top = min_top.min(top * (t + 1) as f64);
        }
    }
    let score_std = (score_sq.0 / score_sq.1 as f64).sqrt();
    println!("score std {score_std:.3}, largest weight {max_weight:.3}, smallest top/uniform {min_top:.3}");
    assert!(
        (0.5..4.0).contains(&score_std),
        "scores spread with std {score_std}"
    );
    assert!(max_weight < 0.98, "some row is one-hot: {max_weight}");
    assert!(min_top > 1.2, "some row is nearly uniform: {min_top}");
}
