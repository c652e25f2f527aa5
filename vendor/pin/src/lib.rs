//! Source pin for llama.cpp: see `Cargo.toml`. Intentionally empty; never built.
