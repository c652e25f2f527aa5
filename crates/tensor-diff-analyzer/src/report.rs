//! The verdict and its two forms: the seed's "TENSOR DIFFERENCE ANALYSIS SUMMARY" text
//! and the `--json` document (schema `tensor-diff-analyzer/1`, docs/json.md).

use std::collections::BTreeMap;
use std::io::{self, Write};
use trace_format::json::number as num;

use serde_json::{json, Value};
use tensor_stats::{DiffMetrics, Tolerance};

use crate::compare::{Analyzer, Comparison, InputsDiffer, Location, RunCheck, Unpaired};
use crate::trust::{shown, Rotation};

pub const SCHEMA: &str = "tensor-diff-analyzer/1";

/// `printf("%.2e")`: `2.34e-05`, as the seed's summary prints numbers.
pub fn e2(x: f64) -> String {
    if !x.is_finite() {
        return format!("{x}");
    }
    let s = format!("{x:.2e}");
    match s.split_once('e') {
        Some((m, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            format!("{m}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

/// The worst NMSE of one layer.
#[derive(Clone, Debug)]
pub struct LayerRow {
    pub layer: i32,
    pub nmse: f64,
    pub step: u32,
    pub role: String,
    pub outside: usize,
    pub noise_nmse: Option<f64>,
}

/// Tensors of either file that were not compared and do not fail the verdict.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Skipped {
    /// Explained as not comparable (rotation basis, layout): listed with the reason.
    pub not_comparable: usize,
    /// Of a layer `--layer` (or the reference's own target layer) leaves out.
    pub other_layer: usize,
    /// Without a trace role (tensors of another tool).
    pub no_role: usize,
    /// Of a step from the first one whose inputs differ on ([`InputsDiffer::tensors`]).
    pub inputs_differ: usize,
}

impl Skipped {
    pub fn total(&self) -> usize {
        self.not_comparable + self.other_layer + self.no_role + self.inputs_differ
    }

    /// `12 (8 not comparable, 4 outside --layer 1)`, or `0`.
    pub fn text(&self, layer: Option<i32>) -> String {
        let layer = layer.map_or("the compared layers".to_owned(), |l| format!("--layer {l}"));
        let parts: Vec<String> = [
            (self.not_comparable, "not comparable".to_owned()),
            (self.other_layer, format!("outside {layer}")),
            (self.no_role, "without a trace role".to_owned()),
            (self.inputs_differ, "inputs differ".to_owned()),
        ]
        .into_iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
        if parts.is_empty() {
            "0".into()
        } else {
            format!("{} ({})", self.total(), parts.join(", "))
        }
    }
}

/// How many of the clean tensors just before the first divergence are named.
pub const JUST_BEFORE: usize = 5;

/// The first compared tensor, in step and graph order, whose difference leaves the noise
/// band ([`Comparison::clean`]), and the clean ones before it.
#[derive(Clone, Debug)]
pub struct FirstDivergence<'a> {
    pub at: &'a Comparison,
    /// Every compared tensor before it, in order (all clean).
    pub before: Vec<&'a Comparison>,
    /// Whether a run-to-run measurement widened the band (else: the tolerance).
    pub noise: bool,
}

impl FirstDivergence<'_> {
    /// The last [`JUST_BEFORE`] clean tensors before it, nearest last.
    pub fn just_before(&self) -> &[&Comparison] {
        &self.before[self.before.len().saturating_sub(JUST_BEFORE)..]
    }
}

/// `ffn_out-1` for a node (`Qcur-0 #2` for the third node of that name), `kqv_out
/// (kqv_out-1)` for an attention tensor.
pub fn tensor_label(c: &Comparison) -> String {
    let name = shown(&c.ggml_name);
    if c.role == trace_format::Role::Node {
        if c.occurrence > 0 {
            format!("{name} #{}", c.occurrence)
        } else {
            name
        }
    } else if name.is_empty() {
        c.role.name().to_owned()
    } else {
        format!("{} ({name})", c.role.name())
    }
}

/// Everything the summary says.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub reference: String,
    pub current: String,
    pub tolerance: Tolerance,
    pub notes: Vec<String>,
    pub comparisons: Vec<Comparison>,
    pub unmatched: Vec<Unpaired>,
    pub not_comparable: Vec<Unpaired>,
    pub skipped: Skipped,
    /// The layer compared (`--layer`, or the reference's target layer); None: all.
    pub layer: Option<i32>,
    pub noise_source: Option<String>,
    /// The first step whose inputs differ from the reference's.
    pub diverged_at: Option<u32>,
    /// What was left out from there on (None: nothing, or `--include-diverged`).
    pub inputs_differ: Option<InputsDiffer>,
    /// What the difference did to the output, over the compared steps.
    pub output: crate::output::OutputSummary,
    /// `--compare-devices`: the two sides (A the reference, B the current run).
    pub devices: Option<[crate::devices::Side; 2]>,
    /// kqv_out's NMSE per (layer, head, position) ([`crate::breakdown`]).
    pub by_head_position: Vec<crate::breakdown::Grid>,
}

impl Outcome {
    pub fn new(
        reference: String,
        current: String,
        a: &Analyzer,
        noise_source: Option<String>,
    ) -> Self {
        let notes = a.notes();
        let (mut unmatched, mut not_comparable) = (Vec::new(), Vec::new());
        for u in a
            .reference_unpaired()
            .into_iter()
            .chain(a.current_unpaired.iter().cloned())
        {
            if u.reason.is_some() {
                not_comparable.push(u);
            } else {
                unmatched.push(u);
            }
        }
        let inputs_differ = a.inputs_differ();
        let skipped = Skipped {
            not_comparable: not_comparable.len(),
            other_layer: a.reference_other_layer() + a.current_other_layer,
            no_role: a.reference.unknown.len() + a.current_no_role,
            inputs_differ: inputs_differ.as_ref().map_or(0, InputsDiffer::tensors),
        };
        Self {
            reference,
            current,
            tolerance: a.tolerance,
            notes,
            comparisons: a.comparisons.clone(),
            unmatched,
            not_comparable,
            skipped,
            layer: a.layer,
            noise_source,
            diverged_at: a.diverged_at(),
            inputs_differ,
            output: a.outputs.summary(a.reference, |s| a.compares_step(s)),
            devices: None,
            by_head_position: a.breakdown.grids(),
        }
    }

    /// Compared tensors whose every element equals its counterpart (same shape and type,
    /// largest absolute difference 0, no NaN/Inf that disagrees).
    pub fn identical(&self) -> usize {
        self.comparisons
            .iter()
            .filter(|c| {
                c.shape_match()
                    && c.type_match()
                    && c.metrics
                        .as_ref()
                        .is_some_and(|m| m.max_abs == 0.0 && m.nonfinite_mismatch == 0)
            })
            .count()
    }

    /// The `--compare-devices` lines: each side's devices and where its attention ran,
    /// then whether the two are bit-identical or how far apart.
    pub fn devices_text(&self) -> Option<String> {
        let d = self.devices.as_ref()?;
        let mut s = String::from("--- Devices (--compare-devices) ---\n");
        for (side, role) in d.iter().zip(["reference", "current"]) {
            s += &format!(
                "  {} ({role}): {}: llama.cpp {}; attention ran on {}\n",
                side.name,
                side.selection,
                side.llama_args.join(" "),
                side.backends
            );
        }
        let (n, same) = (self.comparisons.len(), self.identical());
        if same == n {
            s += &format!(
                "  Bit-identical: yes, every element of the {n} compared tensors is equal\n"
            );
        } else {
            let worst = self
                .comparisons
                .iter()
                .filter_map(|c| c.metrics.as_ref().map(|m| (m.nmse, c)))
                .filter(|(x, _)| !x.is_nan())
                .max_by(|a, b| a.0.total_cmp(&b.0));
            let at = worst.map_or(String::new(), |(x, c)| {
                format!(
                    "; largest NMSE {} at step {}, layer {}, {}",
                    e2(x),
                    c.step,
                    c.layer,
                    c.role.name()
                )
            });
            s += &format!(
                "  Bit-identical: no, {} of {n} compared tensors differ{at}; the tolerance \
                 decides the verdict\n",
                n - same
            );
        }
        Some(s)
    }

    pub fn within(&self) -> usize {
        self.comparisons.iter().filter(|c| c.within()).count()
    }

    pub fn shape_mismatches(&self) -> usize {
        self.comparisons.iter().filter(|c| !c.shape_match()).count()
    }

    pub fn type_mismatches(&self) -> usize {
        self.comparisons.iter().filter(|c| !c.type_match()).count()
    }

    fn metrics(&self) -> impl Iterator<Item = &DiffMetrics> {
        self.comparisons.iter().filter_map(|c| c.metrics.as_ref())
    }

    pub fn max_abs(&self) -> f64 {
        self.metrics().map(|m| m.max_abs).fold(0.0, f64::max)
    }

    pub fn max_rel(&self) -> f64 {
        self.metrics().map(|m| m.max_rel).fold(0.0, f64::max)
    }

    pub fn average_cosine(&self) -> f64 {
        let (s, n) = self
            .metrics()
            .fold((0.0, 0usize), |(s, n), m| (s + m.cosine, n + 1));
        if n == 0 {
            f64::NAN
        } else {
            s / n as f64
        }
    }

    /// The compared tensors in the order the runs computed them: by step, then graph
    /// order (`kqv_trace.tensor.graph_order` of the reference; tensors without one after
    /// those with one), then the order they were compared in.
    pub fn in_graph_order(&self) -> Vec<&Comparison> {
        let mut v: Vec<(usize, &Comparison)> = self.comparisons.iter().enumerate().collect();
        v.sort_by_key(|(i, c)| (c.step, c.graph_order.unwrap_or(u32::MAX), *i));
        v.into_iter().map(|(_, c)| c).collect()
    }

    /// The first tensor out of the noise band, in [`in_graph_order`](Self::in_graph_order);
    /// None when every compared tensor is within it.
    pub fn first_divergence(&self) -> Option<FirstDivergence<'_>> {
        let ordered = self.in_graph_order();
        let i = ordered.iter().position(|c| !c.clean())?;
        let at = ordered[i];
        Some(FirstDivergence {
            at,
            before: ordered[..i].to_vec(),
            noise: at.noise.is_some(),
        })
    }

    /// The earliest (step, layer) with a tensor out of tolerance, and its roles there.
    /// Nodes of no layer (-1: the embeddings, the output) count after the layers of their
    /// step, whatever their place in the graph.
    pub fn first_failure(&self) -> Option<(u32, i32, Vec<&Comparison>)> {
        let (step, _, layer) = self
            .comparisons
            .iter()
            .filter(|c| !c.within())
            .map(|c| {
                (
                    c.step,
                    if c.layer < 0 { i32::MAX } else { c.layer },
                    c.layer,
                )
            })
            .min()?;
        let at = self
            .comparisons
            .iter()
            .filter(|c| !c.within() && c.step == step && c.layer == layer)
            .collect();
        Some((step, layer, at))
    }

    pub fn layers(&self) -> Vec<LayerRow> {
        let mut rows: BTreeMap<i32, LayerRow> = BTreeMap::new();
        for c in &self.comparisons {
            let row = rows.entry(c.layer).or_insert(LayerRow {
                layer: c.layer,
                nmse: -1.0,
                step: c.step,
                role: c.role.name().into(),
                outside: 0,
                noise_nmse: None,
            });
            row.outside += usize::from(!c.within());
            if let Some(m) = &c.metrics {
                if m.nmse > row.nmse {
                    row.nmse = m.nmse;
                    row.step = c.step;
                    row.role = c.role.name().into();
                }
            }
            if let Some(n) = &c.noise {
                row.noise_nmse = Some(row.noise_nmse.map_or(n.nmse, |x: f64| x.max(n.nmse)));
            }
        }
        rows.into_values()
            .map(|mut r| {
                if r.nmse < 0.0 {
                    r.nmse = f64::NAN;
                }
                r
            })
            .collect()
    }

    /// Exit status: every reference and current tensor compared and within tolerance.
    pub fn passed(&self) -> bool {
        self.unmatched.is_empty() && self.within() == self.comparisons.len()
    }
}

fn location_text(l: &Location) -> String {
    match (l.token, l.head, l.dim) {
        (Some(t), h, d) => {
            let mut s = format!("token {t}");
            if let Some(p) = l.position {
                s += &format!(" (pos {p})");
            }
            if let Some(h) = h {
                s += &format!(", head {h}");
            }
            if let Some(d) = d {
                s += &format!(", dim {d}");
            }
            s
        }
        _ => format!("index {:?}", l.index),
    }
}

fn failure_line(c: &Comparison, t: &Tolerance) -> String {
    let name = shown(&c.reference_name);
    if !c.shape_match() {
        return format!(
            "  {name}: shape mismatch: reference {:?}, current {:?}",
            c.reference_shape, c.current_shape
        );
    }
    if let Some(e) = &c.error {
        return format!("  {name}: not compared: {e}");
    }
    let Some(m) = &c.metrics else {
        return format!("  {name}: not compared");
    };
    let mut s = format!(
        "  {name}: abs={}, rel={}, nmse={}, cos={:.6}",
        e2(m.max_abs),
        e2(m.max_rel),
        e2(m.nmse),
        m.cosine
    );
    if c.role != c.reference_role {
        s += &format!(" (current {})", c.role);
    }
    s += &format!(
        "; outside {}/{} ({:.2}%)",
        m.mismatches,
        m.count,
        100.0 * m.mismatch_fraction
    );
    if let Some(l) = &c.worst_abs_at {
        s += &format!("; worst abs at {}", location_text(l));
    }
    if m.nan_current + m.inf_current + m.nan_reference + m.inf_reference > 0 {
        s += &format!(
            "; NaN/Inf current {}/{}, reference {}/{}",
            m.nan_current, m.inf_current, m.nan_reference, m.inf_reference
        );
    }
    s += &format!(
        "; passes with --tolerance-abs {} or --tolerance-rel {}",
        e2(m.min_passing_abs),
        e2(m.min_passing_rel)
    );
    if t.mode == tensor_stats::ToleranceMode::Mean {
        s += " (each half of the mean rule)";
    }
    if let Some(n) = &c.noise {
        s += &format!("; noise nmse={}, abs={}", e2(n.nmse), e2(n.max_abs));
    }
    s
}

fn order_text(c: &Comparison) -> String {
    c.graph_order.map_or_else(
        || "graph order unknown".into(),
        |o| format!("graph order {o}"),
    )
}

fn diff_text(c: &Comparison) -> String {
    if !c.shape_match() {
        return format!(
            "shape mismatch: reference {:?}, current {:?}",
            c.reference_shape, c.current_shape
        );
    }
    if let Some(e) = &c.error {
        return format!("not compared: {e}");
    }
    match &c.metrics {
        Some(m) => format!(
            "nmse={}, abs={}, outside {}/{}",
            e2(m.nmse),
            e2(m.max_abs),
            m.mismatches,
            m.count
        ),
        None => "not compared".into(),
    }
}

/// The first-divergence lines of the text summary.
pub fn divergence_text(d: &FirstDivergence) -> Vec<String> {
    let c = d.at;
    let band = if d.noise {
        "outside tolerance and above the run-to-run noise"
    } else {
        "outside tolerance"
    };
    let mut lines = vec![format!(
        "First divergence: step {}, layer {}: {} ({}) is the first tensor {band}: {}",
        c.step,
        c.layer,
        tensor_label(c),
        order_text(c),
        diff_text(c)
    )];
    if d.before.is_empty() {
        lines.push("  no tensor was compared before it".into());
        return lines;
    }
    let just: Vec<String> = d
        .just_before()
        .iter()
        .rev()
        .map(|b| {
            let nmse = b.metrics.as_ref().map_or("-".into(), |m| e2(m.nmse));
            format!("{} (step {}, nmse={nmse})", tensor_label(b), b.step)
        })
        .collect();
    lines.push(format!(
        "  clean before it: {} tensor(s); just before it: {}",
        d.before.len(),
        just.join(", ")
    ));
    lines
}

/// `3-5, 7` (runs of consecutive steps as ranges).
pub(crate) fn step_ranges(steps: &[u32]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < steps.len() {
        let mut j = i;
        while j + 1 < steps.len() && steps[j + 1] == steps[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            steps[i].to_string()
        } else {
            format!("{}-{}", steps[i], steps[j])
        });
        i = j + 1;
    }
    parts.join(", ")
}

/// The one line on what the divergence left out.
pub fn inputs_differ_line(x: &InputsDiffer) -> String {
    let mut s = format!(
        "Not compared: inputs differ from step {} on (step{} {}: {} tensor pair(s)",
        x.from_step,
        if x.steps.len() == 1 { "" } else { "s" },
        step_ranges(&x.steps),
        x.pairs
    );
    if x.one_sided > 0 {
        s += &format!(", {} tensor(s) without counterpart", x.one_sided);
    }
    s + "); --include-diverged compares them"
}

fn pct(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        100.0 * a as f64 / b as f64
    }
}

pub fn write_text(o: &Outcome, out: &mut dyn Write) -> io::Result<()> {
    let t = &o.tolerance;
    let n = o.comparisons.len();
    writeln!(out, "=== TENSOR DIFFERENCE ANALYSIS SUMMARY ===")?;
    writeln!(out, "Reference file: {}", o.reference)?;
    writeln!(out, "Current: {}", o.current)?;
    writeln!(out, "Total comparisons: {n}")?;
    writeln!(
        out,
        "Tolerance - Absolute: {}, Relative: {} (mode {}, max mismatch {}%)",
        e2(t.abs),
        e2(t.rel),
        t.mode.name(),
        t.max_mismatch_pct
    )?;
    if let Some(d) = o.devices_text() {
        writeln!(out)?;
        write!(out, "{d}")?;
    }
    if !o.notes.is_empty() {
        writeln!(out)?;
        writeln!(out, "--- Run differences (from the trace metadata) ---")?;
        for note in &o.notes {
            writeln!(out, "  {note}")?;
        }
    }
    writeln!(out)?;
    writeln!(out, "--- Overall Results ---")?;
    writeln!(
        out,
        "Tensors within tolerance: {}/{n} ({:.1}%)",
        o.within(),
        pct(o.within(), n)
    )?;
    writeln!(out, "Shape mismatches: {}", o.shape_mismatches())?;
    writeln!(out, "Type mismatches: {}", o.type_mismatches())?;
    writeln!(out, "Maximum absolute difference: {}", e2(o.max_abs()))?;
    writeln!(out, "Maximum relative difference: {}", e2(o.max_rel()))?;
    writeln!(out, "Average cosine similarity: {:.6}", o.average_cosine())?;
    writeln!(
        out,
        "Unmatched tensors: {} (reference {}, current {}); not comparable: {}",
        o.unmatched.len(),
        o.unmatched.iter().filter(|u| u.side == "reference").count(),
        o.unmatched.iter().filter(|u| u.side == "current").count(),
        o.not_comparable.len()
    )?;
    writeln!(out, "Compared {n}, skipped {}", o.skipped.text(o.layer))?;
    if let Some(x) = &o.inputs_differ {
        writeln!(out, "{}", inputs_differ_line(x))?;
    }
    match o.first_failure() {
        Some((step, layer, at)) => {
            let roles: Vec<&str> = at.iter().map(|c| c.role.name()).collect();
            writeln!(
                out,
                "First out of tolerance: step {step}, layer {layer} ({})",
                roles.join(", ")
            )?;
        }
        None => writeln!(out, "First out of tolerance: none")?,
    }
    match o.first_divergence() {
        Some(d) => {
            for line in divergence_text(&d) {
                writeln!(out, "{line}")?;
            }
        }
        None => writeln!(
            out,
            "First divergence: none (every compared tensor within the {})",
            if o.comparisons.iter().any(|c| c.noise.is_some()) {
                "noise band"
            } else {
                "tolerance"
            }
        )?,
    }
    let failing: Vec<&Comparison> = o.comparisons.iter().filter(|c| !c.within()).collect();
    if !failing.is_empty() {
        writeln!(out)?;
        writeln!(out, "--- Tensors exceeding tolerance ---")?;
        for c in failing {
            writeln!(out, "{}", failure_line(c, t))?;
        }
    }
    let layers = o.layers();
    if !layers.is_empty() {
        writeln!(out)?;
        writeln!(out, "--- Worst NMSE per layer ---")?;
        let noise = o.noise_source.is_some();
        write!(
            out,
            "{:>5} {:>10} {:>8} {:>5} {:<17} {:>7}",
            "layer", "NMSE", "dB", "step", "role", "outside"
        )?;
        if noise {
            write!(out, " {:>11}", "noise NMSE")?;
        }
        writeln!(out)?;
        for r in &layers {
            write!(
                out,
                "{:>5} {:>10} {:>8.1} {:>5} {:<17} {:>7}",
                r.layer,
                e2(r.nmse),
                10.0 * r.nmse.log10(),
                r.step,
                r.role,
                r.outside
            )?;
            if noise {
                write!(out, " {:>11}", r.noise_nmse.map_or("-".into(), e2))?;
            }
            writeln!(out)?;
        }
        if let Some(src) = &o.noise_source {
            writeln!(out, "noise: {src}")?;
        }
    }
    if !o.unmatched.is_empty() {
        writeln!(out)?;
        writeln!(out, "--- Unmatched tensors (no counterpart) ---")?;
        for u in &o.unmatched {
            writeln!(
                out,
                "  {} only: {} (step {}, layer {}, {})",
                u.side,
                shown(&u.name),
                u.step,
                u.layer,
                u.role
            )?;
        }
    }
    if !o.not_comparable.is_empty() {
        // One line per (side, role, reason): a rotated run makes five per step and layer.
        let mut groups: BTreeMap<(&str, &str, &str), (usize, &Unpaired)> = BTreeMap::new();
        for u in &o.not_comparable {
            let key = (u.side, u.role.name(), u.reason.as_deref().unwrap_or(""));
            groups.entry(key).or_insert((0, u)).0 += 1;
        }
        writeln!(out)?;
        writeln!(out, "--- Not comparable (listed in --json) ---")?;
        for ((side, role, reason), (n, first)) in &groups {
            writeln!(
                out,
                "  {side} {role}: {n} tensor(s), e.g. {}: {reason}",
                shown(&first.name)
            )?;
        }
    }
    write!(out, "{}", o.output.text())?;
    writeln!(out)?;
    write!(
        out,
        "Verdict: {}",
        if o.passed() {
            "all tensors within tolerance"
        } else if o.within() < n {
            "tensors outside tolerance"
        } else {
            "unmatched tensors"
        }
    )?;
    match &o.inputs_differ {
        Some(x) => writeln!(
            out,
            " (steps before {}; the rest not compared)",
            x.from_step
        )?,
        None => writeln!(out)?,
    }
    Ok(())
}

fn loc_json(l: &Option<Location>, w: Option<tensor_stats::Worst>) -> Value {
    match (l, w) {
        (Some(l), Some(w)) => json!({
            "flat_index": w.index, "index": l.index, "token": l.token, "position": l.position,
            "head": l.head, "dim": l.dim, "current": num(w.current), "reference": num(w.reference),
            "value": num(w.value),
        }),
        _ => Value::Null,
    }
}

fn metrics_json(m: &DiffMetrics) -> Value {
    json!({
        "count": m.count, "compared": m.compared,
        "nan_current": m.nan_current, "inf_current": m.inf_current,
        "nan_reference": m.nan_reference, "inf_reference": m.inf_reference,
        "nonfinite_agree": m.nonfinite_agree, "nonfinite_mismatch": m.nonfinite_mismatch,
        "mean_abs": num(m.mean_abs), "max_abs": num(m.max_abs),
        "mean_rel": num(m.mean_rel), "max_rel": num(m.max_rel), "rel_count": m.rel_count,
        "mse": num(m.mse), "rmse": num(m.rmse), "ref_variance": num(m.ref_variance),
        "nmse": num(m.nmse), "nmse_db": num(m.nmse_db), "cosine": num(m.cosine),
        "mismatches": m.mismatches, "mismatch_fraction": num(m.mismatch_fraction),
        "allowed_mismatches": m.allowed_mismatches,
        "min_passing_abs": num(m.min_passing_abs), "min_passing_rel": num(m.min_passing_rel),
    })
}

fn unpaired_json(u: &Unpaired) -> Value {
    json!({
        "side": u.side, "name": u.name, "role": u.role.name(), "layer": u.layer, "step": u.step,
        "reason": u.reason,
    })
}

/// One side's rotation: any layer (`k`, `v`), per layer, and where it came from.
fn rotation_json(k: &Rotation, v: &Rotation, recorded: bool, n_layer: usize) -> Value {
    let layers = |r: &Rotation| (0..n_layer as i32).map(|l| r.at(l)).collect::<Vec<_>>();
    json!({
        "k": k.any(), "v": v.any(), "k_layers": layers(k), "v_layers": layers(v),
        "source": if recorded { "recorded" } else { "inferred" },
    })
}

pub fn to_json(o: &Outcome, check: &RunCheck, exit_code: u8) -> Value {
    let t = &o.tolerance;
    let tensors: Vec<Value> = o
        .comparisons
        .iter()
        .map(|c| {
            json!({
                "role": c.role.name(), "reference_role": c.reference_role.name(),
                "layer": c.layer, "step": c.step,
                "reference_name": c.reference_name, "current_name": c.current_name,
                "reference_type": c.reference_type.name(), "current_type": c.current_type.name(),
                "reference_shape": c.reference_shape, "current_shape": c.current_shape,
                "shape_match": c.shape_match(), "type_match": c.type_match(),
                "within": c.within(), "error": c.error,
                "metrics": c.metrics.as_ref().map(metrics_json),
                "worst_abs": loc_json(&c.worst_abs_at, c.metrics.as_ref().and_then(|m| m.worst_abs)),
                "worst_rel": loc_json(&c.worst_rel_at, c.metrics.as_ref().and_then(|m| m.worst_rel)),
                "noise": c.noise.as_ref().map(metrics_json),
                "ggml_name": c.ggml_name, "occurrence": c.occurrence,
                "graph_order": c.graph_order,
            })
        })
        .collect();
    let first = o.first_failure().map(|(step, layer, at)| {
        let roles: Vec<&str> = at.iter().map(|c| c.role.name()).collect();
        json!({"step": step, "layer": layer, "roles": roles})
    });
    let entry = |c: &Comparison| {
        json!({
            "step": c.step, "layer": c.layer, "role": c.role.name(),
            "ggml_name": c.ggml_name, "occurrence": c.occurrence,
            "graph_order": c.graph_order, "reference_name": c.reference_name,
            "within": c.within(), "clean": c.clean(),
            "nmse": c.metrics.as_ref().map(|m| num(m.nmse)),
            "max_abs": c.metrics.as_ref().map(|m| num(m.max_abs)),
        })
    };
    let divergence = o.first_divergence().map(|d| {
        let mut v = entry(d.at);
        v["band"] = json!(if d.noise { "noise" } else { "tolerance" });
        v["clean_before"] = json!(d.before.len());
        v["just_before"] = json!(d.just_before().iter().map(|c| entry(c)).collect::<Vec<_>>());
        v
    });
    let layers: Vec<Value> = o
        .layers()
        .iter()
        .map(|r| {
            json!({
                "layer": r.layer, "worst_nmse": num(r.nmse), "worst_nmse_db": num(10.0 * r.nmse.log10()),
                "step": r.step, "role": r.role, "outside": r.outside,
                "noise_nmse": r.noise_nmse.map(num),
            })
        })
        .collect();
    json!({
        "schema": SCHEMA,
        "output": o.output.json(),
        "reference": o.reference,
        "current": o.current,
        "tolerance": {
            "abs": num(t.abs), "rel": num(t.rel), "mode": t.mode.name(),
            "max_mismatch_pct": num(t.max_mismatch_pct),
        },
        "notes": o.notes,
        "rotation": {
            "reference": rotation_json(&check.ref_rot_k, &check.ref_rot_v, check.rotation_recorded.0, check.n_layer),
            "current": rotation_json(&check.cur_rot_k, &check.cur_rot_v, check.rotation_recorded.1, check.n_layer),
        },
        "total_comparisons": o.comparisons.len(),
        "within_tolerance": o.within(),
        "shape_mismatches": o.shape_mismatches(),
        "type_mismatches": o.type_mismatches(),
        "max_abs": num(o.max_abs()),
        "max_rel": num(o.max_rel()),
        "average_cosine": num(o.average_cosine()),
        "first_failure": first,
        "first_divergence": divergence,
        "layers": layers,
        "tensors": tensors,
        "unmatched": o.unmatched.iter().map(unpaired_json).collect::<Vec<_>>(),
        "skipped": {
            "total": o.skipped.total(),
            "not_comparable": o.skipped.not_comparable,
            "other_layer": o.skipped.other_layer,
            "no_role": o.skipped.no_role,
            "inputs_differ": o.skipped.inputs_differ,
        },
        "diverged_at": o.diverged_at,
        "not_compared_inputs_differ": o.inputs_differ.as_ref().map(|x| json!({
            "from_step": x.from_step, "steps": x.steps, "pairs": x.pairs,
            "one_sided": x.one_sided,
        })),
        "not_comparable": o.not_comparable.iter().map(unpaired_json).collect::<Vec<_>>(),
        "noise_source": o.noise_source,
        "error_by_head_position": o.by_head_position.iter().map(|g| json!({
            "layer": g.layer,
            "role": "kqv_out",
            "heads": g.heads,
            "positions": g.positions,
            "nmse": g.nmse.iter().map(|row| row.iter().map(|v| v.map(num)).collect::<Vec<_>>())
                .collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "devices": o.devices.as_ref().map(|d| {
            let side = |s: &crate::devices::Side| json!({
                "selection": s.selection, "llama_args": s.llama_args, "backends": s.backends,
            });
            json!({
                "a": side(&d[0]), "b": side(&d[1]),
                "identical_tensors": o.identical(),
                "bit_identical": o.identical() == o.comparisons.len(),
            })
        }),
        "passed": o.passed(),
        "exit_code": exit_code,
    })
}

#[cfg(test)]
mod tests {
    use super::{e2, inputs_differ_line, step_ranges};
    use crate::compare::InputsDiffer;

    #[test]
    fn steps_not_compared_in_one_line() {
        assert_eq!(step_ranges(&[3, 4, 5, 7, 9, 10]), "3-5, 7, 9-10");
        assert_eq!(step_ranges(&[]), "");
        let x = InputsDiffer {
            from_step: 3,
            steps: vec![3, 4, 5],
            pairs: 6,
            one_sided: 0,
        };
        assert_eq!(
            inputs_differ_line(&x),
            "Not compared: inputs differ from step 3 on (steps 3-5: 6 tensor pair(s)); \
             --include-diverged compares them"
        );
        let x = InputsDiffer {
            steps: vec![3],
            one_sided: 2,
            ..x
        };
        assert_eq!(
            inputs_differ_line(&x),
            "Not compared: inputs differ from step 3 on (step 3: 6 tensor pair(s), 2 tensor(s) \
             without counterpart); --include-diverged compares them"
        );
    }

    #[test]
    fn like_printf_2e() {
        assert_eq!(e2(2.34e-5), "2.34e-05");
        assert_eq!(e2(1e-6), "1.00e-06");
        assert_eq!(e2(0.0), "0.00e+00");
        assert_eq!(e2(123.0), "1.23e+02");
        assert_eq!(e2(f64::INFINITY), "inf");
    }
}
