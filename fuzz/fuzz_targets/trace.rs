//! Fuzz the trace layer, structure-aware (issue 14). The input's first byte picks an honest
//! trace (the tiny model traced with flash attention, layer 0, or a synthetic trace of six
//! groups); the rest is a program of mutations (`test_support::hostile::mutate`: dims,
//! strides, labels, roles, array lengths, run flags, duplicated tensors and attention
//! records, types, data, hostile strings). The mutated trace is written with gguf-io's
//! writer, so the GGUF layer is always well formed, then opened with
//! `trace_format::TraceFile` and every group is verified with `attn_verify`.
//!
//! Nothing may panic, and nothing may allocate past libFuzzer's `-malloc_limit_mb`.
//! Groups whose claimed work (tokens x heads x cells x head size, plus the Q-head
//! diagnosis) exceeds `WORK_BUDGET` are skipped, so the fuzzer spends its time on panics
//! and allocations rather than on the known unbounded loops (the hostile-trace test covers
//! those with a time limit).
#![no_main]

use std::sync::OnceLock;

use gguf_io::GgufFile;
use libfuzzer_sys::fuzz_target;
use test_support::hostile::{self, Editable};
use trace_format::{Role, TraceFile, TracedTensor};

/// Multiply-adds a group may claim before the target skips it.
const WORK_BUDGET: u64 = 1 << 24;

fn bases() -> &'static [Editable] {
    static BASES: OnceLock<Vec<Editable>> = OnceLock::new();
    BASES.get_or_init(|| {
        let synthetic = hostile::synthetic_trace(6, 2).expect("synthetic trace");
        vec![
            Editable::from_bytes(include_bytes!("../seeds/tiny-fa-layer0.gguf"))
                .expect("the seed trace parses"),
            Editable::from_bytes(&synthetic).expect("the synthetic trace parses"),
        ]
    })
}

/// What a group's recomputation and diagnosis claim to cost, from its shapes (every
/// dimension at least 1, since loops over a zero-length dimension still run the outer ones).
fn claimed_work(tensors: &[&TracedTensor]) -> u64 {
    let ne = |role: Role| {
        tensors
            .iter()
            .filter(|t| t.meta.role == role)
            .map(|t| t.meta.layout.ne.map(|x| x.max(1)))
            .fold([1u64; 4], |a, b| std::array::from_fn(|i| a[i].max(b[i])))
    };
    let (q, k, v) = (ne(Role::Q), ne(Role::K), ne(Role::V));
    let rows = q[1].saturating_mul(q[2]).saturating_mul(q[3]);
    let cells = k[1].max(v[0]).max(v[1]);
    let dims = q[0].saturating_add(v[0]).saturating_add(v[1]);
    let attention = rows.saturating_mul(cells).saturating_mul(dims);
    let diagnosis = q[2].saturating_mul(q[2]).saturating_mul(q[1]).saturating_mul(dims);
    let sizes = tensors
        .iter()
        .map(|t| t.meta.layout.ne.iter().map(|&x| x.max(1)).fold(1u64, u64::saturating_mul))
        .fold(0u64, u64::saturating_add);
    attention.saturating_add(diagnosis).saturating_add(sizes)
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, program)) = data.split_first() else {
        return;
    };
    let mut e = bases()[which as usize % bases().len()].clone();
    hostile::mutate(&mut e, program);
    let Ok(bytes) = e.to_bytes() else {
        return;
    };
    let file = GgufFile::from_bytes(bytes).expect("gguf-io reads what it wrote");
    let Ok(trace) = TraceFile::from_gguf(file) else {
        return;
    };
    for ((step, layer), tensors) in trace.groups() {
        if claimed_work(&tensors) > WORK_BUDGET {
            continue;
        }
        if let Ok(attn_verify::Outcome::Checked(c)) =
            attn_verify::check_in_trace(&trace, step, layer)
        {
            let _ = attn_verify::render::table_row(&c);
            let _ = attn_verify::render::verdict_line(&c);
        }
    }
});
