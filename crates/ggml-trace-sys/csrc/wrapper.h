// Input of `cargo xtask bindgen` (-> src/sys.rs). Only llama.cpp's public C
// headers; our own shim is declared by hand in src/shim.rs.
#pragma once

#include "ggml.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "gguf.h"
#include "llama.h"
