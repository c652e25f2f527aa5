//! Offline diff throughput: two f32 traces (KCM_BENCH_MB megabytes each, default 256, in
//! 16 MB tensors) compared with `--current` semantics (memory-mapped, every metric, all
//! cores), in GB/s of input (both files' tensor bytes), beside a plain memcpy of the same
//! bytes in the same run.
//!
//! `cargo bench -p tensor-diff-analyzer --bench throughput`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gguf_io::GgmlType;
use tensor_diff_analyzer::compare::Analyzer;
use tensor_stats::Tolerance;
use trace_format::{Role, RunMeta, StepMeta, TensorLayout, TensorMeta, TraceFile, TraceWriter};

const TENSOR_ELEMS: u64 = 4 << 20;

fn write_trace(path: &std::path::Path, n_tensors: u64, seed: u32, noise: f32) {
    let mut w = TraceWriter::new().unwrap();
    w.add_step(StepMeta {
        step: 0,
        positions: vec![0],
        tokens: vec![1],
    });
    let mut x = 0x9e37_79b9u32;
    let mut data = vec![0u8; (TENSOR_ELEMS * 4) as usize];
    for layer in 0..n_tensors {
        for (i, chunk) in data.chunks_exact_mut(4).enumerate() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let base = ((i as u32).wrapping_mul(2_654_435_761) >> 8) as f32 / (1 << 24) as f32;
            let v = base + noise * ((x ^ seed) as f32 / u32::MAX as f32);
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        let meta = TensorMeta {
            role: Role::KqvOut,
            layer: layer as i32,
            step: 0,
            ggml_name: format!("kqv_out-{layer}"),
            op: "RESHAPE".into(),
            layout: TensorLayout::contiguous(GgmlType::F32, [TENSOR_ELEMS, 1, 1, 1]).unwrap(),
            view_of: String::new(),
        };
        w.add_tensor(meta, &data, false).unwrap();
    }
    let run = RunMeta {
        target_layer: -1,
        trace_sources: false,
        complete: true,
        ..Default::default()
    };
    w.finish_to_path(&run, path).unwrap();
}

fn bench(c: &mut Criterion) {
    let mb: u64 = std::env::var("KCM_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let n_tensors = (mb << 20).div_ceil(TENSOR_ELEMS * 4).max(1);
    let dir = tempfile::tempdir().unwrap();
    let (rp, cp) = (dir.path().join("ref.gguf"), dir.path().join("cur.gguf"));
    write_trace(&rp, n_tensors, 0, 0.0);
    write_trace(&cp, n_tensors, 7, 1e-3);
    let (reference, current) = (TraceFile::open(&rp).unwrap(), TraceFile::open(&cp).unwrap());
    let input: u64 = reference
        .tensors
        .iter()
        .chain(&current.tensors)
        .map(|t| reference.data(t).len() as u64)
        .sum();
    let mut g = c.benchmark_group("offline_diff");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(input));
    g.bench_function("tensor-diff-analyzer --current", |b| {
        b.iter(|| {
            let mut a = Analyzer::new(&reference, None, Tolerance::default()).unwrap();
            tensor_diff_analyzer::compare_files(&mut a, &current, &cp).unwrap();
            assert_eq!(a.comparisons.len() as u64, n_tensors);
            a.comparisons.len()
        })
    });
    // memcpy of the same bytes (both files' tensor data) into one buffer.
    let mut dst = vec![0u8; input as usize];
    g.bench_function("memcpy of the same bytes", |b| {
        b.iter(|| {
            let mut at = 0;
            for (f, t) in reference
                .tensors
                .iter()
                .map(|t| (&reference, t))
                .chain(current.tensors.iter().map(|t| (&current, t)))
            {
                let src = f.data(t);
                dst[at..at + src.len()].copy_from_slice(&src);
                at += src.len();
            }
            std::hint::black_box(&dst);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
