// Stand-ins for common/download.cpp and common/hf-cache.cpp, which are not
// compiled (they need cpp-httplib, and OpenSSL for https). kv-cache-monitor
// only loads local model files: every function that would touch the network
// or the Hugging Face cache fails with an explanation, and the ones that
// common_params_parse calls on every run behave as "nothing to download".

#include "download.h"
#include "hf-cache.h"

#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

[[noreturn]] static void kcm_no_download(const char * what) {
    throw std::runtime_error(std::string(what) +
        ": downloading models is not built into kv-cache-monitor; pass a local GGUF file with -m");
}

std::pair<long, std::vector<char>> common_remote_get_content(const std::string &, const common_remote_params &) {
    kcm_no_download("common_remote_get_content");
}

std::pair<std::string, std::string> common_download_split_repo_tag(const std::string & hf_repo_with_tag) {
    auto pos = hf_repo_with_tag.find(':');
    if (pos == std::string::npos) {
        return {hf_repo_with_tag, ""};
    }
    return {hf_repo_with_tag.substr(0, pos), hf_repo_with_tag.substr(pos + 1)};
}

void common_download_run_tasks(const std::vector<common_download_task> & tasks) {
    if (!tasks.empty()) {
        kcm_no_download(("download of " + tasks.front().url).c_str());
    }
}

std::vector<std::string> common_download_get_all_parts(const std::string & url) {
    return {url};
}

std::vector<common_cached_model_info> common_list_cached_models() {
    return {};
}

std::string common_download_resolve_path(const std::string &, const std::string &) {
    return "";
}

int common_download_file_single(const std::string & url, const std::string &, const common_download_opts &, bool) {
    kcm_no_download(("download of " + url).c_str());
}

std::string common_docker_resolve_model(const std::string &) {
    kcm_no_download("--docker-repo");
}

bool common_download_remove(const std::string &) {
    return false;
}

common_download_hf_plan common_download_get_hf_plan(const common_params_model &, const common_download_opts &) {
    kcm_no_download("-hf / --hf-repo");
}

namespace hf_cache {

hf_files get_repo_files(const std::string &, const std::string &) {
    kcm_no_download("hf_cache::get_repo_files");
}

hf_files get_cached_files(const std::string &) {
    return {};
}

std::string finalize_file(const hf_file & file) {
    return file.final_path.empty() ? file.local_path : file.final_path;
}

bool remove_cached_repo(const std::string &) {
    return false;
}

std::string get_cache_path() {
    kcm_no_download("hf_cache::get_cache_path");
}

} // namespace hf_cache
