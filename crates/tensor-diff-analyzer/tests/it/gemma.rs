//! The seed README's workflows 2 and 3, as written, on gemma-3-270m Q4_K_M (fetched once
//! into target/models). Workflow 2 compares a configuration with itself (we have one
//! model: "model_v2" is the same file), so it must pass exactly; workflow 3 compares an
//! f16 golden reference with a q4_0 cache at --tolerance-abs 1e-3. One addition to the
//! seed's commands: `--temp 0`, since llama.cpp samples with a random seed by default and
//! the generated steps would otherwise decode different tokens (the analyzer reports that
//! as "generation diverged at step N"). Run with `-- --nocapture` to see the summaries.

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use test_support::LlamaArgs;
use trace_format::{Role, TraceFile};

const BIN: &str = env!("CARGO_BIN_EXE_tensor-diff-analyzer");

fn monitor(args: &[String]) {
    let opts = match kcm_cli::capture_args::parse(args.to_vec()).unwrap() {
        kcm_cli::capture_args::Command::Run(o) => o,
        c => panic!("{c:?}"),
    };
    kcm_cli::trace::run(&opts).unwrap();
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn analyzer(args: &[String]) -> (i32, String, String) {
    let o = Command::new(BIN).args(args).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn seed_workflows_2_and_3_on_gemma() {
    let model =
        model_fetch::gemma3_270m(&model_fetch::default_cache_dir()).expect("fetch gemma-3-270m");
    let m = model.display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).display().to_string();

    // Workflow 2: baseline, then the analyzer with the same options.
    let base = p("baseline_tensors.gguf");
    let hello = LlamaArgs::new(&m, "Hello, world").n(4).threads(2).greedy();
    monitor(
        &hello
            .clone()
            .args(["--layer", "0", "--save-gguf", &base])
            .build(),
    );
    let (code, out, err) = analyzer(&hello.args(["--reference", &base, "--layer", "0"]).build());
    eprintln!("{out}");
    assert_eq!(code, 0, "{out}\n{err}");
    let t = TraceFile::open(&base).unwrap();
    assert!(out.contains(&format!(
        "Tensors within tolerance: {0}/{0} (100.0%)",
        t.tensors.len()
    )));

    // Workflow 3: golden f16 reference, q4_0 cache at --tolerance-abs 1e-3.
    let golden = p("golden_reference.gguf");
    let test_prompt = LlamaArgs::new(&m, "Test prompt").threads(2).greedy();
    monitor(
        &test_prompt
            .clone()
            .cache("f16", "f16")
            .args(["--save-gguf", &golden])
            .build(),
    );
    let q4 = p("q4_0.gguf");
    let (code, out, err) = analyzer(
        &test_prompt
            .cache("q4_0", "q4_0")
            .args(["--reference", &golden, "--tolerance-abs", "1e-3"])
            .args(["--save-gguf", &q4])
            .build(),
    );
    eprintln!("{out}");
    assert!(code == 0 || code == 1, "{out}\n{err}");
    // head_dim 256 and a quantized cache: llama.cpp rotates, and the analyzer says so.
    assert!(out.contains("rotation basis differs"), "{out}");
    let g = TraceFile::open(&golden).unwrap();
    let n_out = g
        .tensors
        .iter()
        .filter(|t| t.meta.role == Role::KqvOut)
        .count();
    assert_eq!(n_out, 18, "18 layers, one prompt step");
    // Offline gives the same verdict; every golden kqv_out is compared through the q4_0
    // run's kqv_out_unrotated, with q4_0-sized errors (not a basis mismatch).
    let o = Command::new(BIN)
        .args(s(&[
            "--reference",
            &golden,
            "--current",
            &q4,
            "--tolerance-abs",
            "1e-3",
            "--json",
        ]))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(code));
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    let outs: Vec<&Value> = j["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["reference_role"] == "kqv_out")
        .collect();
    assert_eq!(outs.len(), n_out);
    // A basis mismatch would be uncorrelated (NMSE ~ 2, cosine ~ 0). q4_0's own error
    // compounds through the layers, so the bound is loose; layer 0 must be close.
    for c in outs {
        assert_eq!(c["role"], "kqv_out_unrotated");
        let nmse = c["metrics"]["nmse"].as_f64().unwrap();
        let cos = c["metrics"]["cosine"].as_f64().unwrap();
        eprintln!("layer {}: nmse {nmse:.3e} cosine {cos:.6}", c["layer"]);
        assert!(nmse > 0.0 && nmse < 0.5 && cos > 0.7, "{c}");
        if c["layer"] == 0 {
            assert!(nmse < 0.05 && cos > 0.97, "{c}");
        }
    }
    assert_eq!(j["exit_code"].as_i64(), Some(i64::from(code)));
    // Both storages from these runs: the two files (delta, the default) as version 1
    // (test_support::storage::as_storage) compare to the same numbers.
    use test_support::storage::{as_storage, KvStorage};
    let full = |p: &str| {
        as_storage(Path::new(p), KvStorage::Full)
            .display()
            .to_string()
    };
    let o1 = Command::new(BIN)
        .args(s(&[
            "--reference",
            &full(&golden),
            "--current",
            &full(&q4),
            "--tolerance-abs",
            "1e-3",
            "--json",
        ]))
        .output()
        .unwrap();
    let j1: Value = serde_json::from_slice(&o1.stdout).unwrap();
    assert_eq!(j1["tensors"], j["tensors"], "version 1 compares otherwise");
    assert_eq!(j1["exit_code"], j["exit_code"]);
    let _ = Path::new(&q4);
}
