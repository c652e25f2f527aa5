//! Turn an input of the `trace` fuzz target (a crash, a timeout, a corpus entry) into the
//! trace file it stands for, as the target builds it, so that it can be kept as a
//! regression file (`crates/gguf-reader/tests/data/hostile/`) and run by every tool:
//!
//! ```sh
//! cargo run -p test-support --example trace_fuzz_input -- \
//!     fuzz/seeds/tiny-fa-layer0.gguf fuzz/artifacts/trace/crash-... out.gguf
//! ```

use std::process::ExitCode;

use test_support::hostile::{self, Editable};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [seed, input, out] = &args[..] else {
        eprintln!("usage: trace_fuzz_input SEED.gguf FUZZ-INPUT OUT.gguf");
        return ExitCode::from(2);
    };
    let run = || -> Result<(), String> {
        let seed = std::fs::read(seed).map_err(|e| format!("{seed}: {e}"))?;
        let input = std::fs::read(input).map_err(|e| format!("{input}: {e}"))?;
        let synthetic = hostile::synthetic_trace(6, 2).map_err(|e| e.to_string())?;
        // The same bases, in the same order, as fuzz/fuzz_targets/trace.rs.
        let bases = [
            Editable::from_bytes(&seed).map_err(|e| e.to_string())?,
            Editable::from_bytes(&synthetic).map_err(|e| e.to_string())?,
        ];
        let Some((&which, program)) = input.split_first() else {
            return Err("empty input".into());
        };
        let mut e = bases[which as usize % bases.len()].clone();
        hostile::mutate(&mut e, program);
        let bytes = e.to_bytes().map_err(|e| e.to_string())?;
        std::fs::write(out, bytes).map_err(|e| format!("{out}: {e}"))
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trace_fuzz_input: {}", e.escape_debug());
            ExitCode::FAILURE
        }
    }
}
