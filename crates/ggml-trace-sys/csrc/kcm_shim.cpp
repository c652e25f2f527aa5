// See kcm_shim.h.
#include "kcm_shim.h"

#include "arg.h"
#include "build-info.h"
#include "common.h"
#include "debug.h"

#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

extern "C" int32_t kcm_common_params_parse(int32_t argc, const char * const * argv, kcm_common_args * out) {
    if (argc < 1 || argv == nullptr || out == nullptr) {
        return 0;
    }
    try {
        // common_params_parse wants mutable char **; give it private copies.
        std::vector<std::string> storage(argv, argv + argc);
        std::vector<char *> args;
        for (auto & s : storage) {
            args.push_back(s.data());
        }
        args.push_back(nullptr);

        common_params params;
        if (!common_params_parse(argc, args.data(), params, LLAMA_EXAMPLE_COMMON)) {
            return 0;
        }
        out->n_predict = params.n_predict;
        out->n_ctx     = params.n_ctx;
        out->n_batch   = params.n_batch;
        out->n_ubatch  = params.n_ubatch;
        out->n_threads = params.cpuparams.n_threads;
        out->seed      = params.sampling.seed;
        std::snprintf(out->model_path, sizeof(out->model_path), "%s", params.model.path.c_str());
        return 1;
    } catch (const std::exception & e) {
        std::fprintf(stderr, "kcm_common_params_parse: %s\n", e.what());
        return 0;
    } catch (...) {
        return 0;
    }
}

extern "C" const char * kcm_common_build_info(void) {
    return llama_build_info();
}

bool kcm_llama_debug_cb(struct ggml_tensor * t, bool ask, void * user_data) {
    return common_debug_cb_eval(t, ask, user_data);
}

void * kcm_llama_debug_new(void) {
    try {
        return new common_debug_cb_user_data();
    } catch (const std::exception &) {
        return nullptr;
    }
}

void kcm_llama_debug_free(void * user_data) {
    delete static_cast<common_debug_cb_user_data *>(user_data);
}
