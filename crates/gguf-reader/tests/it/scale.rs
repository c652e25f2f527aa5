//! Scale (issue 14): a synthetic trace of 20,000 (step, layer) groups is verified and
//! diffed at all, within a generous limit (the timings for 5k/10k/20k are measured by the
//! `scale` example: `cargo run --release -p gguf-reader --example scale`).

use std::ffi::OsString;
use std::time::Duration;

use crate::hostile::{analyzer, reader};

/// Generous for a debug build; a pass per group that scans the whole tensor table
/// (120,000 tensors) takes far longer.
const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn twenty_thousand_groups_verify_and_diff() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scale-20k.gguf");
    let bytes = test_support::hostile::synthetic_trace(20_000, 20).unwrap();
    std::fs::write(&path, bytes).unwrap();

    let r = reader(
        &[path.clone().into_os_string(), "--verify-attention".into()],
        LIMIT,
    );
    let out = String::from_utf8_lossy(&r.stdout);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.timed_out, "--verify-attention took over {LIMIT:?}");
    assert_eq!(r.code, Some(0), "{err}");
    assert!(
        out.contains("verified 20000 of 20000 (step, layer) groups: 0 failed"),
        "{}",
        out.lines().last().unwrap_or("")
    );

    let args: Vec<OsString> = vec![
        "--reference".into(),
        path.clone().into(),
        "--current".into(),
        path.into(),
    ];
    let r = analyzer(&args, LIMIT);
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(!r.timed_out, "the analyzer took over {LIMIT:?}");
    assert_eq!(r.code, Some(0), "{}", String::from_utf8_lossy(&r.stderr));
    // Every compared tensor (kqv_out at least, one per group) within tolerance.
    let within = out
        .lines()
        .find_map(|l| l.strip_prefix("Tensors within tolerance: "))
        .and_then(|l| l.split(' ').next())
        .and_then(|f| f.split_once('/'))
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)));
    match within {
        Some((a, b)) => assert!(a == b && b >= 20_000, "{a}/{b} within tolerance"),
        None => panic!("no summary: {out}"),
    }
}
