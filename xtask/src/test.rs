//! `cargo xtask test [ARGS...]`: build-llama, then `cargo test --workspace ARGS...`.

use crate::build_llama;
use crate::util::{self, Result};

pub fn run(args: pico_args::Arguments) -> Result {
    let passthrough = util::finish(args)?;
    build_llama::build(false, false)?;
    let mut cmd = util::cargo();
    cmd.args(["test", "--workspace"]).args(passthrough);
    util::run(&mut cmd)
}
