//! llama.cpp argument vectors for the tools, as the tests spell them: the model, the
//! prompt, and the options a test varies, in the order a user would type them.

use std::path::Path;

/// A builder for `-m MODEL -p PROMPT ...`; `build()` gives the strings.
#[derive(Clone, Debug, Default)]
pub struct LlamaArgs(Vec<String>);

impl LlamaArgs {
    /// `-m MODEL -p PROMPT`.
    pub fn new(model: impl AsRef<Path>, prompt: &str) -> LlamaArgs {
        LlamaArgs(Vec::new())
            .arg("-m")
            .arg(model.as_ref().to_string_lossy())
            .arg("-p")
            .arg(prompt)
    }

    /// `-n N`: tokens to generate.
    pub fn n(self, n: u32) -> LlamaArgs {
        self.arg("-n").arg(n.to_string())
    }

    /// `-t N`: threads.
    pub fn threads(self, t: u32) -> LlamaArgs {
        self.arg("-t").arg(t.to_string())
    }

    /// `-ub N -b N`: N tokens per ubatch and per batch (a prompt of more tokens is
    /// decoded in several steps).
    pub fn ubatch(self, n: u32) -> LlamaArgs {
        self.arg("-ub")
            .arg(n.to_string())
            .arg("-b")
            .arg(n.to_string())
    }

    /// `-c N`: context size.
    pub fn ctx(self, c: u32) -> LlamaArgs {
        self.arg("-c").arg(c.to_string())
    }

    /// `--temp 0`: greedy decoding.
    pub fn greedy(self) -> LlamaArgs {
        self.arg("--temp").arg("0")
    }

    /// `-fa on` or `-fa off`.
    pub fn flash(self, on: bool) -> LlamaArgs {
        self.arg("-fa").arg(if on { "on" } else { "off" })
    }

    /// `-ctk K -ctv V`: KV cache types.
    pub fn cache(self, k: &str, v: &str) -> LlamaArgs {
        self.arg("-ctk").arg(k).arg("-ctv").arg(v)
    }

    /// `--kv-storage full|delta`: how a saved trace stores its tensors.
    pub fn storage(self, s: trace_format::KvStorage) -> LlamaArgs {
        self.args(crate::storage::args(s))
    }

    /// One more argument, as it is.
    pub fn arg(mut self, a: impl Into<String>) -> LlamaArgs {
        self.0.push(a.into());
        self
    }

    /// More arguments, as they are.
    pub fn args<S: Into<String>>(mut self, a: impl IntoIterator<Item = S>) -> LlamaArgs {
        self.0.extend(a.into_iter().map(Into::into));
        self
    }

    pub fn build(self) -> Vec<String> {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_in_typing_order() {
        let a = LlamaArgs::new("m.gguf", "Hello world")
            .n(2)
            .threads(2)
            .greedy()
            .flash(false)
            .cache("q8_0", "f16")
            .ctx(512)
            .ubatch(16)
            .args(["--layer", "0"])
            .build();
        assert_eq!(
            a,
            [
                "-m",
                "m.gguf",
                "-p",
                "Hello world",
                "-n",
                "2",
                "-t",
                "2",
                "--temp",
                "0",
                "-fa",
                "off",
                "-ctk",
                "q8_0",
                "-ctv",
                "f16",
                "-c",
                "512",
                "-ub",
                "16",
                "-b",
                "16",
                "--layer",
                "0"
            ]
        );
    }
}
