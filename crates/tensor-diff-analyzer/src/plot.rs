//! `--plot FILE.svg`: where the error lives. A heatmap of the worst NMSE (log10) over the
//! tensors of each (step, layer): layers are rows, steps columns; cells with a tensor out
//! of tolerance are outlined in red and marked with an x; cells with nothing compared are
//! grey. With both runs' logits, a row under layer 0 shows the KL divergence of the
//! next-token distributions per step (log10, its own colour scale). Drawn with `plotters`
//! (SVG backend).
//!
//! At most [`MAX_COLUMNS`] columns and [`MAX_ROWS`] rows are drawn: with more steps (or
//! layers), consecutive ones are binned, each cell showing the worst of its bin, and the
//! title says so; the file stays small whatever the trace holds.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use plotters::prelude::*;

use crate::report::Outcome;

/// NMSE of exactly 0 is drawn at this log10 value.
const FLOOR: f64 = -16.0;

/// Most columns (steps, or bins of consecutive steps) drawn.
pub const MAX_COLUMNS: usize = 120;
/// Most rows (layers, or bins of consecutive layers) drawn.
pub const MAX_ROWS: usize = 64;

/// Bins of `size` consecutive values: each value's bin, and each bin's label.
fn bins<T: Copy + Ord + std::hash::Hash + std::fmt::Display>(
    values: &[T],
    max: usize,
) -> (usize, HashMap<T, usize>, Vec<String>) {
    let size = values.len().div_ceil(max).max(1);
    let of = values
        .iter()
        .enumerate()
        .map(|(i, v)| (*v, i / size))
        .collect();
    let labels = values
        .chunks(size)
        .map(|c| match (c.first(), c.last()) {
            (Some(a), Some(b)) if size > 1 && a != b => format!("{a}-{b}"),
            (Some(a), _) => a.to_string(),
            _ => String::new(),
        })
        .collect();
    (size, of, labels)
}

#[derive(Clone, Copy)]
struct Cell {
    nmse: f64,
    outside: bool,
}

/// Blue (small) to red (large), through green and yellow.
fn color(t: f64) -> RGBColor {
    let t = t.clamp(0.0, 1.0);
    let hsl = HSLColor((1.0 - t) * 0.66, 0.85, 0.5);
    let (r, g, b) = hsl.rgb();
    RGBColor(r, g, b)
}

pub fn write_svg(o: &Outcome, path: &Path) -> Result<(), String> {
    let mut steps: Vec<u32> = o.comparisons.iter().map(|c| c.step).collect();
    steps.sort_unstable();
    steps.dedup();
    let mut layers: Vec<i32> = o.comparisons.iter().map(|c| c.layer).collect();
    layers.sort_unstable();
    layers.dedup();
    if steps.is_empty() {
        return Err("nothing was compared, nothing to plot".into());
    }
    let (step_bin, col_of, step_labels) = bins(&steps, MAX_COLUMNS);
    let (layer_bin, row_of, layer_labels) = bins(&layers, MAX_ROWS);
    // Cells keyed by (column, row): the worst NMSE of the bin's tensors.
    let mut cells: BTreeMap<(usize, usize), Cell> = BTreeMap::new();
    for c in &o.comparisons {
        let key = (col_of[&c.step], row_of[&c.layer]);
        let e = cells.entry(key).or_insert(Cell {
            nmse: f64::NAN,
            outside: false,
        });
        e.outside |= !c.within();
        if let Some(m) = &c.metrics {
            if e.nmse.is_nan() || m.nmse > e.nmse {
                e.nmse = m.nmse;
            }
        }
    }
    let lg = |x: f64| {
        if x <= 0.0 {
            FLOOR
        } else {
            x.log10()
        }
    };
    let finite: Vec<f64> = cells
        .values()
        .filter(|c| c.nmse.is_finite())
        .map(|c| lg(c.nmse))
        .collect();
    let lo = finite.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if lo.is_finite() {
        (lo, if hi > lo { hi } else { lo + 1.0 })
    } else {
        (FLOOR, 0.0)
    };
    let (nx, ny) = (step_labels.len() as i32, layer_labels.len() as i32);
    // The output row: the worst KLD of each column's steps, on its own log scale.
    let mut kld: BTreeMap<usize, f64> = BTreeMap::new();
    for (step, k) in &o.output.per_step {
        if let Some(&col) = col_of.get(step) {
            let e = kld.entry(col).or_insert(f64::NAN);
            if e.is_nan() || k.kld > *e {
                *e = k.kld;
            }
        }
    }
    let kld_logs: Vec<f64> = kld
        .values()
        .filter(|k| k.is_finite())
        .map(|&k| lg(k))
        .collect();
    let k_lo = kld_logs.iter().copied().fold(f64::INFINITY, f64::min);
    let k_hi = kld_logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (k_lo, k_hi) = if k_lo.is_finite() {
        (k_lo, if k_hi > k_lo { k_hi } else { k_lo + 1.0 })
    } else {
        (FLOOR, 0.0)
    };
    let y0 = if kld.is_empty() { 0 } else { -1 };
    let binned = match (step_bin, layer_bin) {
        (1, 1) => String::new(),
        (s, 1) => format!(
            "; {} steps binned by {s}, each cell the worst of its bin",
            steps.len()
        ),
        (1, l) => format!(
            "; {} layers binned by {l}, each cell the worst of its bin",
            layers.len()
        ),
        (s, l) => format!(
            "; {} steps binned by {s} and {} layers by {l}, each cell the worst of its bin",
            steps.len(),
            layers.len()
        ),
    };
    let binned = match &o.inputs_differ {
        Some(x) => format!(
            "{binned}; steps from {} on not compared: inputs differ",
            x.from_step
        ),
        None => binned,
    };
    // The first divergence's cell gets a black frame, named in the caption.
    let first = o.first_divergence().map(|d| {
        let c = d.at;
        (
            (col_of[&c.step], row_of[&c.layer]),
            format!(
                "; black frame: first divergence, {} at step {}",
                crate::report::tensor_label(c),
                c.step
            ),
        )
    });
    let binned = match &first {
        Some((_, what)) => format!("{binned}{what}"),
        None => binned,
    };
    let cell_px = 28u32;
    let width = (120 + cell_px * nx as u32).max(480);
    let height = 130 + cell_px * (ny - y0) as u32;
    let binned = if kld.is_empty() {
        binned
    } else {
        format!("{binned}; bottom row: KLD of the next-token distributions, log10 from {k_lo:.1} to {k_hi:.1}")
    };
    let root = SVGBackend::new(path, (width, height)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| format!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "worst NMSE per (step, layer), log10 from {lo:.1} (blue) to {hi:.1} (red); x = out of tolerance{binned}"
            ),
            ("sans-serif", 13),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(45)
        .build_cartesian_2d(0..nx, y0..ny)
        .map_err(|e| err(&e))?;
    let (st, ly) = (step_labels, layer_labels);
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("step")
        .y_desc("layer")
        .x_labels(nx.min(40) as usize)
        .y_labels((ny - y0).min(40) as usize)
        .x_label_formatter(&move |x| st.get(*x as usize).cloned().unwrap_or_default())
        .y_label_formatter(&move |y| match usize::try_from(*y) {
            Ok(i) => ly.get(i).cloned().unwrap_or_default(),
            Err(_) => "KLD".into(),
        })
        .draw()
        .map_err(|e| err(&e))?;
    let mut rects = Vec::new();
    let mut marks = Vec::new();
    for xi in 0..nx as usize {
        for yi in 0..ny as usize {
            let (x, y) = (xi as i32, yi as i32);
            let fill = match cells.get(&(xi, yi)) {
                Some(c) if c.nmse.is_finite() => color((lg(c.nmse) - lo) / (hi - lo)),
                Some(c) if c.nmse.is_infinite() => RGBColor(128, 0, 0),
                _ => RGBColor(200, 200, 200),
            };
            rects.push(Rectangle::new([(x, y), (x + 1, y + 1)], fill.filled()));
            if cells.get(&(xi, yi)).is_some_and(|c| c.outside) {
                rects.push(Rectangle::new(
                    [(x, y), (x + 1, y + 1)],
                    ShapeStyle::from(&RED).stroke_width(2),
                ));
                marks.push(Text::new("x", (x, y + 1), ("sans-serif", 14)));
            }
            if first.as_ref().is_some_and(|(cell, _)| *cell == (xi, yi)) {
                rects.push(Rectangle::new(
                    [(x, y), (x + 1, y + 1)],
                    ShapeStyle::from(&BLACK).stroke_width(4),
                ));
            }
        }
    }
    for (&xi, &k) in &kld {
        let fill = if k.is_finite() {
            color((lg(k) - k_lo) / (k_hi - k_lo))
        } else {
            RGBColor(128, 0, 0)
        };
        let x = xi as i32;
        rects.push(Rectangle::new([(x, -1), (x + 1, 0)], fill.filled()));
    }
    chart.draw_series(rects).map_err(|e| err(&e))?;
    chart.draw_series(marks).map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
