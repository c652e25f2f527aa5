//! Sampling options reach llama.cpp's sampler as its own tools set it up
//! (`common_init_from_params`): `--ignore-eos` adds a -inf logit bias on every
//! end-of-generation token, which loading the model alone (`model_only`) skipped.

use trace_format::TraceFile;

use crate::common::trace_with;

const N: usize = 4;

fn run(model: &std::path::Path, out: &std::path::Path, extra: &[&str]) -> TraceFile {
    let mut args: Vec<String> = ["-m", model.to_str().unwrap(), "-p", "Hi", "-t", "2"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["-n".to_string(), N.to_string()]);
    trace_with(args, out, extra)
}

/// The generated tokens: every step's tokens after the prompt's.
fn generated(t: &TraceFile) -> Vec<i32> {
    let prompt = t.run.prompt_tokens.len();
    let all: Vec<i32> = t.steps.iter().flat_map(|s| s.tokens.clone()).collect();
    all[prompt..].to_vec()
}

/// A model whose greedy choice is always EOS: without `--ignore-eos` the run stops at
/// the first sampled token (only the prompt is decoded); with it every `-n` token is
/// generated, none of them EOS, and they are the tokens llama.cpp's explicit logit bias
/// `-l EOS-inf` (which reached the sampler before) gives.
#[test]
fn ignore_eos_generates_every_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = tiny_llama::write_eos_first(d).unwrap();
    let eos = tiny_llama::EOS_ID as i32;

    let stops = run(&model, &d.join("stops.gguf"), &["--temp", "0"]);
    assert_eq!(stops.steps.len(), 1, "only the prompt: EOS came first");
    assert!(generated(&stops).is_empty());

    for sampling in [&["--temp", "0"][..], &["--temp", "0.8", "--seed", "7"]] {
        let mut ignore = sampling.to_vec();
        ignore.push("--ignore-eos");
        let t = run(&model, &d.join("ignore.gguf"), &ignore);
        let got = generated(&t);
        assert_eq!(got.len(), N, "{sampling:?}: {got:?}");
        assert!(!got.contains(&eos), "{sampling:?}: {got:?}");
        assert_eq!(t.steps.len(), 1 + N);

        let bias = format!("{eos}-inf");
        let mut biased = sampling.to_vec();
        biased.extend(["-l", bias.as_str()]);
        let b = run(&model, &d.join("bias.gguf"), &biased);
        assert_eq!(generated(&b), got, "{sampling:?}");
    }
}
