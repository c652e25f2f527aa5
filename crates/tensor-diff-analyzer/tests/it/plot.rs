//! `--plot`: the heatmap rendered to pixels (resvg) and read back, so a broken plot fails.
//! Two synthetic traces whose difference is known: the reference's values are ±1, and every
//! value of layer `l` differs by `e` with `e² = 10^(l-11.5)`, so each cell's NMSE is about
//! `10^(l-11.5)` (exactly: from the F32 values written), and one (step, layer) by
//! `10^-2.25` (NMSE about `10^-4.5`, out of the default tolerance). The scale spans whole
//! decades, 1e-12 to 1e-4. The colour of each cell, sampled from the PNG, must be the
//! palette's colour at the cell's place on that log scale; the failing cell, and only it, is outlined in red; the
//! colour bar runs from the palette's bottom to its top; tick labels sit at cell centres.

use std::path::Path;

use tensor_diff_analyzer::plot::{palette, Layout, OUTLINE_RECTS};
use trace_format::{Role, RunMeta, StepMeta, TensorLayout, TensorMeta, TraceWriter};

use crate::cli::{code, offline, text};

const STEPS: u32 = 4;
const LAYERS: i32 = 4;
const BUMP: (u32, i32) = (2, 1);

/// Number of cells outlined as out of tolerance in a plot (the legend's swatch is not one).
pub fn marked_cells(svg: &str) -> usize {
    let rects = svg.matches("fill=\"none\" stroke=\"#FF0000\"").count();
    assert_eq!(rects % OUTLINE_RECTS, 0, "{rects} outline rectangles");
    (rects / OUTLINE_RECTS)
        .checked_sub(1)
        .expect("the legend's swatch")
}

/// The difference planted at (step, layer).
fn diff(s: u32, l: i32) -> f64 {
    if (s, l) == BUMP {
        10f64.powf(-2.25)
    } else {
        10f64.powf((f64::from(l) - 11.5) / 2.0)
    }
}

/// The NMSE the analyzer sees at (step, layer): from the F32 values actually written.
fn nmse(s: u32, l: i32) -> f64 {
    let d = f64::from((1.0 + diff(s, l)) as f32) - 1.0;
    d * d
}

fn trace(path: &Path, current: bool) {
    let mut w = TraceWriter::new().unwrap();
    for s in 0..STEPS {
        w.add_step(StepMeta {
            step: s,
            positions: vec![s as i32],
            tokens: vec![1],
        });
        for l in 0..LAYERS {
            let e = if current { diff(s, l) } else { 0.0 };
            let data: Vec<u8> = (0..8)
                .flat_map(|i| {
                    let sign = if i % 2 == 0 { 1.0 } else { -1.0 };
                    ((sign * (1.0 + e)) as f32).to_le_bytes()
                })
                .collect();
            let meta = TensorMeta {
                role: Role::KqvOut,
                layer: l,
                step: s,
                ggml_name: format!("kqv_out-{l}"),
                op: "RESHAPE".into(),
                layout: TensorLayout::contiguous(gguf_io::GgmlType::F32, [8, 1, 1, 1]).unwrap(),
                view_of: String::new(),
            };
            w.add_tensor(meta, &data, false).unwrap();
        }
    }
    let run = RunMeta {
        architecture: "llama".into(),
        n_layer: LAYERS as u32,
        n_head: 2,
        n_head_kv: 2,
        target_layer: -1,
        trace_sources: false,
        complete: true,
        ..Default::default()
    };
    w.finish_to_path(&run, path).unwrap();
}

pub(crate) fn render(svg: &[u8]) -> resvg::tiny_skia::Pixmap {
    let tree = resvg::usvg::Tree::from_data(svg, &resvg::usvg::Options::default())
        .expect("the plot is valid SVG");
    let size = tree.size().to_int_size();
    let mut pixmap = resvg::tiny_skia::Pixmap::new(size.width(), size.height()).unwrap();
    resvg::render(
        &tree,
        resvg::tiny_skia::Transform::default(),
        &mut pixmap.as_mut(),
    );
    pixmap
}

pub(crate) fn rgb(p: &resvg::tiny_skia::Pixmap, x: i32, y: i32) -> (u8, u8, u8) {
    let c = p
        .pixel(x as u32, y as u32)
        .unwrap_or_else(|| panic!("({x}, {y}) outside {}x{}", p.width(), p.height()))
        .demultiply();
    (c.red(), c.green(), c.blue())
}

fn close(a: (u8, u8, u8), b: plotters::style::RGBColor, tol: i32) -> bool {
    (i32::from(a.0) - i32::from(b.0)).abs() <= tol
        && (i32::from(a.1) - i32::from(b.1)).abs() <= tol
        && (i32::from(a.2) - i32::from(b.2)).abs() <= tol
}

/// The `x` attribute of each `<text>` element whose content is `label`.
fn text_x(svg: &str, label: &str) -> Vec<i32> {
    svg.split("<text ")
        .skip(1)
        .filter_map(|t| {
            let (attrs, rest) = t.split_once('>')?;
            let content = rest.split("</text>").next()?.trim();
            if content != label {
                return None;
            }
            let x = attrs.split("x=\"").nth(1)?.split('"').next()?;
            x.parse().ok()
        })
        .collect()
}

#[test]
fn the_heatmap_shows_each_cell_on_a_labelled_log_scale() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (r, c) = (d.join("r.gguf"), d.join("c.gguf"));
    trace(&r, false);
    trace(&c, true);
    let svg_path = d.join("plot.svg");
    let o = offline(&r, &c, &["--plot", svg_path.to_str().unwrap()]);
    assert_eq!(code(&o), 1, "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("First out of tolerance: step 2, layer 1 (kqv_out)"),
        "{}",
        text(&o.stdout)
    );
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    let pixmap = render(svg.as_bytes());
    let png = d.join("plot.png");
    std::fs::write(&png, pixmap.encode_png().unwrap()).unwrap();
    assert!(std::fs::metadata(&png).unwrap().len() > 1000);

    let lay = Layout::new(STEPS as usize, LAYERS as usize, false);
    assert_eq!(
        (pixmap.width() as i32, pixmap.height() as i32),
        (lay.width, lay.height)
    );
    // NMSE from about 10^-11.5 (layer 0) to 10^-4.5 (the bump): the scale spans the
    // decades 1e-12..1e-4; a cell's place on it is (log10 NMSE + 12) / 8.
    for s in 0..STEPS as i32 {
        for l in 0..LAYERS {
            let ((x0, y0), (x1, _)) = lay.cell_rect(s, l);
            let bump = (s as u32, l) == BUMP;
            let t = (nmse(s as u32, l).log10() + 12.0) / 8.0;
            let got = rgb(&pixmap, x0 + 5, y0 + 5);
            assert!(
                close(got, palette(t), 2),
                "cell step {s} layer {l}: {got:?}, expected {:?}",
                palette(t)
            );
            // The outline: red on the cell's edge where out of tolerance, nowhere else
            // (anti-aliased strokes: "red" is strong red and little green, which no
            // viridis colour has).
            let edge = rgb(&pixmap, (x0 + x1) / 2, y0 + 1);
            let red = edge.0 >= 200 && edge.1 <= 100 && edge.2 <= 100;
            assert_eq!(red, bump, "cell step {s} layer {l}: edge {edge:?}");
        }
    }
    assert_eq!(marked_cells(&svg), 1);
    // The colour bar: the palette from bottom (small) to top (large).
    for t in [0.02, 0.25, 0.5, 0.75, 0.98] {
        let got = rgb(&pixmap, lay.bar_x(0), lay.bar_y(t));
        assert!(
            close(got, palette(t), 3),
            "bar at {t}: {got:?} vs {:?}",
            palette(t)
        );
    }
    // Its labels: every decade from 1e-12 to 1e-4, and what it shows.
    for tick in ["1e-12", "1e-8", "1e-4"] {
        assert_eq!(text_x(&svg, tick).len(), 1, "tick {tick}");
    }
    assert_eq!(text_x(&svg, "NMSE").len(), 1);
    // Step labels under the centre of their column, layer labels beside their row.
    for s in 0..STEPS as i32 {
        let ((x0, _), (x1, _)) = lay.cell_rect(s, 0);
        assert!(
            text_x(&svg, &s.to_string()).contains(&((x0 + x1) / 2)),
            "step {s} label at {:?}, centre {}",
            text_x(&svg, &s.to_string()),
            (x0 + x1) / 2
        );
    }
    // The tolerance in the legend; small grids carry each cell's value.
    assert!(
        svg.contains("red outline: a tensor out of tolerance (abs 1e-6, rel 1e-4, elementwise)"),
        "{svg:.3000}"
    );
    assert_eq!(text_x(&svg, "3e-5").len(), 1, "the bump's cell");
    assert_eq!(
        text_x(&svg, "3e-10").len(),
        STEPS as usize,
        "layer 2's cells"
    );
}

/// kqv_out of 2 heads of 4 dims: a 4-token prompt (positions 0-3), then 4 decode steps
/// (positions 4-7). The current run differs only in head 1, from position 2 on, by a
/// relative 1e-4 x position.
fn heads_trace(path: &Path, current: bool) {
    let mut w = TraceWriter::new().unwrap();
    let steps: Vec<Vec<i32>> = vec![vec![0, 1, 2, 3], vec![4], vec![5], vec![6], vec![7]];
    for (s, positions) in steps.iter().enumerate() {
        w.add_step(StepMeta {
            step: s as u32,
            positions: positions.clone(),
            tokens: vec![1; positions.len()],
        });
        let data: Vec<u8> = positions
            .iter()
            .flat_map(|&p| (0..8).map(move |i| head_value(p, i, current)))
            .flat_map(f32::to_le_bytes)
            .collect();
        let meta = TensorMeta {
            role: Role::KqvOut,
            layer: 0,
            step: s as u32,
            ggml_name: "kqv_out-0".into(),
            op: "RESHAPE".into(),
            layout: TensorLayout::contiguous(
                gguf_io::GgmlType::F32,
                [8, positions.len() as u64, 1, 1],
            )
            .unwrap(),
            view_of: String::new(),
        };
        w.add_tensor(meta, &data, false).unwrap();
    }
    let run = RunMeta {
        architecture: "llama".into(),
        n_layer: 1,
        n_head: 2,
        n_head_kv: 2,
        target_layer: -1,
        trace_sources: false,
        complete: true,
        ..Default::default()
    };
    w.finish_to_path(&run, path).unwrap();
}

/// Value `i` (head i / 4, dim i % 4) of the token at position `p`.
fn head_value(p: i32, i: usize, current: bool) -> f32 {
    let r = 0.5 + 0.1 * i as f32 - 0.03 * p as f32;
    if current && i >= 4 && p >= 2 {
        r * (1.0 + 1e-4 * p as f32)
    } else {
        r
    }
}

#[test]
fn the_error_is_broken_down_per_head_and_position() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (r, c) = (d.join("r.gguf"), d.join("c.gguf"));
    heads_trace(&r, false);
    heads_trace(&c, true);
    let svg_path = d.join("where.svg");
    let o = offline(&r, &c, &["--json", "--plot", svg_path.to_str().unwrap()]);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let grids = j["error_by_head_position"].as_array().unwrap();
    assert_eq!(grids.len(), 1, "{j}");
    let g = &grids[0];
    assert_eq!(g["layer"], 0);
    assert_eq!(g["heads"], 2);
    let positions: Vec<i64> = g["positions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_i64().unwrap())
        .collect();
    assert_eq!(positions, (0..8).collect::<Vec<_>>());
    // The oracle: f64 sums over each head's 4 values of each position.
    for h in 0..2usize {
        for p in 0..8i32 {
            let (mut e2, mut r2) = (0.0f64, 0.0f64);
            for i in h * 4..h * 4 + 4 {
                let (cv, rv) = (
                    f64::from(head_value(p, i, true)),
                    f64::from(head_value(p, i, false)),
                );
                e2 += (cv - rv) * (cv - rv);
                r2 += rv * rv;
            }
            let want = e2 / r2;
            let got = g["nmse"][h][p as usize].as_f64().unwrap();
            assert!(
                (got - want).abs() <= 1e-12 * want.max(1e-300),
                "head {h} position {p}: {got} vs {want}"
            );
            assert_eq!(got > 0.0, h == 1 && p >= 2, "head {h} position {p}: {got}");
        }
    }
    // The panels: rendered, head 1's last position at its place on the shared log scale,
    // head 0 at the scale's bottom (NMSE 0).
    let heads_svg = tensor_diff_analyzer::plot::heads_path(&svg_path);
    let svg = std::fs::read_to_string(&heads_svg).unwrap();
    assert!(svg.contains("layer 0"), "{svg:.1500}");
    let pixmap = render(svg.as_bytes());
    let lay = tensor_diff_analyzer::plot::HeadsLayout::new(&[2], 8);
    let top = g["nmse"][1][7].as_f64().unwrap();
    let hi = top.log10().ceil();
    for (h, p, t) in [
        (0, 7, 0.0),
        (1, 1, 0.0),
        (1, 7, (top.log10() + 16.0) / (hi + 16.0)),
    ] {
        let ((x0, y0), _) = lay.cell_rect(0, h, p);
        let got = rgb(&pixmap, x0 + 2, y0 + 2);
        assert!(
            close(got, palette(t), 3),
            "head {h} position {p}: {got:?} vs {:?}",
            palette(t)
        );
    }
}
