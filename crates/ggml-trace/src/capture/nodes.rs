//! `--tensor-filter REGEX`: which graph nodes to capture besides attention, by name, with
//! llama.cpp's `llama-debug` semantics (its `common_debug_cb_user_data` compiles `"^" +
//! pattern` and keeps a node whose name any pattern `regex_search`es: anchored at the
//! start of the name, open at its end). Each pattern is anchored as a whole here
//! (`^(?:pattern)`), so `a|b` anchors both branches (llama.cpp's prefix anchors only
//! the first); the syntax is the `regex` crate's (no backreferences or look-around,
//! which ECMAScript `std::regex` has).

/// The node filter: one or more anchored patterns; a node is kept when any matches.
#[derive(Clone, Debug)]
pub struct NodeFilter {
    patterns: Vec<String>,
    any: regex::Regex,
}

/// A `--tensor-filter` pattern that does not compile.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--tensor-filter: invalid regex '{pattern}': {reason}")]
pub struct FilterError {
    pub pattern: String,
    /// The regex crate's message, on one line.
    pub reason: String,
}

impl NodeFilter {
    /// Compile `patterns` (at least one), each anchored at the start of the name.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self, FilterError> {
        let bad = |p: &str, e: regex::Error| FilterError {
            pattern: p.to_owned(),
            reason: e
                .to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
        };
        let mut parts = Vec::with_capacity(patterns.len());
        for p in patterns {
            let p = p.as_ref();
            // Each alone first: a pattern cannot reach into its neighbours (`a)|(b`).
            regex::Regex::new(p).map_err(|e| bad(p, e))?;
            parts.push(format!("^(?:{p})"));
        }
        let joined = if parts.is_empty() {
            // No pattern matches nothing.
            "[^\\s\\S]".to_owned()
        } else {
            parts.join("|")
        };
        let any = regex::Regex::new(&joined).map_err(|e| bad(&joined, e))?;
        Ok(Self {
            patterns: patterns.iter().map(|p| p.as_ref().to_owned()).collect(),
            any,
        })
    }

    /// Whether a node of this ggml name is captured.
    pub fn matches(&self, name: &str) -> bool {
        self.any.is_match(name)
    }

    /// The patterns as given.
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_anchored_at_the_start_and_open_at_the_end() {
        let f = NodeFilter::new(&["ffn_out"]).unwrap();
        assert!(f.matches("ffn_out-3"));
        assert!(f.matches("ffn_out"));
        assert!(!f.matches("l_ffn_out-3"));
        let f = NodeFilter::new(&["attn_norm|ffn_inp"]).unwrap();
        assert!(f.matches("attn_norm-0"));
        assert!(f.matches("ffn_inp-1"));
        // Both branches anchored (llama.cpp's "^" prefix would let this one through).
        assert!(!f.matches("x_ffn_inp-1"));
        let all = NodeFilter::new(&["."]).unwrap();
        assert!(all.matches("result_norm"));
        assert!(all.matches("Qcur-0 (view) (permuted)"));
        assert!(!all.matches(""));
    }

    #[test]
    fn repeated_patterns_keep_a_node_that_any_matches() {
        let f = NodeFilter::new(&["kqv_out-1$", "result_"]).unwrap();
        assert!(f.matches("kqv_out-1"));
        assert!(!f.matches("kqv_out-12"));
        assert!(f.matches("result_output"));
        assert!(!f.matches("inp_embd"));
        assert_eq!(f.patterns(), ["kqv_out-1$", "result_"]);
        assert!(!NodeFilter::new::<&str>(&[]).unwrap().matches("x"));
    }

    #[test]
    fn a_pattern_that_does_not_compile_is_named() {
        let e = NodeFilter::new(&["ok", "a)|(b"]).unwrap_err();
        assert_eq!(e.pattern, "a)|(b");
        assert!(!e.to_string().contains('\n'));
        assert!(NodeFilter::new(&["[x"]).is_err());
    }
}
