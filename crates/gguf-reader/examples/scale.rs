//! Scale measurement (issue 14): synthetic traces of 5,000, 10,000 and 20,000 (step, layer)
//! groups (`test_support::hostile::synthetic_trace`, 20 layers, six tiny tensors per
//! group), timed through `gguf-reader --verify-attention` and `tensor-diff-analyzer
//! --reference F --current F` (their library entry points, in this process). Linear work
//! doubles the time with the groups.
//!
//! ```sh
//! cargo run --release -p gguf-reader --example scale > /dev/null   # timings on stderr
//! cargo run --release -p gguf-reader --example scale -- 1000 2000  # other sizes
//! SCALE_KEEP=/tmp cargo run ... --example scale                       # keep the traces
//! ```

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![5_000, 10_000, 20_000]
    } else {
        sizes
    };
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("scale: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "groups  tensors  file MB  write s  verify s  diff s  verify us/group  diff us/group"
    );
    for n in sizes {
        // SCALE_KEEP=DIR keeps the traces there.
        let keep = std::env::var_os("SCALE_KEEP").map(std::path::PathBuf::from);
        let path = keep
            .as_deref()
            .unwrap_or(dir.path())
            .join(format!("scale-{n}.gguf"));
        let t = Instant::now();
        let bytes = match test_support::hostile::synthetic_trace(n, 20) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("scale: {e}");
                return ExitCode::FAILURE;
            }
        };
        let mb = bytes.len() as f64 / 1e6;
        if let Err(e) = std::fs::write(&path, bytes) {
            eprintln!("scale: {e}");
            return ExitCode::FAILURE;
        }
        let write = t.elapsed().as_secs_f64();

        let t = Instant::now();
        let code = gguf_reader::main(vec![path.clone().into(), "--verify-attention".into()]);
        let verify = t.elapsed().as_secs_f64();
        if code != ExitCode::SUCCESS {
            eprintln!("scale: --verify-attention failed on {n} groups");
        }

        let args: Vec<OsString> = vec![
            "--reference".into(),
            path.clone().into(),
            "--current".into(),
            path.into(),
        ];
        let t = Instant::now();
        let code = tensor_diff_analyzer::main(args);
        let diff = t.elapsed().as_secs_f64();
        if code != ExitCode::SUCCESS {
            eprintln!("scale: the analyzer failed on {n} groups");
        }
        eprintln!(
            "{n:>6}  {:>7}  {mb:>7.1}  {write:>7.2}  {verify:>8.2}  {diff:>6.2}  {:>15.1}  {:>13.1}",
            6 * n,
            verify * 1e6 / n as f64,
            diff * 1e6 / n as f64
        );
    }
    ExitCode::SUCCESS
}
