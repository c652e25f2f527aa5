//! kqv-trace-monitor's integration tests in one binary (one link of llama.cpp): the
//! command line, captures against llama.cpp, revisions, verification, planted bugs,
//! the mixed KV cache (and, over the zoo, what it refuses and what it equals), gemma-3-270m,
//! gguf-py interop, the progress line, the tiny-model zoo (every architecture in three
//! modes) and runs split across RPC servers.
//! One binary per crate, as ripgrep does (`tests/integration/`): each file below is a
//! module; shared helpers live in the `test-support` crate.

mod capture;
mod cli;
mod common;
mod gemma;
mod interop;
mod kv_writes;
mod long_context;
mod mixed;
mod mixed_zoo;
mod nodes;
mod planted;
mod planted_zoo;
mod progress;
mod replay;
mod revisions;
mod rpc;
mod sampling;
mod verify_cli;
mod zoo;
