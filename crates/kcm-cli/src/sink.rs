//! What the monitor does with each capture: a statistics line, and the trace writer.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use trace_format::json::number as num;

use crate::progress::{Counters, Progress};
use attn_verify::render::{self, VerdictKey};
use attn_verify::{Fingerprints, Group, KernelFacts, Outcome};
use ggml_trace::capture::{
    CaptureError, CaptureSink, CapturedAttention, CapturedTensor, StepOutput,
};
use ggml_trace::session::{RunInfo, RunOutcome};
use serde_json::json;
use tensor_stats::{Sci, Summary};
use trace_format::{AttnRecord, RunMeta, StepMeta, TraceError, TraceWriter};

use crate::capture_args::{Options, SaveTarget};
use crate::stats::Stats;
use crate::trace::MonitorError;

pub struct MonitorSink {
    out: Box<dyn Write>,
    json: bool,
    writer: Option<TraceWriter>,
    save: Option<SaveTarget>,
    stop: Arc<AtomicBool>,
    header_printed: bool,
    /// The attention op the graph really used (resolves `-fa auto`), self-attention.
    seen_op: Option<String>,
    /// Encoder-decoder models: the op cross-attention used and the number of decoder
    /// layers whose cross-attention was captured (recorded as layers `n_layer + il`).
    cross_op: Option<String>,
    n_cross_layer: u32,
    n_layer: u32,
    target_layer: Option<i32>,
    trace_sources: bool,
    /// `--tensor-filter` patterns, recorded in the trace.
    tensor_filter: Vec<String>,
    n_steps: u32,
    /// `--verify`: checks each (step, layer) as it is captured.
    verifier: Option<Verifier>,
    progress: Progress,
    counters: Counters,
    stats: Stats,
    /// llama.cpp's (`n_threads`, `n_threads_batch`), from `on_start`.
    threads: (u32, u32),
    /// The threads the current step's graph is computed with (llama.cpp's rule:
    /// `n_threads_batch` for a ubatch of more than one token).
    step_threads: u32,
    /// Rotation per layer as the graph showed it (see [`LayerRotation`]).
    rotation: LayerRotation,
}

/// llama.cpp's Hadamard rotation per layer, as the capture saw it in the graph
/// (`ggml_trace::capture::Rotation`): what the trace records as
/// `kqv_trace.run.rotated_k` / `rotated_v`.
#[derive(Default)]
pub struct LayerRotation {
    k: std::collections::BTreeMap<i32, bool>,
    v: std::collections::BTreeMap<i32, Option<bool>>,
    /// Layers a `kqv_out_unrotated` arrived for (V rotated, when the write of its V cache
    /// was not seen).
    unrotated: std::collections::BTreeSet<i32>,
}

impl LayerRotation {
    /// Note what one capture shows.
    pub fn observe(&mut self, att: &CapturedAttention) {
        // Cross-attention reads no cache (K and V are the encoder output's projections):
        // nothing rotated, and its layer (n_layer + il) has no slot.
        if att.cross {
            return;
        }
        if let Some(r) = att.rotation {
            self.k.insert(att.layer, r.k);
            let v = self.v.entry(att.layer).or_insert(r.v);
            if v.is_none() {
                *v = r.v;
            }
        }
        if att
            .tensors
            .iter()
            .any(|t| t.meta.role == trace_format::Role::KqvOutUnrotated)
        {
            self.unrotated.insert(att.layer);
        }
    }

    /// Record it in `run`: per layer (None for a layer not seen) and `kv_rotation` as any
    /// layer rotated. Nothing seen (no attention captured): `run` keeps its guess.
    pub fn record(&self, run: &mut RunMeta) {
        if self.k.is_empty() {
            return;
        }
        let n = run.n_layer as usize;
        let (mut k, mut v) = (vec![None; n], vec![None; n]);
        for (&layer, &rot) in &self.k {
            let Ok(l) = usize::try_from(layer) else {
                continue;
            };
            if l >= n {
                continue;
            }
            k[l] = Some(rot);
            let seen_v = self.v.get(&layer).copied().flatten();
            v[l] = Some(seen_v.unwrap_or(self.unrotated.contains(&layer)));
        }
        run.kv_rotation = k.contains(&Some(true)) || v.contains(&Some(true));
        run.rotated_k_layers = k;
        run.rotated_v_layers = v;
    }
}

/// `--verify` state: the current step's positions, the previous step's input fingerprints
/// per layer (for the stale-buffer check; hashes only, no data kept), and the counts.
#[derive(Default)]
pub struct Verifier {
    positions: Vec<i32>,
    /// The current and the previous step's tokens.
    tokens: Vec<i32>,
    previous_tokens: Option<Vec<i32>>,
    /// The SIMD ggml-cpu was built with ([`ggml_trace::cpu_simd`]).
    simd: String,
    previous: std::collections::HashMap<i32, (u32, Fingerprints)>,
    pub verified: usize,
    pub failed: usize,
    pub missing: usize,
}

impl Verifier {
    /// Check one captured attention; the lines to print.
    fn check(
        &mut self,
        att: &CapturedAttention,
        n_threads: u32,
        json: bool,
    ) -> Result<Vec<String>, String> {
        let mut group = Group::from_tensors(
            att.step,
            att.layer,
            &att.op,
            att.params,
            &self.positions,
            att.tensors.iter().map(|t| (&t.meta, t.data.as_slice())),
        )
        .map_err(|e| format!("verifying step {} layer {}: {e}", att.step, att.layer))?;
        group.kernel = KernelFacts {
            backend: att.backend.clone(),
            n_threads,
            simd: self.simd.clone(),
        };
        group.same_tokens_as_previous = self.previous_tokens.as_ref().map(|p| *p == self.tokens);
        let prev = self.previous.get(&att.layer).map(|(s, f)| (*s, f));
        let result = attn_verify::check(&group, prev)
            .map_err(|e| format!("verifying step {} layer {}: {e}", att.step, att.layer))?;
        self.previous
            .insert(att.layer, (att.step, group.fingerprints()));
        Ok(match result {
            Outcome::Checked(c) => {
                if c.pass {
                    self.verified += 1;
                } else {
                    self.failed += 1;
                }
                if json {
                    vec![render::checked_json(&c, VerdictKey::Verify).to_string()]
                } else {
                    let mut v = vec![render::verdict_line(&c)];
                    v.extend(render::diagnosis_lines(&c));
                    v
                }
            }
            Outcome::Missing(m) => {
                self.missing += 1;
                if json {
                    vec![
                        render::missing_json(att.step, att.layer, &m, VerdictKey::Verify)
                            .to_string(),
                    ]
                } else {
                    vec![format!(
                        "verify step {} layer {}: missing {m}: {}",
                        att.step,
                        att.layer,
                        m.hint(None)
                    )]
                }
            }
        })
    }

    fn summary(&self, json: bool) -> String {
        if json {
            json!({"verify_summary": {"verified": self.verified, "failed": self.failed,
                                      "missing": self.missing}})
            .to_string()
        } else {
            format!(
                "verify: {}",
                render::summary_line(self.verified, self.failed, self.missing)
            )
        }
    }
}

fn shape(ne: &[u64; 4]) -> String {
    let [a, b, c, d] = ne;
    format!("[{a},{b},{c},{d}]")
}

impl MonitorSink {
    pub fn new(
        opts: &Options,
        out: Box<dyn Write>,
        stop: Arc<AtomicBool>,
    ) -> Result<Self, MonitorError> {
        Ok(Self {
            out,
            json: opts.json,
            writer: if opts.save.is_some() {
                Some(TraceWriter::with_storage(opts.kv_storage)?)
            } else {
                None
            },
            save: opts.save.clone(),
            stop,
            header_printed: false,
            seen_op: None,
            cross_op: None,
            n_cross_layer: 0,
            n_layer: 0,
            target_layer: opts.layer,
            trace_sources: opts.trace_sources,
            tensor_filter: opts.tensor_filter.clone(),
            n_steps: 0,
            verifier: opts.verify.then(|| Verifier {
                simd: ggml_trace::cpu_simd(),
                ..Verifier::default()
            }),
            progress: Progress::hidden(),
            counters: Counters::default(),
            stats: Stats::new(),
            threads: (0, 0),
            step_threads: 0,
            rotation: LayerRotation::default(),
        })
    }

    /// Show a progress line on stderr while tracing (see [`Progress`]); only when the
    /// statistics do not go to the terminal themselves.
    pub fn with_progress(mut self, progress: Progress) -> Self {
        self.progress = progress;
        self
    }

    fn line(&mut self, t: &CapturedTensor, s: &Summary) -> std::io::Result<()> {
        let m = &t.meta;
        if self.json {
            let v = json!({
                "step": m.step, "layer": m.layer, "role": m.role.name(), "name": m.ggml_name,
                "op": m.op, "type": m.layout.ty.name(), "shape": m.layout.ne, "nb": m.layout.nb,
                "count": s.count, "mean": num(s.mean), "std": num(s.std), "min": num(s.min),
                "max": num(s.max), "nan": s.nan, "inf": s.inf(),
            });
            return writeln!(self.out, "{v}");
        }
        if !self.header_printed {
            writeln!(
                self.out,
                "{:>5} {:>5} {:<17} {:<6} {:<20} {:>13} {:>13} {:>13} {:>13} {:>5} {:>5}  name",
                "step", "layer", "role", "type", "shape", "mean", "std", "min", "max", "nan", "inf"
            )?;
            self.header_printed = true;
        }
        writeln!(
            self.out,
            "{:>5} {:>5} {:<17} {:<6} {:<20} {:>13} {:>13} {:>13} {:>13} {:>5} {:>5}  {}",
            m.step,
            m.layer,
            m.role.name(),
            m.layout.ty.name(),
            shape(&m.layout.ne),
            Sci(s.mean),
            Sci(s.std),
            Sci(s.min),
            Sci(s.max),
            s.nan,
            s.inf(),
            m.ggml_name
        )
    }

    /// Flush statistics and write the trace (if asked).
    pub fn finish(mut self, info: &RunInfo, outcome: &RunOutcome) -> Result<(), MonitorError> {
        self.progress.clear();
        if let Some(v) = &self.verifier {
            let line = v.summary(self.json);
            self.write_line(&line)
                .map_err(|e| MonitorError::Io(std::io::Error::other(e)))?;
        }
        // Statistics are buffered: a reader that closed the pipe (`| head`) is often only
        // noticed here. As in `on_attention`, that must not cost the trace.
        if let Err(e) = self.out.flush() {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                return Err(e.into());
            }
        }
        let Some(writer) = self.writer.take() else {
            return self.verdict();
        };
        let base = run_meta(info, true);
        // What the graph really did, when an attention op was seen; else as asked.
        let flash_attn = match self.seen_op.as_deref() {
            Some("FLASH_ATTN_EXT") => "on".into(),
            Some(_) => "off".into(),
            None => base.flash_attn.clone(),
        };
        let mut run = RunMeta {
            description: "kqv-trace-monitor trace of kqv_out and its attention inputs".into(),
            flash_attn,
            target_layer: self.target_layer.unwrap_or(-1),
            trace_sources: self.trace_sources,
            complete: !outcome.interrupted,
            tensor_filter: self.tensor_filter.clone(),
            rpc_read_bytes: if info.rpc_endpoints.is_empty() {
                Vec::new()
            } else {
                outcome.remote_read_bytes.clone()
            },
            ..base
        };
        if self.n_cross_layer > 0 {
            run.n_cross_layer = self.n_cross_layer;
            run.cross_flash_attn = match self.cross_op.as_deref() {
                Some("FLASH_ATTN_EXT") => "on",
                _ => "off",
            }
            .into();
        }
        // What the graph showed replaces the guess from the cache types.
        self.rotation.record(&mut run);
        match &self.save {
            Some(SaveTarget::Path(p)) => save_to_path(writer, &run, p)?,
            Some(SaveTarget::Stdout) => {
                let out = std::io::BufWriter::new(std::io::stdout().lock());
                let saved = writer
                    .finish(&run, out)
                    .and_then(|mut out| Ok(out.flush()?));
                // The reader closed the pipe (`| gguf-reader -` stops after the header,
                // `| head -c`): it has what it wanted, so end quietly, as gguf-reader does.
                if let Err(e) = saved {
                    if !is_broken_pipe(&e) {
                        return Err(e.into());
                    }
                }
            }
            None => {}
        }
        self.verdict()
    }

    /// `--verify`: an error when some group failed or could not be checked.
    fn verdict(&self) -> Result<(), MonitorError> {
        match &self.verifier {
            Some(v) if v.failed + v.missing > 0 => Err(MonitorError::Verify {
                failed: v.failed,
                missing: v.missing,
                total: v.verified + v.failed + v.missing,
            }),
            _ => Ok(()),
        }
    }

    /// One line of output; a closed pipe silences the output instead of failing.
    fn write_line(&mut self, line: &str) -> Result<(), CaptureError> {
        let r = writeln!(self.out, "{line}");
        self.written(r)
    }

    /// The outcome of writing statistics: a closed pipe (nobody reads them any more)
    /// silences the output and tracing goes on quietly; any other error stops the run.
    fn written(&mut self, r: std::io::Result<()>) -> Result<(), CaptureError> {
        match r {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                self.out = Box::new(std::io::sink());
                Ok(())
            }
            Err(e) => Err(CaptureError::Write {
                what: "writing statistics",
                source: e,
            }),
            Ok(()) => Ok(()),
        }
    }
}

fn is_broken_pipe(e: &TraceError) -> bool {
    let io = match e {
        TraceError::Io(e) | TraceError::Gguf(gguf_io::GgufError::Io(e)) => e,
        _ => return false,
    };
    io.kind() == std::io::ErrorKind::BrokenPipe
}

/// Save to a path. A regular file (or a new path) gets the trace atomically, through any
/// symlink to the file it names; what cannot be renamed over (a device such as
/// `/dev/stdout` or `/dev/full`, a FIFO) is written to directly: renaming the temporary
/// file over it would replace the device node or the pipe with a regular file.
fn save_to_path(
    writer: TraceWriter,
    run: &RunMeta,
    path: &std::path::Path,
) -> Result<(), TraceError> {
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() && !m.is_dir() => {
            let file = std::fs::OpenOptions::new().write(true).open(path)?;
            let out = writer.finish(run, std::io::BufWriter::with_capacity(1 << 20, file))?;
            out.into_inner().map_err(|e| e.into_error())?;
            Ok(())
        }
        Ok(m) if m.is_file() => writer.finish_to_path(run, &std::fs::canonicalize(path)?),
        _ => writer.finish_to_path(run, path),
    }
}

/// What a trace says about the run, from what is known before the first decode:
/// flash attention as asked (`auto` until an attention op shows it), a complete run of
/// every layer with sources, the model's sha256 only when `with_sha` (it reads the whole
/// file). Whether llama.cpp rotates K/V is guessed here from the cache types and the
/// model's head sizes (`trace_format::meta::kv_rotation`); the saved trace records what
/// the graph showed instead ([`LayerRotation`]).
pub fn run_meta(info: &RunInfo, with_sha: bool) -> RunMeta {
    let (head_k, head_v) = gguf_io::GgufFile::open(&info.model_path)
        .map(|f| trace_format::meta::model_head_dims(f.metadata()))
        .unwrap_or((0, 0));
    let (rot_k, rot_v) = trace_format::meta::kv_rotation(info.type_k, info.type_v, head_k, head_v);
    // The mixed cache's window layers (`--mixed-swa-type`) have a type of their own.
    let swa_type = info.mixed.and_then(|m| m.swa_type);
    let (swa_rot_k, swa_rot_v) = swa_type.map_or((false, false), |t| {
        trace_format::meta::kv_rotation(t, t, head_k, head_v)
    });
    RunMeta {
        model_path: info.model_path.clone(),
        model_sha256: if with_sha {
            model_fetch::sha256_file(std::path::Path::new(&info.model_path)).unwrap_or_default()
        } else {
            String::new()
        },
        architecture: info.architecture.clone(),
        n_layer: info.n_layer,
        n_head: info.n_head,
        n_head_kv: info.n_head_kv,
        cache_type_k: info.type_k.name().into(),
        cache_type_v: info.type_v.name().into(),
        flash_attn: match info.flash_attn_requested {
            Some(true) => "on",
            Some(false) => "off",
            None => "auto",
        }
        .into(),
        kv_rotation: rot_k || rot_v || swa_rot_k || swa_rot_v,
        mixed_kv_cache: info.mixed.is_some(),
        mixed_swa_type: swa_type.map(|t| t.name().to_string()).unwrap_or_default(),
        n_ctx: info.n_ctx,
        n_batch: info.n_batch,
        n_ubatch: info.n_ubatch,
        n_predict: info.n_predict,
        seed: info.seed,
        prompt_tokens: info.prompt_tokens.clone(),
        replayed_from: info.replayed_from.clone().unwrap_or_default(),
        rpc_endpoints: info.rpc_endpoints.clone(),
        llama_version: ggml_trace::llama_version(),
        cpu_simd: ggml_trace::cpu_simd(),
        target_layer: -1,
        trace_sources: true,
        complete: true,
        ..Default::default()
    }
}

/// The warning for an audit's finding (see `CaptureConfig::kv_audit`).
pub fn unexplained_line(c: &ggml_trace::capture::UnexplainedChange) -> String {
    format!(
        "warning: step {} layer {} {}: {} bytes of the KV-cache view changed where no graph \
         node wrote (found by an audit; recorded at this step; --kv-audit 1 records such \
         a change at the step it happens)",
        c.step,
        c.layer,
        c.role.name(),
        c.bytes
    )
}

impl CaptureSink for MonitorSink {
    fn on_unexplained(&mut self, change: &ggml_trace::capture::UnexplainedChange) {
        self.progress.clear();
        eprintln!("{}", unexplained_line(change));
    }

    fn on_start(&mut self, info: &RunInfo) -> Result<(), CaptureError> {
        let generated = if info.n_predict > 0 {
            info.n_predict as u64
        } else {
            0
        };
        self.counters.tokens_total = info.prompt_tokens.len() as u64 + generated;
        self.threads = (info.n_threads, info.n_threads_batch);
        self.n_layer = info.n_layer;
        Ok(())
    }

    fn on_step(&mut self, step: &StepMeta) -> bool {
        if self.stop.load(Ordering::SeqCst) {
            return false;
        }
        // The previous step is done when the next one starts.
        self.counters.steps = step.step;
        self.progress.update(self.counters);
        self.counters.tokens += step.tokens.len() as u64;
        self.step_threads = if step.tokens.len() > 1 {
            self.threads.1
        } else {
            self.threads.0
        };
        self.n_steps = step.step + 1;
        if let Some(v) = self.verifier.as_mut() {
            v.positions.clone_from(&step.positions);
            v.previous_tokens = Some(std::mem::replace(&mut v.tokens, step.tokens.clone()))
                .filter(|_| step.step > 0);
        }
        if let Some(w) = self.writer.as_mut() {
            w.add_step(step.clone());
        }
        true
    }

    fn on_attention(&mut self, att: CapturedAttention) -> Result<(), CaptureError> {
        if att.cross {
            if !att.op.is_empty() {
                self.cross_op.get_or_insert_with(|| att.op.clone());
            }
            let il = u32::try_from(att.layer)
                .unwrap_or(0)
                .saturating_sub(self.n_layer);
            self.n_cross_layer = self.n_cross_layer.max(il + 1);
        } else if !att.op.is_empty() {
            // The mixed KV cache's node says nothing about flash attention: on a sliding-window
            // (iSWA) model the window layers' op decides the flag (a run of mixed nodes only
            // keeps the first).
            let mixed = |op: &str| op == trace_format::MIXED_ATTN_OP;
            if self
                .seen_op
                .as_deref()
                .is_none_or(|op| mixed(op) && !mixed(&att.op))
            {
                self.seen_op = Some(att.op.clone());
            }
        }
        self.rotation.observe(&att);
        // With flash attention `kqv_out` shares the attention output's bytes: the same
        // bytes as the same type and element count give the same summary, computed once.
        let mut shared: Option<(&CapturedTensor, Summary)> = None;
        for t in &att.tensors {
            let same = |p: &CapturedTensor| {
                Arc::ptr_eq(&p.data, &t.data)
                    && p.meta.layout.ty == t.meta.layout.ty
                    && p.meta.layout.n_elements() == t.meta.layout.n_elements()
            };
            let s = match shared {
                Some((p, s)) if t.revision.is_none() && same(p) => s,
                _ => {
                    let s = self.stats.summarize(t).map_err(CaptureError::sink)?;
                    if t.revision.is_none() {
                        shared = Some((t, s));
                    }
                    s
                }
            };
            let r = self.line(t, &s);
            self.written(r)?;
        }
        // A capture without the attention (the rotated-back kqv_out of a rotated cache
        // arrives on its own) has nothing to verify.
        let attention = att.tensors.iter().any(|t| {
            matches!(
                t.meta.role,
                trace_format::Role::Q
                    | trace_format::Role::K
                    | trace_format::Role::V
                    | trace_format::Role::KqvOut
            )
        });
        if let Some(v) = self.verifier.as_mut().filter(|_| attention) {
            for line in v
                .check(&att, self.step_threads, self.json)
                .map_err(CaptureError::sink)?
            {
                self.write_line(&line)?;
            }
        }
        if let Some(w) = self.writer.as_mut() {
            if !att.op.is_empty() {
                w.add_attn(AttnRecord {
                    step: att.step,
                    layer: att.layer,
                    op: att.op.clone(),
                    params: att.params,
                    backend: att.backend.clone(),
                    n_threads: self.step_threads,
                });
            }
            // The mixed KV cache's node numbers its sources differently (src3/src4 are the
            // cold store, src5 the mask): the seed's `src<i>` names follow the node.
            let mixed = att.op == trace_format::MIXED_ATTN_OP;
            for t in att.tensors {
                w.add_tensor_ordered(t.meta, &t.data, mixed, t.revision.as_ref(), t.graph_order)
                    .map_err(CaptureError::sink)?;
            }
            self.counters.bytes_written = w.trace_bytes();
        }
        self.progress.update(self.counters);
        Ok(())
    }

    /// A `--tensor-filter` node: a statistics line (when its type can be read as numbers)
    /// and, when saving, the tensor with its graph order.
    fn on_node(&mut self, node: CapturedTensor) -> Result<(), CaptureError> {
        if gguf_io::quant::can_dequantize(node.meta.layout.ty) {
            let s = self.stats.summarize(&node).map_err(CaptureError::sink)?;
            let r = self.line(&node, &s);
            self.written(r)?;
        }
        if let Some(w) = self.writer.as_mut() {
            w.add_tensor_ordered(node.meta, &node.data, false, None, node.graph_order)
                .map_err(CaptureError::sink)?;
            self.counters.bytes_written = w.trace_bytes();
        }
        self.progress.update(self.counters);
        Ok(())
    }

    /// The sampler's choice is recorded with the step; logits (`--logits`) are summarised
    /// like a tensor (role `logits`, layer -1) and saved.
    fn on_output(&mut self, out: StepOutput) -> Result<(), CaptureError> {
        if let (Some(w), Some(tok)) = (self.writer.as_mut(), out.sampled) {
            w.set_sampled(out.step, tok);
        }
        let Some(logits) = out.logits else {
            return Ok(());
        };
        let meta = trace_format::write::logits_meta(out.step, logits.len() as u64)
            .map_err(CaptureError::sink)?;
        let t = CapturedTensor {
            meta,
            data: Arc::new(logits.iter().flat_map(|x| x.to_le_bytes()).collect()),
            revision: None,
            graph_order: None,
        };
        let s = self.stats.summarize(&t).map_err(CaptureError::sink)?;
        let r = self.line(&t, &s);
        self.written(r)?;
        if let Some(w) = self.writer.as_mut() {
            w.add_tensor(t.meta, &t.data, false)
                .map_err(CaptureError::sink)?;
            self.counters.bytes_written = w.trace_bytes();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use trace_format::{Role, TensorLayout, TensorMeta};

    /// A `Write` whose bytes the test reads back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn f32_tensor(role: Role, ne: [u64; 4], data: Arc<Vec<u8>>) -> CapturedTensor {
        CapturedTensor {
            meta: TensorMeta {
                role,
                layer: 0,
                step: 0,
                ggml_name: role.name().to_owned(),
                op: "NONE".into(),
                layout: TensorLayout::contiguous(gguf_io::GgmlType::F32, ne).unwrap(),
                view_of: String::new(),
            },
            data,
            revision: None,
            graph_order: None,
        }
    }

    /// `kqv_out` sharing the attention output's bytes prints that output's statistics,
    /// computed once; Q, of the same type and length but other bytes, gets its own; every
    /// line equals the from-scratch summary of its tensor, and the two sharing lines print
    /// the same numbers.
    #[test]
    fn shared_bytes_are_summarised_once_and_others_on_their_own() {
        let bytes = |f: fn(f32) -> f32| -> Arc<Vec<u8>> {
            Arc::new(
                (0..1024)
                    .flat_map(|i| f(i as f32 * 0.01).to_le_bytes())
                    .collect(),
            )
        };
        let out = bytes(f32::sin);
        let tensors = vec![
            f32_tensor(Role::KqvOut, [1024, 1, 1, 1], out.clone()),
            f32_tensor(Role::Attn, [256, 4, 1, 1], out),
            f32_tensor(Role::Q, [256, 1, 4, 1], bytes(|x| x.cos() * 3.0 + 1.0)),
        ];
        let want: Vec<Summary> = tensors
            .iter()
            .map(|t| crate::stats::summarize(t).unwrap())
            .collect();
        assert_ne!(want[0].mean.to_bits(), want[2].mean.to_bits());
        let opts = Options {
            json: true,
            quiet: true,
            ..Options::default()
        };
        let buf = Shared::default();
        let mut sink = MonitorSink::new(
            &opts,
            Box::new(buf.clone()),
            Arc::new(AtomicBool::new(false)),
        )
        .unwrap();
        sink.on_attention(CapturedAttention {
            step: 0,
            layer: 0,
            op: "FLASH_ATTN_EXT".into(),
            params: trace_format::AttnParams::default(),
            backend: "CPU".into(),
            tensors,
            rotation: None,
            cross: false,
        })
        .unwrap();
        sink.out.flush().unwrap();
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3, "{text}");
        for key in ["mean", "std", "min", "max"] {
            assert_eq!(lines[0][key], lines[1][key], "{key}");
        }
        for (line, s) in lines.iter().zip(&want) {
            for (key, v) in [
                ("mean", s.mean),
                ("std", s.std),
                ("min", s.min),
                ("max", s.max),
            ] {
                // serde_json parses floats to within an ulp, not always exactly.
                let got = line[key].as_f64().unwrap();
                assert!(
                    (got - v).abs() <= 1e-15 * v.abs(),
                    "{key}: {got} vs {v} in {line}"
                );
            }
            assert_eq!(line["count"], 1024);
        }
    }
}

/// The line that tells what the capture read from RPC servers (`None` for a local run):
/// the total over the steps, and the median over the steps of one token (generated
/// tokens: what the capture costs per token). `bytes[i]` and `tokens[i]` are step `i`'s
/// bytes read and tokens decoded.
pub fn rpc_traffic_line(
    tool: &str,
    info: &RunInfo,
    bytes: &[u64],
    tokens: &[usize],
) -> Option<String> {
    if info.rpc_endpoints.is_empty() || bytes.is_empty() {
        return None;
    }
    let total: u64 = bytes.iter().sum();
    let mut per_token: Vec<u64> = bytes
        .iter()
        .zip(tokens)
        .filter(|&(_, &n)| n == 1)
        .map(|(&b, _)| b)
        .collect();
    per_token.sort_unstable();
    let mut line = format!(
        "{tool}: the capture read {total} bytes from the RPC servers in {} steps",
        bytes.len()
    );
    if let Some(&median) = per_token.get(per_token.len() / 2) {
        line.push_str(&format!(
            "; per generated token: {median} bytes (median of {} one-token steps)",
            per_token.len()
        ));
    }
    Some(line)
}

#[cfg(test)]
mod rpc_line_tests {
    use super::*;

    fn info(endpoints: &[&str]) -> RunInfo {
        RunInfo {
            n_layer: 1,
            n_head: 1,
            n_head_kv: 1,
            n_ctx: 256,
            n_batch: 16,
            n_ubatch: 16,
            n_predict: 0,
            seed: 0,
            flash_attn_requested: None,
            type_k: gguf_io::GgmlType::F16,
            type_v: gguf_io::GgmlType::F16,
            architecture: "llama".into(),
            model_path: String::new(),
            prompt_tokens: Vec::new(),
            mixed: None,
            kv_buffer_bytes: 0,
            n_threads: 1,
            n_threads_batch: 1,
            replayed_from: None,
            rpc_endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn the_rpc_line_sums_the_steps_and_takes_the_median_of_one_token_steps() {
        let i = info(&["127.0.0.1:1"]);
        assert_eq!(
            rpc_traffic_line("t", &i, &[1000, 30, 10, 20], &[16, 1, 1, 1]).as_deref(),
            Some("t: the capture read 1060 bytes from the RPC servers in 4 steps; per generated token: 20 bytes (median of 3 one-token steps)")
        );
        assert_eq!(
            rpc_traffic_line("t", &i, &[7], &[5]).as_deref(),
            Some("t: the capture read 7 bytes from the RPC servers in 1 steps")
        );
        assert_eq!(rpc_traffic_line("t", &info(&[]), &[7], &[1]), None);
    }
}
