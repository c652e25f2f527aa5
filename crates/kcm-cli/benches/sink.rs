//! The monitor's sink on one decode step shaped like gemma-3-270m's (18 layers, 4 query
//! heads over 1 KV head, head_dim 256, 256 KV cells): per layer `kqv_out` (sharing the
//! attention output's bytes, as with flash attention), the attention output, Q, the K and
//! V views with one new cell since the previous step (a `Revision`), and the mask. It
//! measures what `overhead.rs` reports as "sink ms/token" without llama.cpp around it:
//! the statistics (chunk trees) and the formatted lines, to an `io::sink`.
//!
//! `cargo bench -p kqv-trace-monitor --bench sink`

use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use ggml_trace::capture::{CaptureSink, CapturedAttention, CapturedTensor, Revision};
use gguf_io::quant::f32_to_f16;
use gguf_io::GgmlType;
use kcm_cli::capture_args::Options;
use kcm_cli::sink::MonitorSink;
use trace_format::{AttnParams, Role, StepMeta, TensorLayout, TensorMeta};

const LAYERS: i32 = 18;
const HEAD_DIM: u64 = 256;
const N_KV: u64 = 256;
const N_HEAD: u64 = 4;

fn tensor(
    role: Role,
    layer: i32,
    ty: GgmlType,
    ne: [u64; 4],
    data: Arc<Vec<u8>>,
    revision: Option<Revision>,
) -> CapturedTensor {
    CapturedTensor {
        meta: TensorMeta {
            role,
            layer,
            step: 0,
            ggml_name: format!("{}-{layer}", role.name()),
            op: "VIEW".into(),
            layout: TensorLayout::contiguous(ty, ne).expect("layout"),
            view_of: String::new(),
        },
        data,
        revision,
        graph_order: None,
    }
}

fn f16_bytes(n: u64, seed: u64) -> Vec<u8> {
    (0..n)
        .flat_map(|i| f32_to_f16(((i * 7 + seed) as f32 * 0.013).sin()).to_le_bytes())
        .collect()
}

fn f32_bytes(n: u64, seed: u64) -> Arc<Vec<u8>> {
    Arc::new(
        (0..n)
            .flat_map(|i| (((i * 3 + seed) as f32) * 0.021).cos().to_le_bytes())
            .collect(),
    )
}

/// The K and V views of every layer, a revision id each, and the next cell to write;
/// the attention output and Q (made once: their statistics are computed afresh anyway).
struct Cache {
    out: Arc<Vec<u8>>,
    q: Arc<Vec<u8>>,
    views: Vec<Arc<Vec<u8>>>,
    ids: Vec<u64>,
    next_id: u64,
    cell: u64,
}

impl Cache {
    fn new() -> Self {
        Cache {
            out: f32_bytes(HEAD_DIM * N_HEAD, 1),
            q: f32_bytes(HEAD_DIM * N_HEAD, 2),
            views: (0..2 * LAYERS as u64)
                .map(|i| Arc::new(f16_bytes(HEAD_DIM * N_KV, i)))
                .collect(),
            ids: vec![0; 2 * LAYERS as usize],
            next_id: 1,
            cell: 6,
        }
    }

    /// One decode step of every layer handed to `sink`.
    fn step(&mut self, sink: &mut MonitorSink, step: u32) {
        sink.on_step(&StepMeta {
            step,
            positions: vec![self.cell as i32],
            tokens: vec![1],
        });
        let row = (HEAD_DIM * 2) as usize;
        let at = (self.cell % N_KV) as usize * row;
        for layer in 0..LAYERS {
            let out = self.out.clone();
            let mut tensors = vec![
                tensor(
                    Role::KqvOut,
                    layer,
                    GgmlType::F32,
                    [1024, 1, 1, 1],
                    out.clone(),
                    None,
                ),
                tensor(
                    Role::Attn,
                    layer,
                    GgmlType::F32,
                    [HEAD_DIM, N_HEAD, 1, 1],
                    out,
                    None,
                ),
                tensor(
                    Role::Q,
                    layer,
                    GgmlType::F32,
                    [HEAD_DIM, 1, N_HEAD, 1],
                    self.q.clone(),
                    None,
                ),
            ];
            for (r, role) in [Role::K, Role::V].into_iter().enumerate() {
                let i = 2 * layer as usize + r;
                let view = Arc::make_mut(&mut self.views[i]);
                for b in &mut view[at..at + row] {
                    *b = b.wrapping_add(1) & 0x3b;
                }
                let id = self.next_id;
                self.next_id += 1;
                let since = (self.ids[i] > 0)
                    .then(|| (self.ids[i], std::iter::once(at..at + row).collect()));
                self.ids[i] = id;
                tensors.push(tensor(
                    role,
                    layer,
                    GgmlType::F16,
                    [HEAD_DIM, N_KV, 1, 1],
                    self.views[i].clone(),
                    Some(Revision { id, since }),
                ));
            }
            let mask: Vec<u8> = (0..N_KV)
                .flat_map(|j| {
                    let v: u16 = if j <= self.cell % N_KV { 0 } else { 0xfc00 };
                    v.to_le_bytes()
                })
                .collect();
            tensors.push(tensor(
                Role::Mask,
                layer,
                GgmlType::F16,
                [N_KV, 1, 1, 1],
                Arc::new(mask),
                None,
            ));
            sink.on_attention(CapturedAttention {
                step,
                layer,
                op: "FLASH_ATTN_EXT".into(),
                params: AttnParams::default(),
                backend: "CPU".into(),
                tensors,
                rotation: None,
                cross: false,
            })
            .expect("sink");
        }
        self.cell += 1;
    }
}

fn bench(c: &mut Criterion) {
    let opts = Options {
        quiet: true,
        ..Options::default()
    };
    let mut sink = MonitorSink::new(
        &opts,
        Box::new(io::sink()),
        Arc::new(AtomicBool::new(false)),
    )
    .expect("sink");
    let mut cache = Cache::new();
    let mut step = 0u32;
    cache.step(&mut sink, step);
    let mut g = c.benchmark_group("monitor sink (statistics lines, no save)");
    g.bench_function("one gemma-3-270m decode step, 18 layers", |b| {
        b.iter(|| {
            step += 1;
            cache.step(&mut sink, step);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
