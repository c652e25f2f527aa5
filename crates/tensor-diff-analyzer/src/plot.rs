//! `--plot FILE.svg`: where the error lives. A heatmap of the worst NMSE over the tensors of
//! each (step, layer): steps are columns, layers rows (layer 0 at the top). The colour is
//! log10 of the NMSE on a perceptually uniform palette (viridis: dark purple small, yellow
//! large) with a labelled colour bar; cells with a tensor out of tolerance are outlined in
//! red (the tolerance is written in the legend); cells with nothing compared are light grey.
//! With both runs' logits, a row under the last layer shows the KL divergence of the
//! next-token distributions per step, on its own colour bar. Tick labels sit at the centre
//! of their cell; on small grids every cell also carries its value. Drawn with `plotters`
//! (SVG backend) on a pixel layout of our own ([`Layout`]), so tests can find every cell.
//!
//! At most [`MAX_COLUMNS`] columns and [`MAX_ROWS`] rows are drawn: with more steps (or
//! layers), consecutive ones are binned, each cell showing the worst of its bin, and the
//! title says so; the file stays small whatever the trace holds.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::report::Outcome;

/// NMSE (or KLD) of exactly 0 is drawn at this log10 value.
const FLOOR: f64 = -16.0;

/// Most columns (steps, or bins of consecutive steps) drawn.
pub const MAX_COLUMNS: usize = 120;
/// Most rows (layers, or bins of consecutive layers) drawn.
pub const MAX_ROWS: usize = 64;
/// Grids of at most this many cells write each cell's value in it.
pub const MAX_LABELLED_CELLS: usize = 400;
/// An out-of-tolerance cell is outlined by this many nested 1-px red rectangles (SVG
/// rectangles carry no stroke width in plotters' backend); the legend's swatch too.
pub const OUTLINE_RECTS: usize = 3;
/// The outline's colour.
pub const OUTLINE: RGBColor = RGBColor(255, 0, 0);
/// Most bands a colour bar is drawn with.
pub const BAR_BANDS: i32 = 128;
/// Cells with nothing compared.
pub const EMPTY: RGBColor = RGBColor(220, 220, 220);
/// Cells whose NMSE is not finite (NaN or infinite values compared).
pub const NON_FINITE: RGBColor = RGBColor(0, 0, 0);

/// The palette: `t` in 0..=1 (clamped) to viridis.
pub fn palette(t: f64) -> RGBColor {
    ViridisRGB::get_color(t.clamp(0.0, 1.0))
}

/// Pixel geometry of the plot: the grid, the KLD row and the colour bars. Public so that
/// tests can sample the rendered image where a given cell is.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub width: i32,
    pub height: i32,
    /// Left and top edge of the grid.
    pub left: i32,
    pub top: i32,
    /// Cell side in pixels.
    pub cell: i32,
    pub columns: i32,
    pub rows: i32,
    /// The KLD row's top edge, when there is one.
    pub kld_top: Option<i32>,
    /// The colour bars: left edge of the first, width of each, top and height.
    pub bar_left: i32,
    pub bar_width: i32,
    pub bar_top: i32,
    pub bar_height: i32,
    /// Horizontal distance between the NMSE bar and the KLD bar.
    pub bar_step: i32,
}

impl Layout {
    pub fn new(columns: usize, rows: usize, kld_row: bool) -> Layout {
        let columns = columns.clamp(1, MAX_COLUMNS) as i32;
        let rows = rows.clamp(1, MAX_ROWS) as i32;
        let cell = if columns > 60 { 14 } else { 28 };
        let (left, top) = (70, 60);
        let grid_h = cell * rows + if kld_row { cell + 8 } else { 0 };
        let bar_left = left + cell * columns + 30;
        let bar_width = 16;
        let bar_step = 80;
        let bars = if kld_row { 2 } else { 1 };
        let bar_height = grid_h.max(160);
        Layout {
            width: (bar_left + bars * bar_step + 20).max(520),
            height: top + bar_height + 110,
            left,
            top,
            cell,
            columns,
            rows,
            kld_top: kld_row.then_some(top + cell * rows + 8),
            bar_left,
            bar_width,
            bar_top: top,
            bar_height,
            bar_step,
        }
    }

    /// The cell of column `x` and row `y` (0 = first layer row): upper-left and
    /// lower-right corners (exclusive).
    pub fn cell_rect(&self, x: i32, y: i32) -> ((i32, i32), (i32, i32)) {
        let (x0, y0) = (self.left + x * self.cell, self.top + y * self.cell);
        ((x0, y0), (x0 + self.cell, y0 + self.cell))
    }

    /// The KLD cell of column `x`.
    pub fn kld_rect(&self, x: i32) -> Option<((i32, i32), (i32, i32))> {
        let y0 = self.kld_top?;
        let x0 = self.left + x * self.cell;
        Some(((x0, y0), (x0 + self.cell, y0 + self.cell)))
    }

    /// The pixel row of the colour bar `bar` (0: NMSE, 1: KLD) at fraction `t` of its
    /// scale (0: bottom, the smallest value; 1: top).
    pub fn bar_y(&self, t: f64) -> i32 {
        let t = t.clamp(0.0, 1.0);
        self.bar_top + ((1.0 - t) * f64::from(self.bar_height - 1)).round() as i32
    }

    /// The horizontal centre of colour bar `bar`.
    pub fn bar_x(&self, bar: i32) -> i32 {
        self.bar_left + bar * self.bar_step + self.bar_width / 2
    }
}

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

fn lg(x: f64) -> f64 {
    if x <= 0.0 {
        FLOOR
    } else {
        x.log10()
    }
}

/// A log10 colour scale: its range, from the finite values it shows.
#[derive(Clone, Copy, Debug)]
struct Scale {
    lo: f64,
    hi: f64,
}

impl Scale {
    fn of(values: impl Iterator<Item = f64>) -> Scale {
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for v in values.filter(|v| v.is_finite()) {
            lo = lo.min(lg(v));
            hi = hi.max(lg(v));
        }
        if !lo.is_finite() {
            return Scale { lo: FLOOR, hi: 0.0 };
        }
        // Whole decades where the range spans more than one; else a decade around it.
        if hi - lo >= 1.0 {
            Scale {
                lo: lo.floor(),
                hi: hi.ceil(),
            }
        } else {
            let mid = (lo + hi) / 2.0;
            Scale {
                lo: mid - 0.5,
                hi: mid + 0.5,
            }
        }
    }

    fn t(&self, v: f64) -> f64 {
        (lg(v) - self.lo) / (self.hi - self.lo)
    }

    /// Tick values (log10) on the bar: whole decades, at most about 8 of them.
    fn ticks(&self) -> Vec<f64> {
        let span = self.hi - self.lo;
        if span < 1.0 + 1e-9 && (self.lo.fract() != 0.0 || self.hi.fract() != 0.0) {
            return vec![self.lo, (self.lo + self.hi) / 2.0, self.hi];
        }
        let every = (span / 8.0).ceil().max(1.0);
        let mut out = Vec::new();
        let mut v = self.lo;
        while v <= self.hi + 1e-9 {
            out.push(v);
            v += every;
        }
        out
    }
}

/// A log10 value as a label: "1e-7" on whole decades, else two significant digits.
fn tick_label(l: f64) -> String {
    if (l - l.round()).abs() < 1e-9 {
        format!("1e{}", l.round() as i64)
    } else {
        format!("{:.1e}", 10f64.powf(l))
    }
}

/// A cell's value, short enough for a 28-px cell.
fn cell_label(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.is_finite() {
        format!("{v:.0e}")
    } else {
        "inf".into()
    }
}

/// Dark text on the palette's light end, white on its dark end.
fn ink(t: f64) -> RGBColor {
    if t > 0.55 {
        BLACK
    } else {
        WHITE
    }
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
            if e.nmse.is_nan() || m.nmse > e.nmse || m.nmse.is_nan() {
                e.nmse = m.nmse;
            }
        }
    }
    let scale = Scale::of(cells.values().map(|c| c.nmse));
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
    let k_scale = Scale::of(kld.values().copied());
    let (nx, ny) = (step_labels.len(), layer_labels.len());
    let lay = Layout::new(nx, ny, !kld.is_empty());

    let mut notes = match (step_bin, layer_bin) {
        (1, 1) => String::new(),
        (s, 1) => format!(
            "{} steps binned by {s}, each cell the worst of its bin",
            steps.len()
        ),
        (1, l) => format!(
            "{} layers binned by {l}, each cell the worst of its bin",
            layers.len()
        ),
        (s, l) => format!(
            "{} steps binned by {s} and {} layers by {l}, each cell the worst of its bin",
            steps.len(),
            layers.len()
        ),
    };
    if let Some(x) = &o.inputs_differ {
        if !notes.is_empty() {
            notes.push_str("; ");
        }
        notes.push_str(&format!(
            "steps from {} on not compared: inputs differ",
            x.from_step
        ));
    }
    if !kld.is_empty() {
        if !notes.is_empty() {
            notes.push_str("; ");
        }
        notes.push_str("bottom row: KLD of the next-token distributions");
    }
    // The first divergence (report::Outcome::first_divergence): its cell framed in black.
    let first = o.first_divergence().map(|d| {
        let c = d.at;
        if !notes.is_empty() {
            notes.push_str("; ");
        }
        notes.push_str(&format!(
            "black frame: first divergence, {} at step {}",
            crate::report::tensor_label(c),
            c.step
        ));
        (col_of[&c.step], row_of[&c.layer])
    });

    let root = SVGBackend::new(path, (lay.width as u32, lay.height as u32)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| format!("drawing {}: {e}", path.display());
    draw(
        &root,
        &lay,
        &Drawn {
            cells: &cells,
            kld: &kld,
            scale,
            k_scale,
            step_labels: &step_labels,
            layer_labels: &layer_labels,
            notes: &notes,
            tolerance: &tolerance_text(o),
            first,
        },
    )
    .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

fn tolerance_text(o: &Outcome) -> String {
    let t = &o.tolerance;
    format!(
        "red outline: a tensor out of tolerance (abs {:e}, rel {:e}, {}{})",
        t.abs,
        t.rel,
        t.mode.name(),
        if t.max_mismatch_pct > 0.0 {
            format!(", up to {}% of elements", t.max_mismatch_pct)
        } else {
            String::new()
        }
    )
}

struct Drawn<'a> {
    cells: &'a BTreeMap<(usize, usize), Cell>,
    kld: &'a BTreeMap<usize, f64>,
    scale: Scale,
    k_scale: Scale,
    step_labels: &'a [String],
    layer_labels: &'a [String],
    notes: &'a str,
    tolerance: &'a str,
    /// The first divergence's cell (column, row), framed in black.
    first: Option<(usize, usize)>,
}

type DrawResult<E> = Result<(), DrawingAreaErrorKind<E>>;

fn text_style(size: i32, h: HPos, v: VPos, color: RGBColor) -> TextStyle<'static> {
    TextStyle {
        font: ("sans-serif", size).into_font(),
        color: color.to_backend_color(),
        pos: Pos::new(h, v),
    }
}

fn outline<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    (a, b): ((i32, i32), (i32, i32)),
) -> DrawResult<DB::ErrorType> {
    for i in 0..OUTLINE_RECTS as i32 {
        root.draw(&Rectangle::new(
            [(a.0 + i, a.1 + i), (b.0 - 1 - i, b.1 - 1 - i)],
            OUTLINE.stroke_width(1),
        ))?;
    }
    Ok(())
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    lay: &Layout,
    d: &Drawn,
) -> DrawResult<DB::ErrorType> {
    root.fill(&WHITE)?;
    let (nx, ny) = (lay.columns, lay.rows);
    let labelled = (nx * ny) as usize <= MAX_LABELLED_CELLS && lay.cell >= 28;

    // Title and notes.
    root.draw(&Text::new(
        "worst NMSE per (step, layer), log10 colour scale".to_string(),
        (lay.left, 12),
        text_style(15, HPos::Left, VPos::Top, BLACK),
    ))?;
    if !d.notes.is_empty() {
        root.draw(&Text::new(
            d.notes.to_string(),
            (lay.left, 34),
            text_style(12, HPos::Left, VPos::Top, BLACK),
        ))?;
    }

    // Cells.
    for x in 0..nx {
        for y in 0..ny {
            let r = lay.cell_rect(x, y);
            let cell = d.cells.get(&(x as usize, y as usize));
            let (fill, t) = match cell {
                Some(c) if c.nmse.is_finite() => {
                    let t = d.scale.t(c.nmse);
                    (palette(t), Some(t))
                }
                Some(c) if !c.nmse.is_nan() => (NON_FINITE, None),
                Some(_) => (EMPTY, None), // compared nothing numeric (shape/type mismatch)
                None => (EMPTY, None),
            };
            root.draw(&Rectangle::new([r.0, r.1], fill.filled()))?;
            if labelled {
                if let Some(c) = cell {
                    let txt = if c.nmse.is_nan() {
                        String::new()
                    } else {
                        cell_label(c.nmse)
                    };
                    if !txt.is_empty() {
                        let colour = t.map(ink).unwrap_or(WHITE);
                        root.draw(&Text::new(
                            txt,
                            ((r.0 .0 + r.1 .0) / 2, (r.0 .1 + r.1 .1) / 2),
                            text_style(8, HPos::Center, VPos::Center, colour),
                        ))?;
                    }
                }
            }
            if cell.is_some_and(|c| c.outside) {
                outline(root, r)?;
            }
            if d.first == Some((x as usize, y as usize)) {
                // Two nested 1-px rectangles just inside the red outline's place.
                let k = OUTLINE_RECTS as i32;
                for i in k..k + 2 {
                    root.draw(&Rectangle::new(
                        [(r.0 .0 + i, r.0 .1 + i), (r.1 .0 - 1 - i, r.1 .1 - 1 - i)],
                        BLACK.stroke_width(1),
                    ))?;
                }
            }
        }
    }
    if let Some(_top) = lay.kld_top {
        for x in 0..nx {
            let Some(r) = lay.kld_rect(x) else { continue };
            let (fill, t) = match d.kld.get(&(x as usize)) {
                Some(k) if k.is_finite() => {
                    let t = d.k_scale.t(*k);
                    (palette(t), Some(t))
                }
                Some(_) => (NON_FINITE, None),
                None => (EMPTY, None),
            };
            root.draw(&Rectangle::new([r.0, r.1], fill.filled()))?;
            if labelled {
                if let (Some(k), Some(t)) = (d.kld.get(&(x as usize)), t) {
                    root.draw(&Text::new(
                        cell_label(*k),
                        ((r.0 .0 + r.1 .0) / 2, (r.0 .1 + r.1 .1) / 2),
                        text_style(8, HPos::Center, VPos::Center, ink(t)),
                    ))?;
                }
            }
        }
    }

    // Tick labels at cell centres: every column (row) whose label fits.
    let widest = d.step_labels.iter().map(|s| s.len()).max().unwrap_or(1) as i32;
    let every_x = ((widest * 7 + 6) / lay.cell + 1).max(1);
    let below = lay
        .kld_rect(0)
        .map(|r| r.1 .1)
        .unwrap_or(lay.top + ny * lay.cell);
    for x in (0..nx).step_by(every_x as usize) {
        let label = d.step_labels.get(x as usize).cloned().unwrap_or_default();
        let cx = lay.left + x * lay.cell + lay.cell / 2;
        root.draw(&PathElement::new(
            vec![(cx, below), (cx, below + 4)],
            BLACK.stroke_width(1),
        ))?;
        root.draw(&Text::new(
            label,
            (cx, below + 6),
            text_style(11, HPos::Center, VPos::Top, BLACK),
        ))?;
    }
    let every_y = (14 / lay.cell + 1).max(1);
    for y in (0..ny).step_by(every_y as usize) {
        let label = d.layer_labels.get(y as usize).cloned().unwrap_or_default();
        let cy = lay.top + y * lay.cell + lay.cell / 2;
        root.draw(&PathElement::new(
            vec![(lay.left - 4, cy), (lay.left, cy)],
            BLACK.stroke_width(1),
        ))?;
        root.draw(&Text::new(
            label,
            (lay.left - 6, cy),
            text_style(11, HPos::Right, VPos::Center, BLACK),
        ))?;
    }
    if let Some(r) = lay.kld_rect(0) {
        root.draw(&Text::new(
            "KLD".to_string(),
            (lay.left - 6, (r.0 .1 + r.1 .1) / 2),
            text_style(11, HPos::Right, VPos::Center, BLACK),
        ))?;
    }
    root.draw(&Text::new(
        "step".to_string(),
        (lay.left + nx * lay.cell / 2, below + 24),
        text_style(13, HPos::Center, VPos::Top, BLACK),
    ))?;
    root.draw(&Text::new(
        "layer".to_string(),
        (14, lay.top + ny * lay.cell / 2),
        text_style(13, HPos::Center, VPos::Center, BLACK).transform(FontTransform::Rotate270),
    ))?;

    // Colour bars.
    colour_bar(root, lay, 0, &d.scale, "NMSE")?;
    if !d.kld.is_empty() {
        colour_bar(root, lay, 1, &d.k_scale, "KLD")?;
    }

    // Legend.
    let ly = lay.height - 40;
    let sw = ((lay.left, ly), (lay.left + 16, ly + 16));
    root.draw(&Rectangle::new([sw.0, sw.1], palette(0.5).filled()))?;
    outline(root, sw)?;
    root.draw(&Text::new(
        d.tolerance.to_string(),
        (lay.left + 22, ly + 8),
        text_style(11, HPos::Left, VPos::Center, BLACK),
    ))?;
    let ly2 = ly + 20;
    root.draw(&Rectangle::new(
        [(lay.left, ly2), (lay.left + 16, ly2 + 14)],
        EMPTY.filled(),
    ))?;
    root.draw(&Text::new(
        "nothing compared".to_string(),
        (lay.left + 22, ly2 + 7),
        text_style(11, HPos::Left, VPos::Center, BLACK),
    ))?;
    root.draw(&Rectangle::new(
        [(lay.left + 150, ly2), (lay.left + 166, ly2 + 14)],
        NON_FINITE.filled(),
    ))?;
    root.draw(&Text::new(
        "not finite (NaN or inf values)".to_string(),
        (lay.left + 172, ly2 + 7),
        text_style(11, HPos::Left, VPos::Center, BLACK),
    ))?;
    Ok(())
}

fn colour_bar<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    lay: &Layout,
    bar: i32,
    scale: &Scale,
    what: &str,
) -> DrawResult<DB::ErrorType> {
    let x0 = lay.bar_left + bar * lay.bar_step;
    let x1 = x0 + lay.bar_width;
    // Bands of at most BAR_BANDS: each the colour at its centre's height (the palette
    // is linear between 8 stops, so 128 bands differ from a smooth bar by < 1%).
    let bands = lay.bar_height.min(BAR_BANDS);
    for b in 0..bands {
        let ya = lay.bar_top + b * lay.bar_height / bands;
        let yb = lay.bar_top + (b + 1) * lay.bar_height / bands;
        let centre = f64::from(ya + yb - 1) / 2.0 - f64::from(lay.bar_top);
        let t = 1.0 - centre / f64::from(lay.bar_height - 1);
        root.draw(&Rectangle::new([(x0, ya), (x1, yb)], palette(t).filled()))?;
    }
    root.draw(&Rectangle::new(
        [(x0, lay.bar_top), (x1, lay.bar_top + lay.bar_height)],
        BLACK.stroke_width(1),
    ))?;
    for l in scale.ticks() {
        let y = lay.bar_y((l - scale.lo) / (scale.hi - scale.lo));
        root.draw(&PathElement::new(
            vec![(x1, y), (x1 + 4, y)],
            BLACK.stroke_width(1),
        ))?;
        root.draw(&Text::new(
            tick_label(l),
            (x1 + 6, y),
            text_style(10, HPos::Left, VPos::Center, BLACK),
        ))?;
    }
    root.draw(&Text::new(
        what.to_string(),
        (x0 + lay.bar_width / 2, lay.bar_top - 8),
        text_style(12, HPos::Center, VPos::Bottom, BLACK),
    ))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scale_spans_whole_decades_and_ticks_them() {
        let s = Scale::of([1e-9, 3e-7, 2e-3].into_iter());
        assert_eq!((s.lo, s.hi), (-9.0, -2.0));
        assert_eq!(
            s.ticks(),
            vec![-9.0, -8.0, -7.0, -6.0, -5.0, -4.0, -3.0, -2.0]
        );
        assert!((s.t(1e-9)).abs() < 1e-12 && (s.t(1e-2) - 1.0).abs() < 1e-12);
        // Sixteen decades: every other one.
        let s = Scale::of([0.0, 1.0].into_iter());
        assert_eq!((s.lo, s.hi), (FLOOR, 0.0));
        assert_eq!(s.ticks().len(), 9);
        // One value: a decade around it, three ticks, the value in the middle.
        let s = Scale::of([5e-6].into_iter());
        assert!((s.t(5e-6) - 0.5).abs() < 1e-12);
        assert_eq!(s.ticks().len(), 3);
        // Nothing finite: a default range, no panic.
        let s = Scale::of([f64::NAN, f64::INFINITY].into_iter());
        assert_eq!((s.lo, s.hi), (FLOOR, 0.0));
    }

    #[test]
    fn labels_and_palette() {
        assert_eq!(tick_label(-7.0), "1e-7");
        assert_eq!(cell_label(3.2e-8), "3e-8");
        assert_eq!(cell_label(0.0), "0");
        // viridis: dark purple at 0, yellow at 1, clamped outside.
        assert_eq!(palette(0.0), RGBColor(68, 1, 84));
        assert_eq!(palette(1.0), RGBColor(254, 232, 37));
        assert_eq!(palette(-3.0), palette(0.0));
        assert_eq!(palette(7.0), palette(1.0));
    }

    #[test]
    fn cells_do_not_overlap_the_bars() {
        for (nx, ny, k) in [(1, 1, false), (40, 18, true), (120, 64, true)] {
            let l = Layout::new(nx, ny, k);
            let last = l.cell_rect(l.columns - 1, l.rows - 1);
            assert!(last.1 .0 < l.bar_left, "{l:?}");
            assert!(l.bar_x(if k { 1 } else { 0 }) + 60 <= l.width, "{l:?}");
            assert!(l.bar_top + l.bar_height < l.height - 40, "{l:?}");
        }
    }
}

/// Where `--plot FILE.svg` writes the per-(head, position) panels: `FILE.heads.svg`.
pub fn heads_path(plot: &Path) -> std::path::PathBuf {
    let stem = plot
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plot".into());
    plot.with_file_name(format!("{stem}.heads.svg"))
}

/// Pixel geometry of the per-(head, position) panels, one per layer, stacked.
#[derive(Clone, Debug)]
pub struct HeadsLayout {
    pub width: i32,
    pub height: i32,
    pub left: i32,
    pub top: i32,
    /// Cell width (a position, or a bin of positions) and height (a head).
    pub cell_w: i32,
    pub cell_h: i32,
    /// Each panel's top edge.
    pub panel_tops: Vec<i32>,
    pub columns: i32,
    pub bar_left: i32,
    pub bar_width: i32,
    pub bar_top: i32,
    pub bar_height: i32,
}

impl HeadsLayout {
    /// `heads[i]`: the number of heads of panel `i`; `columns`: position columns drawn.
    pub fn new(heads: &[u32], columns: usize) -> HeadsLayout {
        let columns = columns.clamp(1, MAX_COLUMNS) as i32;
        let cell_w = if columns > 60 { 6 } else { 14 };
        let max_heads = heads.iter().copied().max().unwrap_or(1).max(1) as i32;
        let cell_h = (96 / max_heads).clamp(3, 14);
        let (left, top) = (90, 60);
        let mut panel_tops = Vec::with_capacity(heads.len());
        let mut y = top;
        for &h in heads {
            panel_tops.push(y);
            y += cell_h * h.max(1) as i32 + 34;
        }
        let bar_left = left + cell_w * columns + 30;
        let bar_height = (y - top - 34).clamp(160, 600);
        HeadsLayout {
            width: (bar_left + 100).max(520),
            height: y.max(top + bar_height) + 50,
            left,
            top,
            cell_w,
            cell_h,
            panel_tops,
            columns,
            bar_left,
            bar_width: 16,
            bar_top: top,
            bar_height,
        }
    }

    /// Panel `panel`'s cell of head `head`, column `col`: corners.
    pub fn cell_rect(&self, panel: usize, head: i32, col: i32) -> ((i32, i32), (i32, i32)) {
        let x0 = self.left + col * self.cell_w;
        let y0 = self.panel_tops[panel] + head * self.cell_h;
        ((x0, y0), (x0 + self.cell_w, y0 + self.cell_h))
    }

    fn as_bar_layout(&self) -> Layout {
        Layout {
            width: self.width,
            height: self.height,
            left: self.left,
            top: self.top,
            cell: self.cell_w,
            columns: self.columns,
            rows: 1,
            kld_top: None,
            bar_left: self.bar_left,
            bar_width: self.bar_width,
            bar_top: self.bar_top,
            bar_height: self.bar_height,
            bar_step: 0,
        }
    }
}

/// The positions of all panels (the union), binned to at most [`MAX_COLUMNS`] columns:
/// each position's column, and the column labels.
fn position_columns(grids: &[crate::breakdown::Grid]) -> (HashMap<i32, usize>, Vec<String>) {
    let mut all: Vec<i32> = grids.iter().flat_map(|g| g.positions.clone()).collect();
    all.sort_unstable();
    all.dedup();
    let (_, of, labels) = bins(&all, MAX_COLUMNS);
    (of, labels)
}

/// `--plot FILE.svg`'s second file, [`heads_path`]: per layer a panel of kqv_out's NMSE
/// per head (rows, head 0 on top) and token position (columns; binned to at most 120,
/// each cell the worst of its bin), on one log-scale viridis colour bar shared by all
/// panels. Returns the path written, or None when nothing could be broken down.
pub fn write_heads_svg(o: &Outcome, plot: &Path) -> Result<Option<std::path::PathBuf>, String> {
    let grids = &o.by_head_position;
    if grids.is_empty() {
        return Ok(None);
    }
    let path = heads_path(plot);
    let (col_of, labels) = position_columns(grids);
    let heads: Vec<u32> = grids.iter().map(|g| g.heads).collect();
    let lay = HeadsLayout::new(&heads, labels.len());
    // Worst NMSE per (panel, head, column).
    let mut cells: BTreeMap<(usize, u32, usize), Option<f64>> = BTreeMap::new();
    for (i, g) in grids.iter().enumerate() {
        for (h, row) in g.nmse.iter().enumerate() {
            for (p, v) in g.positions.iter().zip(row) {
                let key = (i, h as u32, col_of[p]);
                let e = cells.entry(key).or_insert(Some(f64::NEG_INFINITY));
                *e = match (*e, *v) {
                    (None, _) | (_, None) => None,
                    (Some(a), Some(b)) => Some(a.max(b)),
                };
            }
        }
    }
    let scale = Scale::of(cells.values().filter_map(|v| *v));
    let root = SVGBackend::new(&path, (lay.width as u32, lay.height as u32)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| format!("drawing {}: {e}", path.display());
    draw_heads(&root, &lay, grids, &cells, &labels, &scale).map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    drop(root);
    Ok(Some(path))
}

fn draw_heads<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    lay: &HeadsLayout,
    grids: &[crate::breakdown::Grid],
    cells: &BTreeMap<(usize, u32, usize), Option<f64>>,
    labels: &[String],
    scale: &Scale,
) -> DrawResult<DB::ErrorType> {
    root.fill(&WHITE)?;
    root.draw(&Text::new(
        "kqv_out NMSE per head (rows) and token position (columns), per layer; log10 colour scale"
            .to_string(),
        (lay.left, 12),
        text_style(15, HPos::Left, VPos::Top, BLACK),
    ))?;
    root.draw(&Text::new(
        "summed over every compared step; light grey: not compared, black: reference all zero"
            .to_string(),
        (lay.left, 34),
        text_style(12, HPos::Left, VPos::Top, BLACK),
    ))?;
    let widest = labels.iter().map(|s| s.len()).max().unwrap_or(1) as i32;
    let every_x = ((widest * 7 + 6) / lay.cell_w + 1).max(1);
    for (i, g) in grids.iter().enumerate() {
        let top = lay.panel_tops[i];
        let h_px = lay.cell_h * g.heads.max(1) as i32;
        root.draw(&Text::new(
            format!("layer {}", g.layer),
            (lay.left - 8, top + h_px / 2),
            text_style(11, HPos::Right, VPos::Center, BLACK),
        ))?;
        for h in 0..g.heads {
            for col in 0..lay.columns {
                let r = lay.cell_rect(i, h as i32, col);
                let fill = match cells.get(&(i, h, col as usize)) {
                    Some(Some(v)) => palette(scale.t(*v)),
                    Some(None) => NON_FINITE,
                    None => EMPTY,
                };
                root.draw(&Rectangle::new([r.0, r.1], fill.filled()))?;
            }
        }
        // Position labels under the panel, at column centres.
        for col in (0..lay.columns).step_by(every_x as usize) {
            let cx = lay.left + col * lay.cell_w + lay.cell_w / 2;
            root.draw(&Text::new(
                labels.get(col as usize).cloned().unwrap_or_default(),
                (cx, top + h_px + 3),
                text_style(9, HPos::Center, VPos::Top, BLACK),
            ))?;
        }
    }
    colour_bar(root, &lay.as_bar_layout(), 0, scale, "NMSE")?;
    Ok(())
}
