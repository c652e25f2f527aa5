// See kcm_session.h. Our own code over llama.cpp's `common` library.

#include "kcm_session.h"

#include "arg.h"
#include "common.h"
#include "log.h"
#include "sampling.h"
#include "llama.h"
#include "ggml-cpu.h"
#include "gguf.h"

#include <algorithm>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

// The layout that src/session.rs mirrors by hand (`kcm_run_info`), checked with the same
// numbers as the `const` assertions there: a field added or moved on one side only fails
// to compile on that side.
static_assert(sizeof(kcm_run_info) == 4440, "kcm_run_info size");
static_assert(alignof(kcm_run_info) == 8, "kcm_run_info alignment");
static_assert(offsetof(kcm_run_info, n_layer) == 0, "kcm_run_info.n_layer");
static_assert(offsetof(kcm_run_info, n_head) == 4, "kcm_run_info.n_head");
static_assert(offsetof(kcm_run_info, n_head_kv) == 8, "kcm_run_info.n_head_kv");
static_assert(offsetof(kcm_run_info, n_ctx) == 12, "kcm_run_info.n_ctx");
static_assert(offsetof(kcm_run_info, n_batch) == 16, "kcm_run_info.n_batch");
static_assert(offsetof(kcm_run_info, n_ubatch) == 20, "kcm_run_info.n_ubatch");
static_assert(offsetof(kcm_run_info, n_predict) == 24, "kcm_run_info.n_predict");
static_assert(offsetof(kcm_run_info, seed) == 28, "kcm_run_info.seed");
static_assert(offsetof(kcm_run_info, flash_attn) == 32, "kcm_run_info.flash_attn");
static_assert(offsetof(kcm_run_info, type_k) == 36, "kcm_run_info.type_k");
static_assert(offsetof(kcm_run_info, type_v) == 40, "kcm_run_info.type_v");
static_assert(offsetof(kcm_run_info, n_prompt_tokens) == 44, "kcm_run_info.n_prompt_tokens");
static_assert(offsetof(kcm_run_info, arch) == 48, "kcm_run_info.arch");
static_assert(offsetof(kcm_run_info, model_path) == 304, "kcm_run_info.model_path");
static_assert(offsetof(kcm_run_info, mixed_kv_cache) == 4400, "kcm_run_info.mixed_kv_cache");
static_assert(offsetof(kcm_run_info, mixed_hot_window) == 4404, "kcm_run_info.mixed_hot_window");
static_assert(offsetof(kcm_run_info, mixed_cold_type) == 4408, "kcm_run_info.mixed_cold_type");
static_assert(offsetof(kcm_run_info, kv_buffer_bytes) == 4416, "kcm_run_info.kv_buffer_bytes");
static_assert(offsetof(kcm_run_info, n_threads) == 4424, "kcm_run_info.n_threads");
static_assert(offsetof(kcm_run_info, n_threads_batch) == 4428, "kcm_run_info.n_threads_batch");
static_assert(offsetof(kcm_run_info, mixed_swa_type) == 4432, "kcm_run_info.mixed_swa_type");

struct kcm_session {
    common_params params;
    common_init_result_ptr init;
    llama_model * model = nullptr;
    llama_context * ctx = nullptr;  // owned by init
    common_sampler * sampler = nullptr;  // owned by init
    // The CPU threadpools llama.cpp's own tools attach (common_threadpools::init, which
    // common_init_from_params calls when it makes the context; we make the context
    // ourselves and keep the pointers, for kcm_session_threadpool). Without them ggml
    // starts and joins fresh threads for every graph computation, and the eval callback
    // splits each decode into one computation per observed node; --poll, --cpu-mask,
    // --prio and their -b variants also act through them. Freed after the context.
    ggml_threadpool * threadpool = nullptr;
    ggml_threadpool * threadpool_batch = nullptr;
    int32_t threadpool_threads = 0;
    std::vector<llama_token> prompt;
    std::string generated;
    // Replay (kcm_replay): every step's tokens, how many of the first steps hold the prompt
    // (set once the model is loaded), and how many generated steps to decode.
    bool replay = false;
    std::vector<std::vector<llama_token>> replay_steps;
    size_t replay_prompt_steps = 0;
    size_t replay_generated = 0;
    int32_t verbose = 0;
};

static void set_err(char * err, size_t len, const std::string & msg) {
    if (err && len > 0) {
        snprintf(err, len, "%s", msg.c_str());
    }
}

// Quiet mode: llama.cpp's and ggml's own logs keep errors only. Not ggml-rpc's transport
// errors ("recv failed ...", "send failed ..."): each is followed by ggml-rpc's abort,
// which the tools turn into one line naming the server (ggml-trace's fatal.rs).
static void quiet_log(ggml_log_level level, const char * text, void * /*user*/) {
    if (level == GGML_LOG_LEVEL_ERROR && strncmp(text, "recv failed", 11) != 0 &&
        strncmp(text, "send failed", 11) != 0) {
        fputs(text, stderr);
    }
}

static bool flag_given(int argc, const char * const * argv, const char * a, const char * b) {
    for (int i = 1; i < argc; ++i) {
        if (strcmp(argv[i], a) == 0 || (b && strcmp(argv[i], b) == 0)) {
            return true;
        }
    }
    return false;
}

// Where the replayed steps' prompt ends: the number of leading steps that hold exactly
// n_prompt tokens (an encoder model: the encoded prompt and the decoder's first token);
// every later step must be one token. Returns "" or the reason the steps cannot be replayed.
static std::string replay_split(kcm_session * s, size_t n_prompt, bool encoder) {
    const auto & st = s->replay_steps;
    size_t k = 0;
    if (encoder) {
        if (st[0].size() != n_prompt) {
            return "its step 0 has " + std::to_string(st[0].size()) + " tokens, not the " +
                   std::to_string(n_prompt) + " of its prompt (an encoder model encodes the whole prompt in step 0)";
        }
        k = std::min<size_t>(2, st.size());
    } else {
        size_t sum = 0;
        while (k < st.size() && sum < n_prompt) {
            sum += st[k].size();
            ++k;
        }
        if (sum != n_prompt) {
            return "its steps do not split its prompt of " + std::to_string(n_prompt) +
                   " tokens into whole steps";
        }
    }
    for (size_t i = k; i < st.size(); ++i) {
        if (st[i].size() != 1) {
            return "its generated step " + std::to_string(i) + " has " + std::to_string(st[i].size()) +
                   " tokens (a generated step decodes one)";
        }
    }
    s->replay_prompt_steps = k;
    return "";
}

// KCM_MIXED_KV (build.rs, build/sources.rs): 1 when the tree has our mixed KV cache
// (vendor/patches 0001-0004: common_params::mixed_kv_cache and friends), else 0 and the
// options are absent (the tools refuse --mixed-kv-cache before calling in here).
#ifndef KCM_MIXED_KV
#error "KCM_MIXED_KV is defined by ggml-trace-sys's build script"
#endif

#if KCM_MIXED_KV
// --mixed-kv-cache: the attention the mixed KV cache cannot express (vendor/patches/0001-0004).
// The patches replace only llm_graph_context::build_attn over llama.cpp's plain unified KV cache
// (and over the base, full-attention cache of its iSWA cache) with one node computing
// softmax(scale * q.k [softcap] + mask [ALiBi]) . v over a hot F16 and a cold quantized store. Anything else would run wrong (an explicit tanh chain dropped), crash
// (MLA's K-only cache) or abort (T5), so it is refused here, from the model's hparams and GGUF
// keys, before a context exists. Returns the reason (one line), or "" when the model is accepted.
// The patch's own checks at context creation stay as the backstop for caches not listed here.
static std::string mixed_kv_refusal(const llama_model * m, const std::string & path) {
    char buf[256] = {0};
    llama_model_meta_val_str(m, "general.architecture", buf, sizeof(buf));
    const std::string arch = buf;
    auto meta = [&](const std::string & key) -> std::string {
        char v[256] = {0};
        return llama_model_meta_val_str(m, key.c_str(), v, sizeof(v)) >= 0 ? std::string(v) : std::string();
    };
    auto refuse = [&](const std::string & why) {
        return "--mixed-kv-cache cannot express the attention of architecture '" + arch + "': " + why;
    };
    if (llama_model_has_encoder(m)) {
        return refuse("an encoder-decoder model (the encoder, the decoder's cross-attention and a "
                      "relative position bias are not attention over one decoder KV cache)");
    }
    // llama.cpp builds these without any KV cache (llama_model::create_memory returns none)
    static const char * const no_cache[] = {
        "bert", "modern-bert", "nomic-bert", "nomic-bert-moe", "neo-bert", "jina-bert-v2",
        "jina-bert-v3", "eurobert", "clef", "gemma-embedding", "wavtokenizer-dec", "dream",
        "llada", "llada-moe", "rnd1",
    };
    const bool listed = std::find_if(std::begin(no_cache), std::end(no_cache),
                                     [&](const char * a) { return arch == a; }) != std::end(no_cache);
    if (listed || !llama_model_has_decoder(m) || llama_model_is_diffusion(m) ||
        meta(arch + ".attention.causal") == "false") {
        return refuse("non-causal attention (an encoder, embedding or diffusion model, which "
                      "llama.cpp runs without a KV cache to split into hot and cold stores)");
    }
    if (llama_model_is_recurrent(m) || llama_model_is_hybrid(m)) {
        return refuse("it does not use llama.cpp's plain unified KV cache (recurrent or hybrid "
                      "recurrent layers)");
    }
    // Interleaved sliding-window attention (llama.cpp's iSWA cache) is accepted: the full-attention
    // layers' cache becomes mixed, the sliding-window layers keep their own window cache. Chunked
    // attention (llama4, the only architecture llama.cpp builds with LLAMA_SWA_TYPE_CHUNKED) is not.
    if (llama_model_n_swa(m) > 0 && arch == "llama4") {
        return refuse("chunked attention over " + std::to_string(llama_model_n_swa(m)) +
                      " tokens (llama.cpp's iSWA cache with LLAMA_SWA_TYPE_CHUNKED): only the full-attention "
                      "layers of standard sliding-window models are supported");
    }
    for (const char * k : {".attention.key_length_mla", ".attention.key_length_mla_swa"}) {
        const std::string v = meta(arch + k);
        if (!v.empty() && v != "0") {
            return refuse("multi-head latent attention (MLA: a K-only latent cache with V a view of K, "
                          "and attn_v_b applied after the attention, which the mixed node does not do)");
        }
    }
    if (arch == "grok") {
        return refuse("its softcap and output scale are explicit graph ops between kq and the softmax "
                      "(scale, tanh, scale), which the mixed node does not apply");
    }
    if (arch == "deepseek4" || arch == "minimax-m3" || arch == "dflash") {
        return refuse("it does not use llama.cpp's plain unified KV cache (compressed or sparse "
                      "attention caches)");
    }
    const llama_rope_type rope = llama_model_rope_type(m);
    if (rope == LLAMA_ROPE_TYPE_MROPE || rope == LLAMA_ROPE_TYPE_IMROPE || rope == LLAMA_ROPE_TYPE_VISION) {
        return refuse("several positions per token (M-RoPE)");
    }
    // attention sinks are tensors, not keys: read the GGUF's tensor names (metadata only)
    gguf_init_params gp = {/*no_alloc =*/ true, /*ctx =*/ nullptr};
    if (gguf_context * g = gguf_init_from_file(path.c_str(), gp)) {
        bool sinks = false;
        for (int64_t i = 0; i < gguf_get_n_tensors(g) && !sinks; ++i) {
            sinks = strstr(gguf_get_tensor_name(g, i), ".attn_sinks.") != nullptr;
        }
        gguf_free(g);
        if (sinks) {
            return refuse("attention sinks (attn_sinks), which the mixed node has no term for");
        }
    }
    return "";
}
#endif // KCM_MIXED_KV

kcm_session * kcm_session_create(int32_t argc, const char * const * argv,
                                 ggml_backend_sched_eval_callback cb, void * cb_user,
                                 int32_t verbose, const kcm_replay * replay, char * err,
                                 size_t err_len, int32_t * usage_error) {
    if (usage_error) {
        *usage_error = 0;
    }
    auto * s = new kcm_session();
    s->verbose = verbose;
    // A usage error: the options or the replayed trace do not fit (exit 2 in the tools).
    auto refuse = [&](const std::string & why) -> kcm_session * {
        set_err(err, err_len, why);
        if (usage_error) {
            *usage_error = 1;
        }
        kcm_session_free(s);
        return nullptr;
    };
    try {
        if (replay) {
            if (replay->n_steps <= 0 || replay->n_prompt_tokens <= 0 || !replay->tokens || !replay->n_tokens) {
                return refuse("the replayed trace has no steps or no prompt");
            }
            s->replay = true;
            size_t off = 0;
            for (int32_t i = 0; i < replay->n_steps; ++i) {
                const int32_t n = replay->n_tokens[i];
                if (n <= 0) {
                    return refuse("the replayed trace's step " + std::to_string(i) + " has no tokens");
                }
                s->replay_steps.emplace_back(replay->tokens + off, replay->tokens + off + n);
                off += (size_t) n;
            }
        }
        common_params & p = s->params;
        // Tracing defaults that differ from llama.cpp's tools: no warm-up decode (it would
        // be traced as a step), no -fit dry run (it loads the model twice).
        p.warmup = false;
        p.fit_params = false;
        // A tracer decodes the prompt only unless -n asks for generated tokens.
        p.n_predict = 0;
        if (!common_params_parse(argc, const_cast<char **>(argv), p, LLAMA_EXAMPLE_COMMON)) {
            set_err(err, err_len, "llama.cpp rejected the arguments (its reason is printed above)");
            if (usage_error) {
                *usage_error = 1;
            }
            delete s;
            return nullptr;
        }
#if KCM_MIXED_KV
        // --mixed-swa-type (vendor/patches/0005) sets the window-layer cache of a mixed KV cache;
        // a quantized one holds a quantized V, which llama.cpp reads with flash attention only.
        if (p.mixed_swa_type != GGML_TYPE_COUNT) {
            const std::string t = ggml_type_name(p.mixed_swa_type);
            if (!p.mixed_kv_cache) {
                return refuse("--mixed-swa-type " + t + " sets the sliding-window layers' cache of the mixed KV cache: "
                              "add --mixed-kv-cache (or leave it out)");
            }
            if (ggml_is_quantized(p.mixed_swa_type) && p.flash_attn_type == LLAMA_FLASH_ATTN_TYPE_DISABLED) {
                return refuse("--mixed-swa-type " + t + " quantizes the sliding-window layers' V cache, which llama.cpp "
                              "attends to with flash attention only: use -fa on (or auto), or --mixed-swa-type f16");
            }
        }
#endif
        const bool ctx_given = flag_given(argc, argv, "-c", "--ctx-size");
        const bool prompt_given = flag_given(argc, argv, "-p", "--prompt") || flag_given(argc, argv, "-f", "--file") ||
                                  flag_given(argc, argv, "-bf", "--binary-file");
        const bool n_given = flag_given(argc, argv, "-n", "--predict") || flag_given(argc, argv, "--n-predict", nullptr);
        if (!verbose) {
            common_log_pause(common_log_main());
            llama_log_set(quiet_log, nullptr);
            ggml_log_set(quiet_log, nullptr);
        }
        if (p.model.path.empty()) {
            set_err(err, err_len, "no model given: pass -m FILE");
            delete s;
            return nullptr;
        }
        {
            FILE * f = fopen(p.model.path.c_str(), "rb");
            if (!f) {
                set_err(err, err_len, "cannot open model file '" + p.model.path + "': " + strerror(errno));
                delete s;
                return nullptr;
            }
            fclose(f);
        }
        p.cb_eval = cb;
        p.cb_eval_user_data = cb_user;

        llama_backend_init();
        llama_numa_init(p.numa);

        // The prompt sizes the context (without -c), so tokenize it first, with the
        // vocabulary alone (no weights are read).
        {
            llama_model_params vp = llama_model_default_params();
            vp.vocab_only = true;
            llama_model * vm = llama_model_load_from_file(p.model.path.c_str(), vp);
            if (!vm) {
                set_err(err, err_len, "llama.cpp could not load the model '" + p.model.path + "'");
                delete s;
                return nullptr;
            }
            const llama_vocab * vocab = llama_model_get_vocab(vm);
            s->prompt = common_tokenize(vocab, p.prompt, /*add_special=*/true, /*parse_special=*/true);
            if (s->replay) {
                const int32_t n_vocab = llama_vocab_n_tokens(vocab);
                for (size_t i = 0; i < s->replay_steps.size(); ++i) {
                    for (llama_token t : s->replay_steps[i]) {
                        if (t < 0 || t >= n_vocab) {
                            llama_model_free(vm);
                            return refuse("the replayed trace's step " + std::to_string(i) + " decodes token " +
                                          std::to_string(t) + ", outside this model's vocabulary of " +
                                          std::to_string(n_vocab) + " tokens (was it traced with another model?)");
                        }
                    }
                }
                std::vector<llama_token> replayed;
                for (const auto & st : s->replay_steps) {
                    if (replayed.size() >= (size_t) replay->n_prompt_tokens) {
                        break;
                    }
                    replayed.insert(replayed.end(), st.begin(), st.end());
                }
                replayed.resize(std::min(replayed.size(), (size_t) replay->n_prompt_tokens));
                if (prompt_given && s->prompt != replayed) {
                    size_t i = 0;
                    while (i < s->prompt.size() && i < replayed.size() && s->prompt[i] == replayed[i]) {
                        ++i;
                    }
                    llama_model_free(vm);
                    return refuse("the prompt given tokenizes to " + std::to_string(s->prompt.size()) +
                                  " tokens, the replayed trace's prompt has " + std::to_string(replayed.size()) +
                                  " (they first differ at token " + std::to_string(i) +
                                  "): leave out -p to replay the trace's prompt, or do not replay");
                }
                s->prompt = replayed;
            }
            const llama_token bos = llama_vocab_bos(vocab);
            // llama_init_from_model forces flash attention off for Grok (its softcap is
            // explicit graph ops) and then refuses a quantized V cache, which needs flash
            // attention, with a log line of its own: say so here, as an option error.
            char arch[64] = {0};
            llama_model_meta_val_str(vm, "general.architecture", arch, sizeof(arch));
            llama_model_free(vm);
            // The mixed KV cache refuses what it cannot express before any work. The
            // vocabulary-only load has no hyperparameters: load the model's metadata
            // (no_alloc: no weights read, nothing allocated) just for the check.
            std::string mixed_why;
#if KCM_MIXED_KV
            if (p.mixed_kv_cache) {
                llama_model_params mp = llama_model_default_params();
                mp.n_gpu_layers = 0;
                mp.no_alloc = true;
                mp.load_mode = LLAMA_LOAD_MODE_NONE;
                if (llama_model * fm = llama_model_load_from_file(p.model.path.c_str(), mp)) {
                    mixed_why = mixed_kv_refusal(fm, p.model.path);
                    if (mixed_why.empty() && p.mixed_swa_type != GGML_TYPE_COUNT && llama_model_n_swa(fm) == 0) {
                        mixed_why = std::string("--mixed-swa-type ") + ggml_type_name(p.mixed_swa_type) +
                                    ": architecture '" + arch + "' has no sliding-window layers (the option sets the "
                                    "window layers' cache of an iSWA model such as Gemma 2/3)";
                    }
                    llama_model_free(fm);
                }
            }
#endif
            if (!mixed_why.empty()) {
                set_err(err, err_len, mixed_why);
                if (usage_error) {
                    *usage_error = 1;
                }
                delete s;
                return nullptr;
            }
            if (strcmp(arch, "grok") == 0 && ggml_is_quantized(p.cache_type_v)) {
                set_err(err, err_len,
                        std::string("a quantized V cache (-ctv ") + ggml_type_name(p.cache_type_v) +
                            ") needs flash attention, which llama.cpp turns off for grok models: "
                            "use -ctv f16, bf16 or f32");
                if (usage_error) {
                    *usage_error = 1;
                }
                delete s;
                return nullptr;
            }
            if (s->prompt.empty()) {
                // An empty prompt (-p '') still needs one token to decode: use BOS.
                if (bos == LLAMA_TOKEN_NULL) {
                    set_err(err, err_len, "the prompt is empty and the model has no BOS token");
                    delete s;
                    return nullptr;
                }
                s->prompt.push_back(bos);
            }
        }
        if (s->replay) {
            // -n limits the generated steps replayed (their count is known once the prompt's
            // steps are, after the model is loaded); the context holds every replayed token.
            s->replay_generated = n_given && p.n_predict >= 0 ? (size_t) p.n_predict : SIZE_MAX;
        }
        if (!ctx_given) {
            const int32_t n_gen = p.n_predict > 0 ? p.n_predict : 0;
            int32_t need = (int32_t) s->prompt.size() + n_gen;
            if (s->replay) {
                size_t total = 0;
                for (const auto & st : s->replay_steps) {
                    total += st.size();
                }
                need = (int32_t) std::min<size_t>(total, INT32_MAX - 256);
            }
            p.n_ctx = std::max<int32_t>(256, (need + 255) / 256 * 256);
        }
        // The model, the context and the samplers as llama.cpp's own tools get them:
        // common_init_from_params also applies the model's sampling defaults, the EOS
        // logit bias of --ignore-eos, LoRA adapters and control vectors (loading the
        // model alone, model_only, skips all of them).
        s->init = common_init_from_params(p);
        s->model = s->init ? s->init->model() : nullptr;
        if (!s->model) {
            set_err(err, err_len, "llama.cpp could not load the model '" + p.model.path + "'");
            delete s;
            return nullptr;
        }
        s->ctx = s->init->context();
        if (!s->ctx) {
            set_err(err, err_len, "llama.cpp could not create a context (see its log with -v)");
            delete s;
            return nullptr;
        }
        {
            // Our own pools, as common_threadpools::init makes them (one pool, or a batch
            // pool and a paused one when the batch threads differ), attached in place of
            // the ones common_init_from_params attached: the capture needs the pool's
            // pointer (kcm_session_threadpool), which common keeps private.
            ggml_threadpool_params tpp_batch = ggml_threadpool_params_from_cpu_params(p.cpuparams_batch);
            ggml_threadpool_params tpp = ggml_threadpool_params_from_cpu_params(p.cpuparams);
            if (!ggml_threadpool_params_match(&tpp, &tpp_batch)) {
                s->threadpool_batch = ggml_threadpool_new(&tpp_batch);
                tpp.paused = true;
            }
            s->threadpool = ggml_threadpool_new(&tpp);
            if (s->threadpool) {
                s->threadpool_threads = tpp.n_threads;
                llama_attach_threadpool(s->ctx, s->threadpool, s->threadpool_batch);
            } else if (s->threadpool_batch) {
                ggml_threadpool_free(s->threadpool_batch);
                s->threadpool_batch = nullptr;
            }
        }
        if ((int32_t) s->prompt.size() > (int32_t) llama_n_ctx(s->ctx)) {
            set_err(err, err_len, "the prompt has " + std::to_string(s->prompt.size()) +
                                      " tokens, more than the context of " +
                                      std::to_string(llama_n_ctx(s->ctx)));
            kcm_session_free(s);
            return nullptr;
        }
        if (llama_model_has_encoder(s->model) &&
            (int32_t) s->prompt.size() > (int32_t) llama_n_ubatch(s->ctx)) {
            // llama_encode takes the whole prompt in one ubatch (it asserts so).
            set_err(err, err_len,
                    "this model has an encoder, which takes the whole prompt in one ubatch: the prompt has " +
                        std::to_string(s->prompt.size()) + " tokens, the ubatch " +
                        std::to_string(llama_n_ubatch(s->ctx)) + ": pass -ub " +
                        std::to_string(s->prompt.size()) + " -b " + std::to_string(s->prompt.size()) +
                        " (or more)");
            if (usage_error) {
                *usage_error = 1;
            }
            kcm_session_free(s);
            return nullptr;
        }
        if (s->replay) {
            const std::string why = replay_split(s, (size_t) replay->n_prompt_tokens, llama_model_has_encoder(s->model));
            if (!why.empty()) {
                return refuse("the replayed trace cannot be replayed: " + why);
            }
            const size_t available = s->replay_steps.size() - s->replay_prompt_steps;
            s->replay_generated = std::min(s->replay_generated, available);
            s->params.n_predict = (int32_t) s->replay_generated;
            const size_t first = llama_model_has_encoder(s->model) ? 1 : 0;
            size_t total = 0;
            for (size_t i = 0; i < s->replay_prompt_steps + s->replay_generated; ++i) {
                const size_t n = s->replay_steps[i].size();
                if (i >= first) {
                    total += n;
                }
                if (n > llama_n_ubatch(s->ctx) || n > llama_n_batch(s->ctx)) {
                    return refuse("the replayed trace's step " + std::to_string(i) + " decodes " + std::to_string(n) +
                                  " tokens at once, more than this run's ubatch (" +
                                  std::to_string(llama_n_ubatch(s->ctx)) + "): pass -ub " + std::to_string(n) +
                                  " -b " + std::to_string(n) + " (or more) so each step stays one ubatch");
                }
            }
            if (total > llama_n_ctx(s->ctx)) {
                return refuse("the replayed steps hold " + std::to_string(total) + " tokens, more than the context of " +
                              std::to_string(llama_n_ctx(s->ctx)) + ": pass -c " + std::to_string(total) + " (or more)");
            }
        }
        // The sampler common_init_from_params made from the parameters it completed.
        s->sampler = s->init->sampler(0);
        if (!s->sampler) {
            set_err(err, err_len, "llama.cpp could not create the sampler");
            kcm_session_free(s);
            return nullptr;
        }
    } catch (const std::exception & e) {
        set_err(err, err_len, std::string("llama.cpp: ") + e.what());
        kcm_session_free(s);
        return nullptr;
    }
    return s;
}

void kcm_session_info(const kcm_session * s, kcm_run_info * out) {
    memset(out, 0, sizeof(*out));
    const llama_model * m = s->model;
    out->n_layer = llama_model_n_layer(m);
    out->n_head = llama_model_n_head(m);
    out->n_head_kv = llama_model_n_head_kv(m);
    out->n_ctx = llama_n_ctx(s->ctx);
    out->n_batch = llama_n_batch(s->ctx);
    out->n_ubatch = llama_n_ubatch(s->ctx);
    out->n_predict = s->params.n_predict;
    out->seed = s->params.sampling.seed;
    const llama_context_params cp = common_context_params_to_llama(s->params);
    // AUTO is resolved inside the context; the trace records the resolution the
    // callback observes (a FLASH_ATTN_EXT node or not), this is the request.
    out->flash_attn = cp.flash_attn_type == LLAMA_FLASH_ATTN_TYPE_ENABLED ? 1
                    : cp.flash_attn_type == LLAMA_FLASH_ATTN_TYPE_DISABLED ? 0 : -1;
    out->type_k = (int32_t) s->params.cache_type_k;
    out->type_v = (int32_t) s->params.cache_type_v;
    out->n_prompt_tokens = (int32_t) s->prompt.size();
#if KCM_MIXED_KV
    out->mixed_kv_cache = s->params.mixed_kv_cache ? 1 : 0;
    out->mixed_hot_window = (uint32_t) s->params.mixed_hot_window;
    out->mixed_cold_type = (int32_t) s->params.mixed_cold_type;
    out->mixed_swa_type = s->params.mixed_swa_type == GGML_TYPE_COUNT ? -1 : (int32_t) s->params.mixed_swa_type;
#else
    out->mixed_kv_cache = 0;
    out->mixed_hot_window = 0;
    out->mixed_cold_type = -1;
    out->mixed_swa_type = -1;
#endif
#if KCM_MIXED_KV
    // llama_memory_buffer_size comes with the mixed KV cache (vendor/patches/0002).
    out->kv_buffer_bytes = (uint64_t) llama_memory_buffer_size(llama_get_memory(s->ctx));
#else
    out->kv_buffer_bytes = 0; // unknown: the tree has no llama_memory_buffer_size
#endif
    out->n_threads = (int32_t) llama_n_threads(s->ctx);
    out->n_threads_batch = (int32_t) llama_n_threads_batch(s->ctx);
    llama_model_meta_val_str(m, "general.architecture", out->arch, sizeof(out->arch));
    snprintf(out->model_path, sizeof(out->model_path), "%s", s->params.model.path.c_str());
}

int32_t kcm_session_prompt_tokens(const kcm_session * s, int32_t * out, int32_t cap) {
    const int32_t n = (int32_t) s->prompt.size();
    for (int32_t i = 0; i < n && i < cap; ++i) {
        out[i] = s->prompt[i];
    }
    return n;
}

int32_t kcm_session_run(kcm_session * s, int32_t prefill_only, int32_t want_logits, kcm_step_cb on_step,
                        kcm_output_cb on_output, void * user, char * err, size_t err_len) {
    try {
        const int32_t n_ubatch = (int32_t) llama_n_ubatch(s->ctx);
        const int32_t n_ctx = (int32_t) llama_n_ctx(s->ctx);
        const llama_vocab * vocab = llama_model_get_vocab(s->model);
        const int32_t n_vocab = llama_vocab_n_tokens(vocab);
        const bool encoder = llama_model_has_encoder(s->model);
        uint32_t step = 0;
        int32_t pos = 0;
        std::vector<int32_t> positions;

        // The step just computed (step - 1): the sampler's choice and, for a decoded step,
        // the logits of its last token. False: stop.
        auto output = [&](int32_t sampled, bool has_logits) -> bool {
            if (!on_output) {
                return true;
            }
            const float * logits = has_logits && want_logits ? llama_get_logits_ith(s->ctx, -1) : nullptr;
            return on_output(user, step - 1, sampled, logits, logits ? n_vocab : 0) != 0;
        };
        // 1: decoded, 0: stopped by the caller, -1: failed.
        auto decode = [&](llama_token * toks, int32_t n) -> int32_t {
            positions.resize(n);
            for (int32_t i = 0; i < n; ++i) {
                positions[i] = pos + i;
            }
            if (on_step && !on_step(user, step, toks, positions.data(), n)) {
                return 0;  // stopped by the caller
            }
            const int32_t rc = llama_decode(s->ctx, llama_batch_get_one(toks, n));
            if (rc != 0) {
                set_err(err, err_len, "llama_decode failed at step " + std::to_string(step) +
                                          " (code " + std::to_string(rc) + ")");
                return -1;
            }
            pos += n;
            ++step;
            return 1;
        };

        // Generated steps to decode, and whether the sampler chooses after the prompt.
        const int32_t n_predict = s->replay ? (int32_t) s->replay_generated : s->params.n_predict;
        const bool generating = !prefill_only && n_predict != 0;

        // An encoder-decoder model (T5): the encoder reads the whole prompt, one step
        // (llama_encode), and the decoder starts from the model's decoder start token,
        // as llama.cpp's common warm-up does (or from the replayed trace's step 1).
        std::vector<llama_token> decoder_prompt;
        if (encoder) {
            const int32_t n = (int32_t) s->prompt.size();
            positions.resize(n);
            for (int32_t i = 0; i < n; ++i) {
                positions[i] = i;
                common_sampler_accept(s->sampler, s->prompt[i], false);
            }
            if (on_step && !on_step(user, step, s->prompt.data(), positions.data(), n)) {
                return 0;
            }
            const int32_t rc = llama_encode(s->ctx, llama_batch_get_one(s->prompt.data(), n));
            if (rc != 0) {
                set_err(err, err_len, "llama_encode failed at step " + std::to_string(step) +
                                          " (code " + std::to_string(rc) + ")");
                return -1;
            }
            ++step;
            if (!output(-1, false)) {
                return (int32_t) step;
            }
            if (!llama_model_has_decoder(s->model)) {
                return (int32_t) step;
            }
            if (s->replay) {
                if (s->replay_prompt_steps < 2) {
                    return (int32_t) step;  // the trace ended after its encoder step
                }
                decoder_prompt = s->replay_steps[1];
            } else {
                llama_token start = llama_model_decoder_start_token(s->model);
                if (start == LLAMA_TOKEN_NULL) {
                    start = llama_vocab_bos(vocab);
                }
                decoder_prompt.push_back(start);
            }
        }
        // The prompt's steps: the replayed trace's split, else ubatches of n_ubatch tokens.
        std::vector<std::vector<llama_token>> chunks;
        if (s->replay && !encoder) {
            chunks.assign(s->replay_steps.begin(), s->replay_steps.begin() + (std::ptrdiff_t) s->replay_prompt_steps);
        } else {
            const std::vector<llama_token> & prompt = encoder ? decoder_prompt : s->prompt;
            for (size_t i = 0; i < prompt.size(); i += (size_t) n_ubatch) {
                const size_t n = std::min<size_t>((size_t) n_ubatch, prompt.size() - i);
                chunks.emplace_back(prompt.begin() + (std::ptrdiff_t) i, prompt.begin() + (std::ptrdiff_t) (i + n));
            }
        }
        llama_token next = -1;
        for (size_t c = 0; c < chunks.size(); ++c) {
            std::vector<llama_token> & chunk = chunks[c];
            for (llama_token t : chunk) {
                common_sampler_accept(s->sampler, t, false);
            }
            const int32_t r = decode(chunk.data(), (int32_t) chunk.size());
            if (r <= 0) {
                return r < 0 ? -1 : (int32_t) step;
            }
            const bool last = c + 1 == chunks.size();
            next = last && generating ? common_sampler_sample(s->sampler, s->ctx, -1) : -1;
            if (!output(next, true)) {
                return (int32_t) step;
            }
        }
        if (!generating) {
            return (int32_t) step;
        }
        // Each generated step decodes the sampler's choice (or the replayed token), and
        // the sampler then chooses again from its output: the last choice is recorded too.
        for (int32_t i = 0; n_predict < 0 || i < n_predict; ++i) {
            if (pos >= n_ctx) {
                break;  // the context is full
            }
            llama_token tok = s->replay ? s->replay_steps[s->replay_prompt_steps + (size_t) i][0] : next;
            if (!s->replay && llama_vocab_is_eog(vocab, tok)) {
                break;
            }
            common_sampler_accept(s->sampler, tok, true);
            s->generated += common_token_to_piece(s->ctx, tok);
            const int32_t r = decode(&tok, 1);
            if (r <= 0) {
                return r < 0 ? -1 : (int32_t) step;
            }
            next = common_sampler_sample(s->sampler, s->ctx, -1);
            if (!output(next, true)) {
                return (int32_t) step;
            }
        }
        return (int32_t) step;
    } catch (const std::exception & e) {
        set_err(err, err_len, std::string("llama.cpp: ") + e.what());
        return -1;
    }
}

ggml_threadpool * kcm_session_threadpool(kcm_session * s, int32_t * n_threads) {
    // With a separate batch pool the pool in use changes with the batch size: none then.
    if (!s->threadpool || s->threadpool_batch) {
        *n_threads = 0;
        return nullptr;
    }
    *n_threads = s->threadpool_threads;
    return s->threadpool;
}

const char * kcm_session_generated_text(kcm_session * s) {
    return s->generated.c_str();
}

void kcm_session_free(kcm_session * s) {
    if (!s) {
        return;
    }
    // The context and the sampler belong to `init`.
    s->init.reset();
    if (s->threadpool) {
        ggml_threadpool_free(s->threadpool);
    }
    if (s->threadpool_batch) {
        ggml_threadpool_free(s->threadpool_batch);
    }
    delete s;
}
