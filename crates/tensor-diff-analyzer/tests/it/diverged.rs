//! Issue 20: when the current run decodes other tokens (or covers other positions) than
//! the reference from some step on, those steps compare different computations. By
//! default they are left out of everything (numbers, verdict, exit code, plot) and listed
//! as "not compared: inputs differ"; `--include-diverged` compares them anyway. Traces
//! are synthetic, written with the project's own writer; the expected differences are
//! exact (every value is a small binary fraction, the later steps are moved by 100).

use std::path::Path;

use serde_json::{json, Value};
use trace_format::{Role, RunMeta, StepMeta, TensorLayout, TensorMeta, TraceWriter};

use crate::cli::{code, f64_of, input_error, json, offline, text};

const STEPS: u32 = 6;
const LAYERS: i32 = 2;

/// Six one-token steps, two layers, an 8-element kqv_out per (step, layer). From step
/// `other_from` on the run decodes token 99 instead of the reference's 10 + step, and its
/// values are moved by `by`.
fn write(path: &Path, other_from: u32, by: f32) {
    let mut w = TraceWriter::new().unwrap();
    for s in 0..STEPS {
        let other = s >= other_from;
        w.add_step(StepMeta {
            step: s,
            positions: vec![s as i32],
            tokens: vec![if other { 99 } else { 10 + s as i32 }],
        });
        for l in 0..LAYERS {
            let by = if other { by } else { 0.0 };
            let data: Vec<u8> = (0..8)
                .flat_map(|i| (s as f32 * 0.5 + l as f32 + i as f32 * 0.25 + by).to_le_bytes())
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
        complete: true,
        ..Default::default()
    };
    w.finish_to_path(&run, path).unwrap();
}

fn steps(j: &Value) -> Vec<u64> {
    let mut s: Vec<u64> = j["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["step"].as_u64().unwrap())
        .collect();
    s.sort_unstable();
    s.dedup();
    s
}

#[test]
fn steps_after_a_divergence_are_not_compared_unless_asked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (r, c) = (d.join("ref.gguf"), d.join("cur.gguf"));
    write(&r, STEPS, 0.0);
    write(&c, 3, 100.0);

    // Default: steps 0-2 compared (identical), 3-5 listed, exit 0.
    let o = offline(&r, &c, &["--json"]);
    assert_eq!(code(&o), 0, "{}\n{}", text(&o.stdout), text(&o.stderr));
    let j = json(&o);
    assert_eq!(steps(&j), [0, 1, 2]);
    assert_eq!(j["total_comparisons"], 3 * LAYERS as u64);
    assert_eq!(j["within_tolerance"], j["total_comparisons"]);
    assert_eq!(f64_of(&j["max_abs"]), 0.0);
    assert!(j["layers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|l| l["step"].as_u64().unwrap() < 3));
    assert_eq!(j["first_failure"], Value::Null);
    assert_eq!(j["diverged_at"], 3);
    assert_eq!(
        j["not_compared_inputs_differ"],
        json!({"from_step": 3, "steps": [3, 4, 5], "pairs": 3 * LAYERS, "one_sided": 0})
    );
    assert_eq!(j["unmatched"], json!([]));
    assert_eq!(j["not_comparable"], json!([]));
    assert_eq!(j["skipped"]["inputs_differ"], 2 * 3 * LAYERS);
    assert_eq!(j["skipped"]["total"], 2 * 3 * LAYERS);
    assert_eq!(
        (j["passed"].clone(), j["exit_code"].clone()),
        (json!(true), json!(0))
    );
    let notes = j["notes"].to_string();
    assert!(notes.contains("generation diverged at step 3"), "{notes}");
    assert!(
        notes.contains("steps from 3 on are not compared"),
        "{notes}"
    );
    assert!(!notes.contains("smaller -n"), "{notes}");

    let svg = d.join("plot.svg");
    let o = offline(&r, &c, &["--plot", svg.to_str().unwrap()]);
    assert_eq!(code(&o), 0);
    let out = text(&o.stdout);
    assert!(out.contains("Total comparisons: 6\n"), "{out}");
    assert!(
        out.contains(
            "Not compared: inputs differ from step 3 on (steps 3-5: 6 tensor pair(s)); \
             --include-diverged compares them\n"
        ),
        "{out}"
    );
    assert!(out.contains("First out of tolerance: none"), "{out}");
    assert!(!out.contains("Unmatched tensors (no counterpart)"), "{out}");
    let s = std::fs::read_to_string(&svg).unwrap();
    assert_eq!(crate::plot::marked_cells(&s), 0, "no marked cell");
    assert!(s.contains("steps from 3 on not compared"));
    eprintln!("{out}");

    // --include-diverged: every step compared; the later ones are 100 apart, exactly.
    let o = offline(&r, &c, &["--json", "--include-diverged"]);
    assert_eq!(code(&o), 1, "{}", text(&o.stderr));
    let j = json(&o);
    assert_eq!(steps(&j), [0, 1, 2, 3, 4, 5]);
    assert_eq!(j["total_comparisons"], STEPS as u64 * LAYERS as u64);
    assert_eq!(j["within_tolerance"], 3 * LAYERS as u64);
    assert_eq!(f64_of(&j["max_abs"]), 100.0);
    assert_eq!(j["first_failure"]["step"], 3);
    assert_eq!(j["diverged_at"], 3);
    assert_eq!(j["not_compared_inputs_differ"], Value::Null);
    assert_eq!(j["skipped"]["total"], 0);
    let notes = j["notes"].to_string();
    assert!(notes.contains("compare different inputs"), "{notes}");
}

#[test]
fn inputs_that_differ_from_the_first_step_compare_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (r, c) = (d.join("ref.gguf"), d.join("cur.gguf"));
    write(&r, STEPS, 0.0);
    write(&c, 0, 100.0);
    let e = input_error(&offline(&r, &c, &[]));
    assert!(
        e.contains("nothing was compared: the inputs differ from step 0 on"),
        "{e}"
    );
    assert!(e.contains("--include-diverged"), "{e}");
    let e = input_error(&offline(&r, &c, &["--json"]));
    assert!(e.contains("the inputs differ from step 0"), "{e}");
    let o = offline(&r, &c, &["--include-diverged"]);
    assert_eq!(code(&o), 1, "{}", text(&o.stderr));
}

/// Two real traces of the tiny model, the same configuration sampled with two seeds: they
/// decode other tokens from some step on (found here from the traces' own step tables).
/// The steps before it are the same computation (identical on the CPU), so only the
/// later ones can differ: without the flag they are left out (exit 0), with it compared.
#[test]
fn sampled_runs_are_compared_up_to_their_divergence() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m = crate::cli::model(d, 16);
    let r = d.join("seed1.gguf");
    let rt = crate::cli::reference(&m, &r, &["-n", "4", "--temp", "1", "--seed", "1"]);
    let mut found = None;
    for seed in 2..12 {
        let c = d.join(format!("seed{seed}.gguf"));
        let seed = seed.to_string();
        let ct = crate::cli::reference(&m, &c, &["-n", "4", "--temp", "1", "--seed", &seed]);
        let first = rt
            .steps
            .iter()
            .zip(&ct.steps)
            .find(|(a, b)| a.tokens != b.tokens || a.positions != b.positions)
            .map(|(a, _)| a.step);
        if let Some(step) = first {
            found = Some((c, ct, step));
            break;
        }
    }
    let (c, ct, at) = found.expect("ten seeds sampled the same tokens");
    assert!(at >= 1, "the prompt step is the same");
    let o = offline(&r, &c, &["--json"]);
    assert_eq!(code(&o), 0, "{}\n{}", text(&o.stdout), text(&o.stderr));
    let j = json(&o);
    assert_eq!(j["diverged_at"], at);
    let before =
        |t: &trace_format::TraceFile| t.tensors.iter().filter(|x| x.meta.step < at).count();
    assert_eq!(j["total_comparisons"], before(&rt));
    assert!(steps(&j).iter().all(|&s| s < u64::from(at)));
    assert_eq!(f64_of(&j["max_abs"]), 0.0);
    let x = &j["not_compared_inputs_differ"];
    assert_eq!(x["from_step"], at);
    let after = |t: &trace_format::TraceFile| t.tensors.len() - before(t);
    let (ra, ca) = (after(&rt), after(&ct));
    let pairs = x["pairs"].as_u64().unwrap() as usize;
    assert_eq!(
        2 * pairs + x["one_sided"].as_u64().unwrap() as usize,
        ra + ca
    );
    assert_eq!(j["unmatched"], json!([]));
    // Compared anyway: the later steps compute other things.
    let o = offline(&r, &c, &["--json", "--include-diverged"]);
    assert_eq!(code(&o), 1, "{}", text(&o.stderr));
    let j = json(&o);
    assert!(j["first_failure"]["step"].as_u64().unwrap() >= u64::from(at));
}
