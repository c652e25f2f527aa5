//! First divergence (issue 19): the tiny LLaMA traced with every node (`--tensor-filter
//! .`) as the reference, against a copy of the model whose `blk.1.ffn_down.weight` is
//! scaled by 1 + 1e-3. Everything llama.cpp computes before that weight is used is the
//! same computation on the same bytes, so the first tensor out of tolerance in step and
//! graph order must be `ffn_out-1` (the MUL_MAT by that weight) at step 0, with every
//! tensor before it clean; live and offline, text and JSON. The unchanged model has no
//! divergence.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use gguf_io::{GgmlType, GgufFile};
use serde_json::Value;
use trace_format::TraceFile;

use crate::cli::{analyze, offline, text};

/// A copy of `model` with `blk.1.ffn_down.weight` (F32) scaled by `1 + by`.
fn perturbed(model: &Path, out: &Path, by: f32) -> PathBuf {
    std::fs::copy(model, out).unwrap();
    let (offset, n) = {
        let g = GgufFile::open(model).unwrap();
        let t = g
            .tensors()
            .iter()
            .find(|t| t.name == "blk.1.ffn_down.weight")
            .unwrap();
        assert_eq!(t.ty, GgmlType::F32);
        (
            g.tensor_data_offset(t),
            t.dims.iter().product::<u64>() as usize,
        )
    };
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(out)
        .unwrap();
    let mut bytes = vec![0u8; 4 * n];
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.read_exact(&mut bytes).unwrap();
    for b in bytes.chunks_exact_mut(4) {
        let v = f32::from_le_bytes(b.try_into().unwrap()) * (1.0 + by);
        b.copy_from_slice(&v.to_le_bytes());
    }
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&bytes).unwrap();
    out.to_path_buf()
}

fn llama(model: &Path) -> Vec<String> {
    [
        "-m",
        model.to_str().unwrap(),
        "-p",
        "Hello world",
        "-n",
        "2",
        "-t",
        "2",
        "--temp",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The JSON's compared tensors in step and graph order.
fn ordered(doc: &Value) -> Vec<&Value> {
    let mut v: Vec<(usize, &Value)> = doc["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .collect();
    v.sort_by_key(|(i, t)| {
        (
            t["step"].as_u64().unwrap(),
            t["graph_order"].as_u64().unwrap_or(u64::MAX),
            *i,
        )
    });
    v.into_iter().map(|(_, t)| t).collect()
}

fn check_json(doc: &Value, label: &str) {
    let d = &doc["first_divergence"];
    assert_eq!(d["ggml_name"], "ffn_out-1", "{label}: {d}");
    assert_eq!(d["step"], 0, "{label}");
    assert_eq!(d["layer"], 1, "{label}");
    assert_eq!(d["role"], "node", "{label}");
    assert_eq!(d["band"], "tolerance", "{label}");
    let ordered = ordered(doc);
    let at = ordered
        .iter()
        .position(|t| t["within"] == false)
        .expect("something out of tolerance");
    assert_eq!(ordered[at]["ggml_name"], "ffn_out-1", "{label}");
    assert_eq!(d["clean_before"].as_u64().unwrap() as usize, at, "{label}");
    // Everything before it is clean (and identical: the same computation).
    for t in &ordered[..at] {
        assert_eq!(t["within"], true, "{label}: {t}");
        assert_eq!(t["metrics"]["max_abs"], 0.0, "{label}: {}", t["ggml_name"]);
    }
    // Before it: every node of layer 0 and layer 1's attention at step 0.
    let before: Vec<&str> = ordered[..at]
        .iter()
        .map(|t| t["ggml_name"].as_str().unwrap())
        .collect();
    for name in ["l_out-0", "kqv_out-1", "attn_out-1", "ffn_swiglu-1"] {
        assert!(
            before.contains(&name),
            "{label}: {name} not before ffn_out-1"
        );
    }
    let just = d["just_before"].as_array().unwrap();
    assert_eq!(just.last().unwrap()["ggml_name"], "ffn_swiglu-1", "{label}");
    eprintln!(
        "{label}: first divergence {} at step {} (graph order {}), nmse {}, {} clean before it",
        d["ggml_name"], d["step"], d["graph_order"], d["nmse"], d["clean_before"]
    );
}

#[test]
fn a_planted_weight_change_is_found_at_the_first_node_that_uses_it() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    tiny_llama::write_model(&model, &tiny_llama::TinyLlamaConfig::default()).unwrap();
    let changed = perturbed(&model, &dir.path().join("changed.gguf"), 1e-3);
    let all = ["--tensor-filter", "."];
    let reference_path = dir.path().join("ref.gguf");
    let mut args = llama(&model);
    args.extend(all.iter().map(|s| s.to_string()));
    args.extend(["--save-gguf".into(), reference_path.display().to_string()]);
    let r = run_monitor(args);
    assert!(!r.nodes.is_empty());

    // Live, JSON and text.
    let live = |own: &[&str]| {
        let mut a = llama(&changed);
        a.extend(["--reference".into(), reference_path.display().to_string()]);
        a.extend(all.iter().chain(own).map(|s| s.to_string()));
        analyze(&a, &[])
    };
    let o = live(&["--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    check_json(&doc, "live");
    let o = live(&[]);
    assert_eq!(o.status.code(), Some(1));
    let out = text(&o.stdout);
    let line = out
        .lines()
        .find(|l| l.starts_with("First divergence:"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.starts_with("First divergence: step 0, layer 1: ffn_out-1 (graph order "),
        "{line}"
    );
    assert!(
        out.contains("just before it: ffn_swiglu-1 (step 0"),
        "{out}"
    );

    // Offline: the changed model traced, then compared as a file.
    let current = dir.path().join("cur.gguf");
    let mut args = llama(&changed);
    args.extend(all.iter().map(|s| s.to_string()));
    args.extend(["--save-gguf".into(), current.display().to_string()]);
    run_monitor(args);
    let plot = dir.path().join("plot.svg");
    let o = offline(
        &reference_path,
        &current,
        &["--json", "--plot", plot.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(
        svg.contains("black frame: first divergence, ffn_out-1 at step 0"),
        "the plot names the first divergence"
    );
    // Its cell (step 0: column 0; layer 1: row 2 of layers -1, 0, 1) is framed in black
    // just inside the outline; the cell above it (layer 0) is not.
    let pix = crate::plot::render(svg.as_bytes());
    let lay = tensor_diff_analyzer::plot::Layout::new(3, 3, false);
    let frame = |row: i32| {
        let ((x0, y0), (_, y1)) = lay.cell_rect(0, row);
        let k = tensor_diff_analyzer::plot::OUTLINE_RECTS as i32;
        let (edge, inside) = (
            crate::plot::rgb(&pix, x0 + k, (y0 + y1) / 2),
            crate::plot::rgb(&pix, x0 + k + 2, y0 + k + 2),
        );
        let sum = |c: (u8, u8, u8)| c.0 as i32 + c.1 as i32 + c.2 as i32;
        (sum(edge), sum(inside))
    };
    let (edge, inside) = frame(2);
    assert!(
        edge < 150 && inside > edge + 100,
        "first divergence cell: {edge} vs {inside}"
    );
    let (edge, inside) = frame(1);
    assert!(
        (edge - inside).abs() < 30,
        "layer 0's cell: {edge} vs {inside}"
    );
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    check_json(&doc, "offline");
    // Only the nodes a filter names: the divergence is then the first of those.
    let o = offline(
        &reference_path,
        &current,
        &["--json", "--tensor-filter", "l_out"],
    );
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(doc["first_divergence"]["ggml_name"], "l_out-1", "{doc}");

    // The unchanged model: no divergence, exit 0.
    let o = offline(&reference_path, &reference_path, &["--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        doc["first_divergence"].is_null(),
        "{}",
        doc["first_divergence"]
    );
}

pub(crate) fn run_monitor(args: Vec<String>) -> TraceFile {
    let out = args[args.iter().position(|a| a == "--save-gguf").unwrap() + 1].clone();
    let opts = match kcm_cli::capture_args::parse(args).unwrap() {
        kcm_cli::capture_args::Command::Run(o) => o,
        c => panic!("{c:?}"),
    };
    {
        let _one = crate::cli::LLAMA.lock().unwrap_or_else(|p| p.into_inner());
        kcm_cli::trace::run(&opts).unwrap();
    }
    TraceFile::open(out).unwrap()
}
