//! `--plot FILE.svg`: where the error lives. A heatmap of the worst NMSE (log10) over the
//! tensors of each (step, layer): layers are rows, steps columns; cells with a tensor out
//! of tolerance are outlined in red and marked with an x; cells with nothing compared are
//! grey. Drawn with `plotters` (SVG backend).

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;

use crate::report::Outcome;

/// NMSE of exactly 0 is drawn at this log10 value.
const FLOOR: f64 = -16.0;

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
    let mut cells: BTreeMap<(u32, i32), Cell> = BTreeMap::new();
    for c in &o.comparisons {
        let e = cells.entry((c.step, c.layer)).or_insert(Cell {
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
    let steps: Vec<u32> = {
        let mut s: Vec<u32> = cells.keys().map(|k| k.0).collect();
        s.dedup();
        s.sort_unstable();
        s.dedup();
        s
    };
    let mut layers: Vec<i32> = cells.keys().map(|k| k.1).collect();
    layers.sort_unstable();
    layers.dedup();
    if steps.is_empty() {
        return Err("nothing was compared, nothing to plot".into());
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
    let (nx, ny) = (steps.len() as i32, layers.len() as i32);
    let cell_px = 28u32;
    let width = (120 + cell_px * nx as u32).max(480);
    let height = 130 + cell_px * ny as u32;
    let root = SVGBackend::new(path, (width, height)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| format!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "worst NMSE per (step, layer), log10 from {lo:.1} (blue) to {hi:.1} (red); x = out of tolerance"
            ),
            ("sans-serif", 13),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(45)
        .build_cartesian_2d(0..nx, 0..ny)
        .map_err(|e| err(&e))?;
    let (st, ly) = (steps.clone(), layers.clone());
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("step")
        .y_desc("layer")
        .x_labels(nx.min(40) as usize)
        .y_labels(ny.min(40) as usize)
        .x_label_formatter(&move |x| st.get(*x as usize).map_or(String::new(), |s| s.to_string()))
        .y_label_formatter(&move |y| ly.get(*y as usize).map_or(String::new(), |l| l.to_string()))
        .draw()
        .map_err(|e| err(&e))?;
    let mut rects = Vec::new();
    let mut marks = Vec::new();
    for (xi, s) in steps.iter().enumerate() {
        for (yi, l) in layers.iter().enumerate() {
            let (x, y) = (xi as i32, yi as i32);
            let fill = match cells.get(&(*s, *l)) {
                Some(c) if c.nmse.is_finite() => color((lg(c.nmse) - lo) / (hi - lo)),
                Some(c) if c.nmse.is_infinite() => RGBColor(128, 0, 0),
                _ => RGBColor(200, 200, 200),
            };
            rects.push(Rectangle::new([(x, y), (x + 1, y + 1)], fill.filled()));
            if cells.get(&(*s, *l)).is_some_and(|c| c.outside) {
                rects.push(Rectangle::new(
                    [(x, y), (x + 1, y + 1)],
                    ShapeStyle::from(&RED).stroke_width(2),
                ));
                marks.push(Text::new("x", (x, y + 1), ("sans-serif", 14)));
            }
        }
    }
    chart.draw_series(rects).map_err(|e| err(&e))?;
    chart.draw_series(marks).map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
