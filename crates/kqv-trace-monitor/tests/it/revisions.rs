//! KV-cache views and masks are kept between steps (`Revision`): on the generated tiny
//! LLaMA through the real vendored llama.cpp, with flash attention on and off, every
//! revision names the previous capture of its (layer, role) and exactly the rows whose
//! bytes differ from it (the oracle compares the captured bytes step by step), a decode
//! step changes one cell's rows of K (and of V with flash attention), the monitor's
//! statistics with reused chunks equal the from-scratch ones bit for bit, and a trace
//! saved with revisions spooled as changes holds every captured byte.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use ggml_trace::capture::{
    CaptureConfig, CaptureError, CaptureSink, CapturedAttention, CapturedTensor,
};
use ggml_trace::session::{self, RunInfo, RunOptions};
use kcm_cli::capture_args::{Options, SaveTarget};
use kcm_cli::sink::MonitorSink;
use kcm_cli::stats::{summarize, Stats};
use test_support::storage::KvStorage;
use test_support::LlamaArgs;
use trace_format::layout::differing_ranges;
use trace_format::{Role, StepMeta, TraceFile};

/// BOS, a leading "▁" and 41 byte tokens: with -ub 16 the prompt spans three ubatches.
const PROMPT: &str = "The quick brown fox jumps over a lazy dog";
const N_GEN: usize = 6;

/// Two KV heads under four query heads: the K view is permuted (cells hold both heads).
/// head_dim 64 makes each K/V view 64 KiB, enough blocks for the capture to hash them
/// on llama.cpp's threadpool (`pool_hash`) when it runs with two threads.
fn model(dir: &Path) -> PathBuf {
    let path = dir.join("tiny-gqa.gguf");
    let cfg = tiny_llama::TinyLlamaConfig {
        n_head: 4,
        n_head_kv: 2,
        head_dim: 64,
        n_embd: 256,
        ..Default::default()
    };
    tiny_llama::write_model(&path, &cfg).unwrap();
    path
}

/// Records every capture (sharing the bytes, so the capture copies its kept buffer
/// once when it next changes) and passes it on.
struct Tee {
    inner: MonitorSink,
    seen: Vec<CapturedTensor>,
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
}

fn run(
    model: &Path,
    flash: &str,
    threads: &str,
    keep: bool,
    save: &Path,
    storage: KvStorage,
) -> (Vec<CapturedTensor>, u32) {
    let llama_args = LlamaArgs::new(model, PROMPT)
        .n(N_GEN as u32)
        .ubatch(16)
        .arg("-t")
        .arg(threads)
        .greedy()
        .arg("-fa")
        .arg(flash)
        .build();
    let opts = Options {
        save: Some(SaveTarget::Path(save.to_path_buf())),
        kv_storage: storage,
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
        prompt_steps: 0,
    };
    let run_opts = RunOptions {
        capture: CaptureConfig {
            from_step: 0,
            layer: None,
            trace_sources: true,
            keep,
            logits: false,
            kv_audit: ggml_trace::capture::DEFAULT_KV_AUDIT,
            nodes: None,
        },
        prefill_only: false,
        verbose: false,
        eval_callback: true,
    };
    let (info, outcome) = session::run(&llama_args, run_opts, &mut tee).unwrap();
    let Tee {
        inner,
        seen,
        prompt_steps,
    } = tee;
    inner.finish(&info, &outcome).unwrap();
    (seen, prompt_steps)
}

#[test]
fn revisions_name_exactly_the_changed_rows_and_stats_and_traces_stay_exact() {
    let dir = tempfile::tempdir().unwrap();
    let model = model(dir.path());
    // The saved trace in both storages (full, delta): each holds every captured byte.
    for (flash, storage) in ["on", "off"]
        .into_iter()
        .flat_map(|f| test_support::storage::BOTH.map(|s| (f, s)))
    {
        let save = dir
            .path()
            .join(format!("rev-{flash}-{}.gguf", storage.name()));
        let (seen, prompt_steps) = run(&model, flash, "2", true, &save, storage);
        let flash = format!("{flash} {}", storage.name());
        let flash = flash.as_str();
        assert!(prompt_steps >= 3, "{flash}: {prompt_steps} prompt steps");

        // Revisions: present exactly for K/V/mask, chained per (layer, role), exact rows.
        let mut last: HashMap<(i32, Role), &CapturedTensor> = HashMap::new();
        let mut ids = std::collections::HashSet::new();
        let (mut compared, mut decode_k_checked) = (0usize, 0usize);
        for t in &seen {
            let kept = matches!(t.meta.role, Role::K | Role::V | Role::Mask);
            let Some(rev) = &t.revision else {
                assert!(!kept, "{flash}: {} has no revision", t.meta.ggml_name);
                continue;
            };
            assert!(kept, "{flash}: {:?} has a revision", t.meta.role);
            assert!(ids.insert(rev.id), "revision id {} reused", rev.id);
            let key = (t.meta.layer, t.meta.role);
            match (last.get(&key), &rev.since) {
                (Some(prev), Some((since, ranges))) => {
                    let prev_rev = prev.revision.as_ref().unwrap();
                    assert_eq!(*since, prev_rev.id, "{flash}: {key:?} step {}", t.meta.step);
                    assert_eq!(prev.meta.layout, t.meta.layout);
                    let row =
                        t.data.len() / (t.meta.layout.n_elements() / t.meta.layout.ne[0]) as usize;
                    assert_eq!(
                        *ranges,
                        differing_ranges(&prev.data, &t.data, row),
                        "{flash}: {key:?} step {}",
                        t.meta.step
                    );
                    compared += 1;
                    // A decode step writes one cell: n_head_kv rows of the K view.
                    if t.meta.role == Role::K && t.meta.step >= prompt_steps {
                        let changed: usize = ranges.iter().map(|r| r.len()).sum();
                        assert_eq!(
                            changed,
                            2 * row,
                            "{flash}: step {} layer {}",
                            t.meta.step,
                            t.meta.layer
                        );
                        decode_k_checked += 1;
                    }
                }
                (Some(prev), None) => {
                    // Only a changed layout starts a new chain.
                    assert_ne!(
                        prev.meta.layout, t.meta.layout,
                        "{flash}: {key:?} step {}",
                        t.meta.step
                    );
                }
                (None, since) => assert!(since.is_none()),
            }
            last.insert(key, t);
        }
        assert!(compared > 20, "{flash}: only {compared} revisions compared");
        let max_step = seen.iter().map(|t| t.meta.step).max().unwrap_or(0);
        // Every decode step (the tiny model may end generation early) of both layers.
        let decode_steps = (max_step + 1 - prompt_steps) as usize;
        assert!(decode_steps >= 3, "{flash}: {decode_steps} decode steps");
        assert_eq!(
            decode_k_checked,
            2 * decode_steps,
            "{flash}: prompt steps {prompt_steps}, last step {max_step}"
        );

        // Statistics: reused chunks give the from-scratch bits, and some were reused.
        let mut stats = Stats::new();
        let mut decode_k_summaries = 0;
        for t in &seen {
            let computed = stats.computed_chunks;
            let a = stats.summarize(t).unwrap();
            let b = summarize(t).unwrap();
            assert_eq!(
                [
                    a.mean.to_bits(),
                    a.std.to_bits(),
                    a.min.to_bits(),
                    a.max.to_bits()
                ],
                [
                    b.mean.to_bits(),
                    b.std.to_bits(),
                    b.min.to_bits(),
                    b.max.to_bits()
                ],
                "{flash}: {} step {}",
                t.meta.ggml_name,
                t.meta.step
            );
            assert_eq!(
                (a.count, a.nan, a.pos_inf, a.neg_inf),
                (b.count, b.nan, b.pos_inf, b.neg_inf)
            );
            // A decode step's K view changed in one cell (two rows): at most two chunks
            // are summarised again.
            if t.meta.role == Role::K && t.meta.step >= prompt_steps {
                assert!(
                    stats.computed_chunks - computed <= 2,
                    "{flash}: step {}",
                    t.meta.step
                );
                decode_k_summaries += 1;
            }
        }
        assert_eq!(decode_k_summaries, decode_k_checked);
        assert!(stats.reused_chunks > 0);

        // The saved trace holds every captured byte.
        let trace = TraceFile::open(&save).unwrap();
        assert_eq!(trace.tensors.len(), seen.len(), "{flash}");
        for (tt, t) in trace.tensors.iter().zip(&seen) {
            assert_eq!(tt.meta, t.meta, "{flash}");
            assert_eq!(trace.data(tt), &t.data[..], "{flash}: {}", tt.name);
        }
    }
}

/// The kept copies are what copying everything afresh gives: runs with and without
/// keeping capture the same bytes, step by step, with flash attention on and off, on one
/// thread and on two (where the views are hashed on llama.cpp's threadpool); without
/// keeping there are no revisions.
#[test]
fn kept_views_hold_the_bytes_of_a_fresh_copy() {
    let dir = tempfile::tempdir().unwrap();
    let model = model(dir.path());
    for (flash, threads) in [("on", "1"), ("off", "1"), ("on", "2"), ("off", "2")] {
        let flash = flash.to_string() + " -t " + threads;
        let fa = &flash[..flash.find(' ').unwrap_or(flash.len())];
        let delta = KvStorage::Delta;
        let (kept, _) = run(
            &model,
            fa,
            threads,
            true,
            &dir.path().join("kept.gguf"),
            delta,
        );
        let (fresh, _) = run(
            &model,
            fa,
            threads,
            false,
            &dir.path().join("fresh.gguf"),
            delta,
        );
        assert_eq!(kept.len(), fresh.len(), "{flash}");
        let mut with_revision = 0;
        for (k, f) in kept.iter().zip(&fresh) {
            assert_eq!(k.meta, f.meta, "{flash}");
            assert_eq!(
                k.data, f.data,
                "{flash}: {} step {}",
                k.meta.ggml_name, k.meta.step
            );
            assert!(f.revision.is_none());
            with_revision += usize::from(k.revision.is_some());
        }
        assert!(with_revision > 0, "{flash}");
        // The traces, one spooled with changes and one whole, hold the same tensors: the
        // same file once materialized (version 2 stores the first as deltas, the second
        // whole, so their files differ).
        let a = trace_format::materialize::full_bytes(&dir.path().join("kept.gguf")).unwrap();
        let b = trace_format::materialize::full_bytes(&dir.path().join("fresh.gguf")).unwrap();
        assert!(a == b, "{flash}: the traces differ");
    }
}
