//! `cargo bench -p tensor-stats --bench summary`: the monitor's per-tensor statistics
//! (`Summary` over f32 values, chunks of 32,768 as the monitor feeds them), GiB/s of f32
//! input.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tensor_stats::SummaryAccumulator;

fn bench(c: &mut Criterion) {
    const N: usize = 1 << 20;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let values: Vec<f32> = (0..N)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    let mut g = c.benchmark_group("summary");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Bytes((N * 4) as u64));
    g.bench_function("f32_chunks_32768", |b| {
        b.iter(|| {
            let mut acc = SummaryAccumulator::new();
            for chunk in std::hint::black_box(&values).chunks(1 << 15) {
                acc.push(chunk);
            }
            acc.finish()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
