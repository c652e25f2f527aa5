//! xtask's integration tests in one binary: `cargo xtask demo` and the seed README's
//! workflows, as a user types them.
//! One binary per crate, as ripgrep does (`tests/integration/`): each file below is a
//! module; shared helpers live in the `test-support` crate.

mod demo;
mod seed_workflows;
