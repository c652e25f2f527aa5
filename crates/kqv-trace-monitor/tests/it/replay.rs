//! `--replay TRACE` decodes exactly the steps of an earlier trace (the prompt in the same
//! ubatches, then its tokens one per step), records the sampler's own choice after each
//! step (`kqv_trace.step.sampled`), and `--logits` saves each step's output row.

use std::path::Path;
use std::process::Command;

use test_support::LlamaArgs;
use tiny_llama::zoo::{write_zoo_model, Arch};
use trace_format::TraceFile;

use crate::common::trace_with;

const BIN: &str = env!("CARGO_BIN_EXE_kqv-trace-monitor");
const PROMPT: &str = "The quick brown fox jumps over a lazy dog";

fn monitor(args: &[String]) -> (i32, String, String) {
    let o = Command::new(BIN).args(args).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn replay_args(model: &Path, reference: &Path) -> LlamaArgs {
    LlamaArgs::default()
        .args(["-m", &model.display().to_string()])
        .args(["--replay", &reference.display().to_string()])
        .threads(2)
}

fn step_tokens(t: &TraceFile) -> Vec<(Vec<i32>, Vec<i32>)> {
    t.steps
        .iter()
        .map(|s| (s.tokens.clone(), s.positions.clone()))
        .collect()
}

fn argmax(row: &[f32]) -> i32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as i32
}

/// A sampled run replayed with another seed decodes the same steps; the record of the
/// sampler's choices follows the decoded tokens in the original and is the replaying
/// run's own in the replay; greedy choices are the argmax of the saved logits rows.
#[test]
fn replay_decodes_the_reference_steps_and_records_its_own_choices() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = write_zoo_model(d, Arch::Llama).unwrap();
    // The reference in both storages: the replay reads either.
    for storage in test_support::storage::BOTH {
        let reference = d.join(format!("reference-{}.gguf", storage.name()));
        let r = trace_with(
            LlamaArgs::new(&model, PROMPT)
                .storage(storage)
                .ubatch(16)
                .n(6)
                .threads(2)
                .args(["--temp", "0.9", "--seed", "7"])
                .build(),
            &reference,
            &["--no-trace-sources", "--logits"],
        );
        let prompt_steps = r.run.prompt_tokens.len().div_ceil(16);
        assert!(prompt_steps >= 2, "{prompt_steps}");
        assert_eq!(r.steps.len(), prompt_steps + 6);
        // Not a replay: each choice is the next step's token (the last one has none).
        for s in &r.steps[prompt_steps - 1..r.steps.len() - 1] {
            assert_eq!(
                r.sampled_at(s.step),
                Some(r.steps[s.step as usize + 1].tokens[0]),
                "step {}",
                s.step
            );
        }
        for s in &r.steps[..prompt_steps - 1] {
            assert_eq!(
                r.sampled_at(s.step),
                None,
                "a prompt ubatch before the last"
            );
        }
        assert!(r.sampled_at(r.steps.len() as u32 - 1).is_some());
        assert_eq!(r.logits.len(), r.steps.len());
        assert_eq!(r.run.replayed_from, "");

        // Replayed greedily with another seed and -ub: the same steps, its own choices.
        let replayed = d.join("replayed.gguf");
        let t = trace_with(
            replay_args(&model, &reference)
                .ubatch(32)
                .args(["--temp", "0", "--seed", "9"])
                .build(),
            &replayed,
            &["--no-trace-sources", "--logits"],
        );
        assert_eq!(step_tokens(&t), step_tokens(&r));
        assert_eq!(t.run.prompt_tokens, r.run.prompt_tokens);
        assert_eq!(t.run.replayed_from, reference.display().to_string());
        assert_eq!(t.logits.len(), t.steps.len());
        for s in &t.steps {
            let row = t.f32(t.logits_at(s.step).unwrap()).unwrap();
            assert_eq!(row.len(), tiny_llama::N_VOCAB);
            if s.step as usize >= prompt_steps - 1 {
                assert_eq!(t.sampled_at(s.step), Some(argmax(&row)), "step {}", s.step);
            }
        }

        // -n limits the generated steps replayed.
        let short = trace_with(
            replay_args(&model, &reference).n(2).build(),
            &d.join("short.gguf"),
            &["--no-trace-sources"],
        );
        assert_eq!(step_tokens(&short), step_tokens(&r)[..prompt_steps + 2]);
        assert!(short.logits.is_empty(), "no --logits, no rows");
    }
}

/// An encoder-decoder model: step 0 is encoded, the decoder's steps follow.
#[test]
fn replay_of_an_encoder_decoder_model() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = write_zoo_model(d, Arch::T5).unwrap();
    let reference = d.join("t5.gguf");
    let r = trace_with(
        LlamaArgs::new(&model, PROMPT)
            .ubatch(64)
            .n(3)
            .threads(2)
            .greedy()
            .build(),
        &reference,
        &["--no-trace-sources"],
    );
    let t = trace_with(
        replay_args(&model, &reference).ubatch(64).greedy().build(),
        &d.join("t5-replayed.gguf"),
        &["--no-trace-sources"],
    );
    assert_eq!(step_tokens(&t), step_tokens(&r));
    assert_eq!(t.sampled_at(0), None, "the encoder step samples nothing");
    // Greedy both times: the same choices.
    assert_eq!(t.sampled, r.sampled);
}

/// What cannot be replayed is one line and exit 2, before any decoding.
#[test]
fn what_cannot_be_replayed_is_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = write_zoo_model(d, Arch::Llama).unwrap();
    let reference = d.join("reference.gguf");
    trace_with(
        LlamaArgs::new(&model, PROMPT)
            .ubatch(16)
            .n(2)
            .threads(2)
            .greedy()
            .build(),
        &reference,
        &["--no-trace-sources"],
    );
    let cases: [(Vec<String>, &str); 3] = [
        (
            replay_args(&model, &reference)
                .args(["-p", "Another prompt"])
                .build(),
            "leave out -p",
        ),
        (
            replay_args(&model, &reference).ubatch(8).build(),
            "pass -ub 16",
        ),
        (replay_args(&model, &model).build(), "--replay"),
    ];
    for (args, want) in cases {
        let (code, out, err) = monitor(&args);
        assert_eq!(code, 2, "{args:?}\n{out}\n{err}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        assert!(lines[0].contains(want), "{args:?}: {err}");
        assert!(out.is_empty(), "{out}");
    }
}
