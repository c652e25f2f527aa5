// A traced llama.cpp run, as a C ABI for the Rust capture engine (src/session.rs
// declares the same items by hand: keep both in sync; kcm_run_info's size and offsets
// are asserted on both sides, in kcm_session.cpp and src/session.rs).
//
// Steps: step 0 is the first ubatch of the prompt; every llama_decode call after it (the
// next prompt ubatch, then each generated token) is one more. The prompt is decoded in
// chunks of n_ubatch tokens so that each llama_decode call is exactly one ubatch.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "ggml-backend.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KCM_NAME_MAX 256
#define KCM_PATH_MAX 4096

typedef struct kcm_session kcm_session;

typedef struct kcm_run_info {
    int32_t  n_layer;
    int32_t  n_head;
    int32_t  n_head_kv;
    uint32_t n_ctx;
    uint32_t n_batch;
    uint32_t n_ubatch;
    int32_t  n_predict;
    uint32_t seed;
    int32_t  flash_attn;      // 1: the context uses flash attention, 0: it does not
    int32_t  type_k;          // ggml_type of the K cache
    int32_t  type_v;          // ggml_type of the V cache
    int32_t  n_prompt_tokens;
    char     arch[KCM_NAME_MAX];
    char     model_path[KCM_PATH_MAX];
    int32_t  mixed_kv_cache;    // 1: --mixed-kv-cache (hot F16 window + cold quantized store)
    uint32_t mixed_hot_window;  // --mixed-hot-window
    int32_t  mixed_cold_type;   // ggml_type of the cold store (--mixed-cold-type)
    uint64_t kv_buffer_bytes;   // bytes of the context's KV buffers (llama_memory_buffer_size)
    int32_t  n_threads;         // threads of single-token graph computations (llama_n_threads)
    int32_t  n_threads_batch;   // threads of batched ones (llama_n_threads_batch)
    int32_t  mixed_swa_type;    // ggml_type of an iSWA model's window-layer cache (--mixed-swa-type), -1: -ctk/-ctv
} kcm_run_info;

// Called before each llama_decode with the step number and the batch's tokens and
// positions. Return 0 to stop before this step (the run ends cleanly).
typedef int32_t (*kcm_step_cb)(void * user, uint32_t step, const int32_t * tokens,
                               const int32_t * positions, int32_t n_tokens);

// After each llama_decode (and llama_encode): the step just computed, the token the run's
// sampler chose from its output (-1 when it did not choose: a prompt ubatch before the last,
// or an encoder step), and the output logits of the step's last token (n_vocab floats,
// llama.cpp's `result_output` row as llama_get_logits_ith(ctx, -1) returns it; null when the
// step has no logits). The pointer is valid during the call only. Return 0 to stop the run.
typedef int32_t (*kcm_output_cb)(void * user, uint32_t step, int32_t sampled,
                                 const float * logits, int32_t n_vocab);

// Replay: decode exactly these steps (each one llama_decode; tokens concatenated, n_tokens
// per step) instead of the prompt and sampled tokens. The first steps hold the prompt,
// n_prompt_tokens tokens (a model with an encoder: step 0 is the prompt, encoded, and step 1
// the decoder's first token); every later step one token. The sampler still chooses after
// each step (reported to kcm_output_cb) and is then given the replayed token. -p is optional
// (when given it must tokenize to the replayed prompt); -n, when given, limits the generated
// steps replayed. Without -c the context holds the replayed tokens (rounded up to 256).
typedef struct kcm_replay {
    const int32_t * tokens;
    const int32_t * n_tokens;
    int32_t         n_steps;
    int32_t         n_prompt_tokens;
} kcm_replay;

// Parse llama.cpp options (argv[0] is the program name; no monitor options), load the
// model, tokenize the prompt and create a context whose eval callback is `cb`.
// -n defaults to 0 (prompt only). Without -c the context holds just the prompt plus -n
// tokens (rounded up to 256); no
// warm-up run; the -fit dry run only with an explicit -fit on. With verbose == 0,
// llama.cpp's logs are silenced after argument parsing (errors still print).
// Returns NULL on failure with a one-line reason in err; *usage_error is set to 1 when
// llama.cpp's argument parser rejected the arguments, else 0.
// `replay` (may be null) is copied; see kcm_replay.
kcm_session * kcm_session_create(int32_t argc, const char * const * argv,
                                 ggml_backend_sched_eval_callback cb, void * cb_user,
                                 int32_t verbose, const kcm_replay * replay, char * err,
                                 size_t err_len, int32_t * usage_error);

void kcm_session_info(const kcm_session * s, kcm_run_info * out);

// Copies up to cap prompt tokens; returns the prompt's token count.
int32_t kcm_session_prompt_tokens(const kcm_session * s, int32_t * out, int32_t cap);

// Decode the prompt, then up to n_predict generated tokens (none if prefill_only), or the
// replayed steps. on_step before each step, on_output after it (either may be null; the
// logits are passed only with want_logits).
// Returns the number of steps run, or -1 with a reason in err.
int32_t kcm_session_run(kcm_session * s, int32_t prefill_only, int32_t want_logits, kcm_step_cb on_step,
                        kcm_output_cb on_output, void * user, char * err, size_t err_len);

// The generated text so far (NUL-terminated, valid until the next call or free).
const char * kcm_session_generated_text(kcm_session * s);

// The CPU threadpool the context computes with, for helpers that want to run work on
// its threads between graph computations (the eval callback); null (and *n_threads 0)
// when there is none or a separate batch pool is in use.
struct ggml_threadpool * kcm_session_threadpool(kcm_session * s, int32_t * n_threads);

void kcm_session_free(kcm_session * s);

#ifdef __cplusplus
}
#endif
