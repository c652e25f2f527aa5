//! Our dequantization (`gguf_io::quant`) against ggml's own `to_float`, side by side on
//! the same bytes: `cargo bench -p ggml-trace-sys --bench dequant_vs_ggml`.
//!
//! Group `dequant_vs_ggml`, ids `gguf-io/<type>` and `ggml/<type>`, for every type both
//! implement; 1M elements each, throughput in bytes of f32 output. Single-threaded on
//! both sides (ggml's `to_float` is a plain row function).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ggml_trace_sys::dequant;
use gguf_io::{quant, GgmlType, TYPE_TABLE};

#[path = "../../gguf-io/benches/source/mod.rs"]
mod source;

use source::{source_bytes, N_ELEMENTS};

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("dequant_vs_ggml");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .throughput(Throughput::Bytes((N_ELEMENTS * 4) as u64));
    let mut dst = vec![0.0f32; N_ELEMENTS];
    for info in TYPE_TABLE {
        let ty = GgmlType(info.id);
        if !quant::can_dequantize(ty) || !dequant::ggml_can_to_float(ty) {
            continue;
        }
        let src = source_bytes(ty, N_ELEMENTS);
        group.bench_with_input(BenchmarkId::new("gguf-io", info.name), &src, |b, src| {
            b.iter(|| {
                quant::dequantize(ty, std::hint::black_box(src), &mut dst).expect("dequantize");
                std::hint::black_box(&dst);
            })
        });
        group.bench_with_input(BenchmarkId::new("ggml", info.name), &src, |b, src| {
            b.iter(|| {
                dequant::ggml_to_float(ty, std::hint::black_box(src), &mut dst).expect("to_float");
                std::hint::black_box(&dst);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
