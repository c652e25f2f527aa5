//! What the difference does to the output. Per step: the token the current run's own
//! sampler chose against the token that followed in the reference, and, when both runs
//! captured their logits (`--logits`), the KL divergence between the two next-token
//! distributions, top-1 agreement and the reference token's probability change
//! (`tensor_stats::kld`, llama-perplexity's definitions). docs/diff.md.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use tensor_stats::{step_kld, KldSummary, Sci, StepKld};
use trace_format::json::number as num;
use trace_format::TraceFile;

/// One step's output comparison.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutput {
    pub step: u32,
    /// The token that followed this step in the reference (the next step's first token,
    /// else the reference sampler's choice after its last step).
    pub reference_next: Option<i32>,
    /// The current run's own sampler choice after this step (in a replay it is recorded,
    /// not decoded).
    pub current_choice: Option<i32>,
    /// With both runs' logits.
    pub kld: Option<StepKld>,
}

/// The output comparisons of a run, by step.
#[derive(Clone, Debug, Default)]
pub struct Outputs {
    pub steps: BTreeMap<u32, StepOutput>,
    /// Steps whose logits could not be compared, with the reason (the first few).
    pub problems: Vec<String>,
    /// Problems past the first few.
    pub more_problems: usize,
    /// Current steps that had logits.
    pub current_logits: usize,
}

const PROBLEMS_KEPT: usize = 5;

/// The token that followed `step` in `trace`.
pub fn next_token(trace: &TraceFile, step: u32) -> Option<i32> {
    trace
        .step(step + 1)
        .and_then(|s| s.tokens.first().copied())
        .or_else(|| trace.sampled_at(step))
}

impl Outputs {
    /// A current step's output: its sampler's choice and (`--logits`) its logits row,
    /// compared with the reference's row of the same step when it has one.
    pub fn add(
        &mut self,
        reference: &TraceFile,
        step: u32,
        choice: Option<i32>,
        logits: Option<&[f32]>,
    ) {
        let reference_next = next_token(reference, step);
        let mut kld = None;
        if let Some(cur) = logits {
            self.current_logits += 1;
            if let Some(t) = reference.logits_at(step) {
                let r = reference
                    .f32(t)
                    .map_err(|e| e.to_string())
                    .and_then(|base| {
                        step_kld(&base, cur, reference_next).map_err(|e| e.to_string())
                    });
                match r {
                    Ok(k) => kld = Some(k),
                    Err(e) => self.problem(format!("step {step}: logits not compared: {e}")),
                }
            }
        }
        self.steps.insert(
            step,
            StepOutput {
                step,
                reference_next,
                current_choice: choice,
                kld,
            },
        );
    }

    fn problem(&mut self, p: String) {
        if self.problems.len() < PROBLEMS_KEPT {
            self.problems.push(p);
        } else {
            self.more_problems += 1;
        }
    }

    /// Every step of a saved current trace.
    pub fn add_trace(&mut self, reference: &TraceFile, current: &TraceFile) {
        for s in &current.steps {
            let logits = current.logits_at(s.step).and_then(|t| current.f32(t).ok());
            self.add(
                reference,
                s.step,
                current.sampled_at(s.step),
                logits.as_deref(),
            );
        }
    }

    /// The summary over the steps `compared` accepts (the steps whose inputs match).
    pub fn summary(&self, reference: &TraceFile, compared: impl Fn(u32) -> bool) -> OutputSummary {
        let steps: Vec<&StepOutput> = self.steps.values().filter(|s| compared(s.step)).collect();
        let choices: Vec<(&StepOutput, i32, i32)> = steps
            .iter()
            .filter_map(|s| Some((*s, s.reference_next?, s.current_choice?)))
            .collect();
        let first_other = choices
            .iter()
            .find(|(_, r, c)| r != c)
            .map(|(s, r, c)| (s.step, *r, *c));
        let kld: Vec<(u32, StepKld)> = steps
            .iter()
            .filter_map(|s| Some((s.step, s.kld?)))
            .collect();
        OutputSummary {
            choices_compared: choices.len(),
            choices_agree: choices.iter().filter(|(_, r, c)| r == c).count(),
            first_other,
            kld: tensor_stats::summarize(kld.iter().map(|(_, k)| k)),
            per_step: kld,
            reference_logits: reference.logits.len(),
            current_logits: self.current_logits,
            problems: self.problems.clone(),
            more_problems: self.more_problems,
        }
    }
}

/// What the difference did to the output over the compared steps.
#[derive(Clone, Debug)]
pub struct OutputSummary {
    /// Steps where both the reference's next token and the current run's own choice are
    /// known, and how many agree.
    pub choices_compared: usize,
    pub choices_agree: usize,
    /// The first step whose own choice differs: (step, reference's, current's).
    pub first_other: Option<(u32, i32, i32)>,
    /// llama-perplexity's statistics over the steps with both runs' logits.
    pub kld: Option<KldSummary>,
    pub per_step: Vec<(u32, StepKld)>,
    pub reference_logits: usize,
    pub current_logits: usize,
    pub problems: Vec<String>,
    pub more_problems: usize,
}

/// llama-perplexity prints its statistics only from this many positions on.
pub const PERPLEXITY_MIN_COUNT: usize = 100;

impl OutputSummary {
    /// Why there are no KLD statistics, when there are none.
    pub fn why_no_kld(&self) -> Option<String> {
        if self.kld.is_some() {
            return None;
        }
        Some(match (self.reference_logits, self.current_logits) {
            (0, 0) => "neither run captured its logits (--logits)".into(),
            (0, _) => "the reference has no logits (trace it with --logits)".into(),
            (_, 0) => "the current run has no logits (--logits)".into(),
            _ => "no compared step has logits in both runs".into(),
        })
    }

    /// The text report's section (empty when there is nothing to say).
    pub fn text(&self) -> String {
        let mut s = String::new();
        if self.choices_compared == 0 && self.kld.is_none() && self.problems.is_empty() {
            return s;
        }
        s.push_str("\nOutput (next-token distributions):\n");
        if self.choices_compared > 0 {
            s.push_str(&format!(
                "  Sampler's own choice:    the reference's next token at {} of {} steps ({:.1}%)",
                self.choices_agree,
                self.choices_compared,
                100.0 * self.choices_agree as f64 / self.choices_compared as f64
            ));
            if let Some((step, r, c)) = self.first_other {
                s.push_str(&format!(
                    "; first other at step {step}: token {c} where the reference had {r}"
                ));
            }
            s.push('\n');
        }
        match &self.kld {
            Some(k) => {
                s.push_str(&format!(
                    "  KL divergence over {} steps (llama-perplexity's statistics, in nats; Δp and \
                     Same top p in %{}):\n",
                    k.count,
                    if k.count < PERPLEXITY_MIN_COUNT {
                        format!("; it prints them from {PERPLEXITY_MIN_COUNT} positions on")
                    } else {
                        String::new()
                    }
                ));
                // llama-perplexity's own formats: KLD %10.6f, percentages %6.3f.
                for r in k.rows() {
                    let v = |x: f64| {
                        if r.percent {
                            format!("{x:10.3}")
                        } else {
                            format!("{x:10.6}")
                        }
                    };
                    let unit = if r.percent { " %" } else { "" };
                    // llama-perplexity's uncertainty of a mean is 0 by definition below
                    // 11 values: say so rather than print a measured-looking 0.
                    let few = k.count <= 10 && r.name != "Same top p";
                    match r.uncertainty {
                        Some(_) if few => s.push_str(&format!(
                            "    {:<12} {}{unit} ± n/a (needs 11 or more steps)\n",
                            r.name,
                            v(r.value)
                        )),
                        Some(u) => s.push_str(&format!(
                            "    {:<12} {} ± {}{unit}\n",
                            r.name,
                            v(r.value),
                            v(u).trim_start()
                        )),
                        None => s.push_str(&format!("    {:<12} {}{unit}\n", r.name, v(r.value))),
                    }
                }
                let mut worst = self.per_step.clone();
                worst.sort_by(|a, b| b.1.kld.total_cmp(&a.1.kld));
                let shown: Vec<String> = worst
                    .iter()
                    .take(5)
                    .map(|(st, k)| format!("step {st} {}", Sci(k.kld)))
                    .collect();
                s.push_str(&format!("    Worst steps: {}\n", shown.join(", ")));
            }
            None => {
                if let Some(why) = self.why_no_kld() {
                    s.push_str(&format!("  KL divergence: not measured: {why}\n"));
                }
            }
        }
        for p in &self.problems {
            s.push_str(&format!("  note: {p}\n"));
        }
        if self.more_problems > 0 {
            s.push_str(&format!(
                "  note: ... and {} more steps whose logits were not compared\n",
                self.more_problems
            ));
        }
        s
    }

    /// The JSON document's `output` member.
    pub fn json(&self) -> Value {
        let kld = self.kld.as_ref().map(|k| {
            let rows: Vec<Value> = k
                .rows()
                .iter()
                .map(|r| {
                    json!({
                        "name": r.name, "value": num(r.value),
                        "uncertainty": r.uncertainty.map(num),
                        "unit": if r.percent { "%" } else if r.name.contains("KLD") { "nats" } else { "" },
                    })
                })
                .collect();
            json!({
                "steps": k.count,
                "mean": num(k.kld.mean),
                "mean_uncertainty": num(k.kld.mean_uncertainty),
                "max": num(k.kld.max),
                "p99": k.kld.percentile(0.99).map(num),
                "median": num(k.kld.median),
                "same_top": num(k.same_top),
                "same_top_uncertainty": num(k.same_top_uncertainty),
                "rows": rows,
            })
        });
        let per_step: Vec<Value> = self
            .per_step
            .iter()
            .map(|(step, k)| {
                json!({
                    "step": step,
                    "kld": num(k.kld),
                    "top_reference": k.top_base,
                    "top_current": k.top_cur,
                    "same_top": k.same_top,
                    "next_token": k.next.map(|n| n.token),
                    "p_reference": k.next.map(|n| num(n.p_base)),
                    "p_current": k.next.map(|n| num(n.p_cur)),
                    "delta_p": k.next.map(|n| num(n.delta_p)),
                })
            })
            .collect();
        json!({
            "choices_compared": self.choices_compared,
            "choices_agree": self.choices_agree,
            "first_other_choice": self.first_other.map(|(step, r, c)| json!({
                "step": step, "reference": r, "current": c,
            })),
            "kld": kld,
            "kld_not_measured": self.why_no_kld(),
            "steps": per_step,
            "problems": self.problems,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_kld_reasons_name_the_side_without_logits() {
        let mut s = OutputSummary {
            choices_compared: 0,
            choices_agree: 0,
            first_other: None,
            kld: None,
            per_step: Vec::new(),
            reference_logits: 0,
            current_logits: 3,
            problems: Vec::new(),
            more_problems: 0,
        };
        assert!(s.why_no_kld().unwrap().contains("reference"));
        s.reference_logits = 3;
        s.current_logits = 0;
        assert!(s.why_no_kld().unwrap().contains("current"));
        s.current_logits = 3;
        assert!(s.why_no_kld().unwrap().contains("no compared step"));
    }
}
