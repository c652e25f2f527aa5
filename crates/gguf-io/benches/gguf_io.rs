//! gguf-io benchmarks: `cargo bench -p gguf-io --bench gguf_io`.
//!
//! - `dequantize/<type>`: 1M elements (a whole number of blocks) of every type
//!   `gguf_io::quant` can dequantize; throughput is bytes of f32 *output* (4 per element).
//! - `parse/model_header`: a gemma-3-270m-shaped header (262,144-entry token arrays).
//!
//! Kept short (10 samples, ~1 s measurement per benchmark) so a full run takes a couple
//! of minutes. Filter with e.g. `cargo bench -p gguf-io --bench gguf_io -- q4_K`.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gguf_io::{quant, GgmlType, TYPE_TABLE};

mod source;

use source::{source_bytes, N_ELEMENTS};

fn bench_dequantize(c: &mut Criterion) {
    let mut group = c.benchmark_group("dequantize");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    let mut dst = vec![0.0f32; N_ELEMENTS];
    for info in TYPE_TABLE {
        let ty = GgmlType(info.id);
        if !quant::can_dequantize(ty) {
            continue;
        }
        let src = source_bytes(ty, N_ELEMENTS);
        group.throughput(Throughput::Bytes((N_ELEMENTS * 4) as u64));
        group.bench_with_input(BenchmarkId::from_parameter(info.name), &src, |b, src| {
            b.iter(|| {
                quant::dequantize(ty, std::hint::black_box(src), &mut dst).expect("dequantize");
                std::hint::black_box(&dst);
            })
        });
    }
    group.finish();
}

/// A header shaped like gemma-3-270m's: 262,144-entry token, score and type arrays.
fn model_like_header() -> Vec<u8> {
    use gguf_io::{GgufWriter, HeaderSpec, Metadata, TensorSpec};
    let n = 262_144;
    let mut m = Metadata::new();
    m.set("general.architecture", "gemma3");
    m.set(
        "tokenizer.ggml.tokens",
        (0..n).map(|i| format!("tok{i}")).collect::<Vec<_>>(),
    );
    m.set(
        "tokenizer.ggml.scores",
        (0..n).map(|i| -(i as f32)).collect::<Vec<_>>(),
    );
    m.set(
        "tokenizer.ggml.token_type",
        (0..n).map(|i: i32| i % 6).collect::<Vec<_>>(),
    );
    let spec = HeaderSpec {
        metadata: m,
        tensors: (0..236)
            .map(|i| TensorSpec {
                name: format!("blk.{i}.weight"),
                dims: vec![32],
                ty: GgmlType::Q8_0,
            })
            .collect(),
        byte_order: gguf_io::ByteOrder::Little,
    };
    let mut w = GgufWriter::new(Vec::new(), &spec).expect("spec");
    for _ in 0..236 {
        w.write_tensor(&[0u8; 34]).expect("tensor");
    }
    w.finish().expect("finish")
}

/// `parse/model_header`: the whole header (metadata and tensor table) from memory;
/// throughput in bytes of input.
fn bench_parse(c: &mut Criterion) {
    let bytes = model_like_header();
    let mut group = c.benchmark_group("parse");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function("model_header", |b| {
        b.iter(|| gguf_io::parse_header(std::hint::black_box(&bytes[..]), Some(bytes.len() as u64)))
    });
    group.finish();
}

criterion_group!(benches, bench_dequantize, bench_parse);
criterion_main!(benches);
