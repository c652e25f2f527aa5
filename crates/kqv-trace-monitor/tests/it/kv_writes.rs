//! The capture learns what changed in a kept K/V view from the graph's writes into the
//! cache (`CaptureConfig::kv_audit`), so a step costs what it wrote, not the context:
//! on the generated tiny LLaMA through the real vendored llama.cpp, with flash attention
//! on and off, the views and revisions equal those of hashing everything every step and
//! of copying everything afresh, far fewer bytes are hashed, and planted faults are in
//! the trace: an old cell overwritten through the graph (a cache's index bug) at the
//! step it happens, a byte changed by no graph node (a kernel writing past its
//! destination) at the next audit, reported as such.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use ggml_trace::capture::fault::{self, Fault};
use ggml_trace::capture::{
    CaptureConfig, CaptureError, CaptureSink, CaptureStats, CapturedAttention, CapturedTensor,
    UnexplainedChange,
};
use ggml_trace::session::{self, RunInfo, RunOptions};
use kcm_cli::capture_args::{Options, SaveTarget};
use kcm_cli::sink::MonitorSink;
use test_support::LlamaArgs;
use trace_format::layout::differing_ranges;
use trace_format::{Role, StepMeta, TraceFile};

/// BOS, a leading "▁" and 41 byte tokens: with -ub 16 the prompt spans three ubatches.
const PROMPT: &str = "The quick brown fox jumps over a lazy dog";
/// Enough decode steps for several audits at --kv-audit 4 and one at 16.
const N_GEN: u32 = 20;

/// Two KV heads under four query heads (a K view's cell holds both heads), 3 layers.
fn model(dir: &Path) -> PathBuf {
    let path = dir.join("tiny-writes.gguf");
    let cfg = tiny_llama::TinyLlamaConfig {
        n_layer: 3,
        n_head: 4,
        n_head_kv: 2,
        head_dim: 64,
        n_embd: 256,
        ..Default::default()
    };
    tiny_llama::write_model(&path, &cfg).unwrap();
    path
}

/// Records every capture and every audit finding, and saves the trace.
struct Tee {
    inner: MonitorSink,
    seen: Vec<CapturedTensor>,
    unexplained: Vec<UnexplainedChange>,
    prompt_steps: u32,
}

impl CaptureSink for Tee {
    fn on_start(&mut self, info: &RunInfo) -> Result<(), CaptureError> {
        self.prompt_steps = (info.prompt_tokens.len() as u32).div_ceil(info.n_ubatch.max(1));
        self.inner.on_start(info)
    }
    fn on_step(&mut self, step: &StepMeta) -> bool {
        self.inner.on_step(step)
    }
    fn on_attention(&mut self, att: CapturedAttention) -> Result<(), CaptureError> {
        self.seen.extend(att.tensors.iter().cloned());
        self.inner.on_attention(att)
    }
    fn on_unexplained(&mut self, change: &UnexplainedChange) {
        self.unexplained.push(change.clone());
    }
}

struct Run {
    seen: Vec<CapturedTensor>,
    unexplained: Vec<UnexplainedChange>,
    prompt_steps: u32,
    stats: CaptureStats,
    trace: PathBuf,
}

fn run(model: &Path, flash: &str, keep: bool, kv_audit: u32, plant: Option<Fault>) -> Run {
    let trace = model.with_file_name(format!(
        "w-{flash}-{keep}-{kv_audit}-{}.gguf",
        plant.map_or("none".to_string(), |p| format!("{p:?}")
            .replace([' ', '{', '}', ':', ','], ""))
    ));
    let llama_args = LlamaArgs::new(model, PROMPT)
        .n(N_GEN)
        .ubatch(16)
        .threads(2)
        .greedy()
        .flash(flash == "on")
        .build();
    let opts = Options {
        save: Some(SaveTarget::Path(trace.clone())),
        quiet: true,
        llama_args: llama_args.clone(),
        ..Options::default()
    };
    let inner = MonitorSink::new(
        &opts,
        Box::new(io::sink()),
        Arc::new(AtomicBool::new(false)),
    )
    .unwrap();
    let mut tee = Tee {
        inner,
        seen: Vec::new(),
        unexplained: Vec::new(),
        prompt_steps: 0,
    };
    let run_opts = RunOptions {
        capture: CaptureConfig {
            from_step: 0,
            layer: None,
            trace_sources: true,
            keep,
            logits: false,
            kv_audit,
            nodes: None,
        },
        prefill_only: false,
        verbose: false,
        eval_callback: true,
    };
    fault::plant(plant);
    let result = session::run(&llama_args, run_opts, &mut tee);
    fault::plant(None);
    let (info, outcome) = result.unwrap();
    let Tee {
        inner,
        seen,
        unexplained,
        prompt_steps,
    } = tee;
    inner.finish(&info, &outcome).unwrap();
    assert_eq!(
        outcome.steps,
        prompt_steps + N_GEN,
        "the tiny model ran every step"
    );
    Run {
        seen,
        unexplained,
        prompt_steps,
        stats: outcome.capture,
        trace,
    }
}

type Key = (u32, i32, Role);

fn by_key(seen: &[CapturedTensor]) -> HashMap<Key, &CapturedTensor> {
    seen.iter()
        .map(|t| ((t.meta.step, t.meta.layer, t.meta.role), t))
        .collect()
}

/// Row size in bytes of a captured tensor's logical data.
fn row_bytes(t: &CapturedTensor) -> usize {
    t.data.len() / (t.meta.layout.n_elements() / t.meta.layout.ne[0]) as usize
}

/// Every revision names exactly the rows that differ from the previous capture of its
/// (layer, role), and the saved trace rebuilds every captured byte.
fn assert_revisions_exact_and_trace_complete(r: &Run, what: &str) {
    let mut last: HashMap<(i32, Role), &CapturedTensor> = HashMap::new();
    for t in &r.seen {
        let key = (t.meta.layer, t.meta.role);
        if let (Some(prev), Some(rev)) = (last.get(&key), &t.revision) {
            if let Some((_, ranges)) = &rev.since {
                assert_eq!(
                    *ranges,
                    differing_ranges(&prev.data, &t.data, row_bytes(t)),
                    "{what}: {key:?} step {}",
                    t.meta.step
                );
            }
        }
        last.insert(key, t);
    }
    let trace = TraceFile::open(&r.trace).unwrap();
    assert_eq!(trace.tensors.len(), r.seen.len(), "{what}");
    for (tt, t) in trace.tensors.iter().zip(&r.seen) {
        assert_eq!(tt.meta, t.meta, "{what}");
        assert_eq!(&*trace.data(tt), &t.data[..], "{what}: {}", tt.name);
    }
}

#[test]
fn graph_writes_give_the_views_of_hashing_everything_for_a_fraction_of_the_hashing() {
    let dir = tempfile::tempdir().unwrap();
    let model = model(dir.path());
    for flash in ["on", "off"] {
        let tracked = run(&model, flash, true, 16, None);
        let hashed = run(&model, flash, true, 1, None);
        let fresh = run(&model, flash, false, 1, None);
        assert_eq!(tracked.seen.len(), fresh.seen.len(), "{flash}");
        let (h, f) = (by_key(&hashed.seen), by_key(&fresh.seen));
        for t in &tracked.seen {
            let k = (t.meta.step, t.meta.layer, t.meta.role);
            assert_eq!(t.data, f[&k].data, "{flash}: {k:?} against a fresh copy");
            assert_eq!(t.data, h[&k].data, "{flash}: {k:?} against hashing");
            assert_eq!(
                t.revision
                    .as_ref()
                    .and_then(|r| r.since.as_ref())
                    .map(|s| &s.1),
                h[&k]
                    .revision
                    .as_ref()
                    .and_then(|r| r.since.as_ref())
                    .map(|s| &s.1),
                "{flash}: {k:?}: the same changed rows"
            );
        }
        assert_revisions_exact_and_trace_complete(&tracked, flash);
        assert!(
            tracked.unexplained.is_empty(),
            "{flash}: {:?}",
            tracked.unexplained
        );
        assert_eq!(tracked.stats.unexplained, 0);

        // Every K and V capture after a view's first (per layout) came from the writes,
        // except the audit at the 16th; hashing everything hashed every one.
        let kv = tracked
            .seen
            .iter()
            .filter(|t| matches!(t.meta.role, Role::K | Role::V))
            .count() as u64;
        assert_eq!(hashed.stats.tracked_gathers, 0, "{flash}");
        assert!(
            tracked.stats.tracked_gathers >= kv * 3 / 4,
            "{flash}: {} of {kv} K/V captures tracked",
            tracked.stats.tracked_gathers
        );
        assert!(
            tracked.stats.hashed_bytes * 3 < hashed.stats.hashed_bytes,
            "{flash}: hashed {} bytes, hashing everything {}",
            tracked.stats.hashed_bytes,
            hashed.stats.hashed_bytes
        );
    }
}

#[test]
fn an_old_cell_overwritten_through_the_graph_is_in_the_trace_at_its_step() {
    let dir = tempfile::tempdir().unwrap();
    let model = model(dir.path());
    for flash in ["on", "off"] {
        let probe = run(&model, flash, true, 16, None);
        let step = probe.prompt_steps + 5;
        let (layer, cell) = (1, 3);
        let plant = Some(Fault::GraphWrite { step, layer, cell });
        let tracked = run(&model, flash, true, 16, plant);
        let fresh = run(&model, flash, false, 1, plant);
        let (t, f) = (by_key(&tracked.seen), by_key(&fresh.seen));
        for (k, c) in &t {
            assert_eq!(c.data, f[k].data, "{flash}: {k:?} against a fresh copy");
        }
        // The planted write took effect: cell 3 of layer 1's K view changed at that step
        // (both heads' rows of it), where an honest decode step changes only a new cell.
        let (before, at) = (&t[&(step - 1, layer, Role::K)], &t[&(step, layer, Role::K)]);
        let row = row_bytes(at);
        let changed = differing_ranges(&before.data, &at.data, row);
        let n_kv = at.meta.layout.ne[1] as usize;
        let cell_rows: Vec<usize> = (0..2).map(|h| (h * n_kv + cell) * row).collect();
        for r in &cell_rows {
            assert!(
                changed.iter().any(|c| c.contains(r)),
                "{flash}: cell {cell} unchanged at step {step}: {changed:?}"
            );
        }
        assert_revisions_exact_and_trace_complete(&tracked, flash);
        assert!(
            tracked.unexplained.is_empty(),
            "{flash}: a graph write is no surprise"
        );
    }
}

#[test]
fn a_byte_no_graph_node_wrote_is_found_by_the_next_audit_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let model = model(dir.path());
    for flash in ["on", "off"] {
        let probe = run(&model, flash, true, 4, None);
        assert!(
            probe.unexplained.is_empty(),
            "{flash}: {:?}",
            probe.unexplained
        );
        let step = probe.prompt_steps + 5;
        let (layer, cell) = (1, 2);
        let plant = Some(Fault::HostWrite { step, layer, cell });
        let audited = run(&model, flash, true, 4, plant);
        // Hashing every step sees it at the step it happened.
        let hashed = run(&model, flash, true, 1, plant);
        let key = |s: u32| (s, layer, Role::K);
        let (a, h) = (by_key(&audited.seen), by_key(&hashed.seen));
        let row = row_bytes(h[&key(step)]);
        assert!(
            !differing_ranges(&h[&key(step - 1)].data, &h[&key(step)].data, row).is_empty(),
            "{flash}: the planted byte changed the view"
        );
        let found: Vec<&UnexplainedChange> = audited
            .unexplained
            .iter()
            .filter(|c| c.layer == layer && c.role == Role::K)
            .collect();
        assert_eq!(found.len(), 1, "{flash}: {:?}", audited.unexplained);
        let at = found[0].step;
        assert!(
            (step..step + 4).contains(&at),
            "{flash}: planted before step {step}, found at {at}"
        );
        assert!(found[0].bytes > 0);
        assert_eq!(audited.stats.unexplained, 1, "{flash}");
        // Until the audit the trace holds the view without the planted byte; from the
        // audit on, exactly what hashing every step holds.
        let n_kv = h[&key(step)].meta.layout.ne[1] as usize;
        let cell_rows: Vec<std::ops::Range<usize>> = (0..2)
            .map(|head| (head * n_kv + cell) * row..(head * n_kv + cell + 1) * row)
            .collect();
        for s in step..at {
            let (got, want, old) = (&a[&key(s)].data, &h[&key(s)].data, &h[&key(step - 1)].data);
            let mut expect = want.to_vec();
            for r in &cell_rows {
                expect[r.clone()].copy_from_slice(&old[r.clone()]);
            }
            assert_eq!(**got, expect, "{flash}: step {s}: all but the planted cell");
        }
        for (k, c) in &a {
            if k.0 >= at || k.0 < step || (k.1, k.2) != (layer, Role::K) {
                assert_eq!(c.data, h[k].data, "{flash}: {k:?}");
            }
        }
        assert_revisions_exact_and_trace_complete(&audited, flash);
    }
}
