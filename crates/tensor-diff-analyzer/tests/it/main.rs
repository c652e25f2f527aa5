//! tensor-diff-analyzer's integration tests in one binary (one link of llama.cpp): the
//! command line live and offline, gemma-3-270m, the mixed KV cache, the progress line,
//! steps whose inputs differ (issue 20),
//! traces whose metadata contradicts their tensors (issue 14), runs split across RPC servers,
//! references imported from safetensors through a map (issue 19).
//! One binary per crate, as ripgrep does (`tests/integration/`): each file below is a
//! module; shared helpers live in the `test-support` crate.

mod cli;
mod diverged;
mod first_divergence;
mod gemma;
mod import;
mod mixed;
mod plot;
mod progress;
mod replay;
mod rpc;
mod trust;
