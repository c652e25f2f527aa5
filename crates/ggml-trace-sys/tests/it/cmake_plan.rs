//! Linking a cmake build (build/cmake.rs), without a build: CMakeCache.txt parsing, the
//! libraries found in a fake build directory, their link order, the system libraries and
//! the refusal lines.

#[allow(dead_code)]
#[path = "../../build/cmake.rs"]
mod cmake;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const CACHE_HEADER: &str = "# This is the CMakeCache file.\n\n//Build shared libs\n";

fn touch(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, b"").unwrap();
}

/// A fake build dir configured from `src` with `entries` (NAME:TYPE=VALUE lines) and
/// empty library files at `libs` (relative paths).
fn fake_build(src: &Path, entries: &[&str], libs: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut text = format!(
        "{CACHE_HEADER}CMAKE_HOME_DIRECTORY:INTERNAL={}\n",
        src.display()
    );
    for e in entries {
        text.push_str(e);
        text.push('\n');
    }
    std::fs::write(dir.path().join("CMakeCache.txt"), text).unwrap();
    for lib in libs {
        touch(&dir.path().join(lib));
    }
    dir
}

const SHARED_LIBS: &[&str] = &[
    "bin/libggml-base.so",
    "bin/libggml-base.so.0",
    "bin/libggml-base.so.0.26.0",
    "bin/libggml-cpu.so",
    "bin/libggml-rpc.so",
    "bin/libggml.so",
    "bin/libllama.so",
    "bin/libllama-common.so",
    "common/libllama-common-base.a",
    "vendor/cpp-httplib/libcpp-httplib.a",
];

const STATIC_LIBS: &[&str] = &[
    "ggml/src/libggml-base.a",
    "ggml/src/libggml-cpu.a",
    "ggml/src/ggml-rpc/libggml-rpc.a",
    "ggml/src/ggml-cuda/libggml-cuda.a",
    "ggml/src/libggml.a",
    "src/libllama.a",
    "common/libllama-common.a",
    "common/libllama-common-base.a",
    "vendor/cpp-httplib/libcpp-httplib.a",
];

fn names(plan: &cmake::Plan) -> Vec<&str> {
    plan.libs.iter().map(|l| l.name.as_str()).collect()
}

#[test]
fn parses_cmake_cache_entries() {
    let cache = cmake::parse_cache(
        "# comment\n//help text\nBUILD_SHARED_LIBS:BOOL=ON\n\nGGML_OPENMP:BOOL=OFF\n\
         llama.cpp_SOURCE_DIR:STATIC=/src/llama.cpp\nOpenMP_CXX_LIB_NAMES:STRING=gomp;pthread\n\
         EMPTY:STRING=\n\"QUOTED:NAME\":STRING=x=y\n",
    );
    assert_eq!(cache["BUILD_SHARED_LIBS"], "ON");
    assert_eq!(cache["GGML_OPENMP"], "OFF");
    assert_eq!(cache["llama.cpp_SOURCE_DIR"], "/src/llama.cpp");
    assert_eq!(cache["OpenMP_CXX_LIB_NAMES"], "gomp;pthread");
    assert_eq!(cache["EMPTY"], "");
    assert_eq!(cache["QUOTED:NAME"], "x=y");
    assert!(!cache.contains_key("help text"));
    assert_eq!(cache.len(), 6);
    assert_eq!(
        cmake::source_dir(&cache),
        Some(PathBuf::from("/src/llama.cpp"))
    );
}

#[test]
fn cmake_truth_values() {
    for on in ["ON", "on", "TRUE", "yes", "Y", "1", "2"] {
        assert!(cmake::is_on(Some(&on.to_string())), "{on}");
    }
    for off in ["OFF", "FALSE", "NO", "N", "0", "", "IGNORE", "NOTFOUND"] {
        assert!(!cmake::is_on(Some(&off.to_string())), "{off}");
    }
    assert!(!cmake::is_on(None));
}

#[test]
fn library_file_names() {
    let name = |f: &str| cmake::lib_name(Path::new(f));
    assert_eq!(name("libggml-cpu.so"), Some(("ggml-cpu".into(), true)));
    assert_eq!(name("libllama.dylib"), Some(("llama".into(), true)));
    assert_eq!(
        name("libllama-common.a"),
        Some(("llama-common".into(), false))
    );
    assert_eq!(name("libllama.so.0"), None);
    assert_eq!(name("libllama.so.0.0.1"), None);
    assert_eq!(name("llama.so"), None);
    assert_eq!(name("libggml.la"), None);
}

#[test]
fn shared_build_links_shared_libraries_in_dependency_order() {
    let src = tempfile::tempdir().unwrap();
    let build = fake_build(
        src.path(),
        &[
            "BUILD_SHARED_LIBS:BOOL=ON",
            "GGML_OPENMP:BOOL=ON",
            "OpenMP_CXX_LIB_NAMES:STRING=gomp;pthread",
        ],
        SHARED_LIBS,
    );
    let plan = cmake::plan(build.path(), src.path()).unwrap();
    assert_eq!(
        names(&plan),
        [
            "llama-common",
            "llama-common-base",
            "llama",
            "ggml",
            "ggml-rpc",
            "ggml-cpu",
            "ggml-base"
        ]
    );
    assert!(plan.shared);
    assert_eq!(plan.kind(), "shared libraries");
    assert_eq!(plan.backends, ["ggml-rpc"]);
    let shared: Vec<bool> = plan.libs.iter().map(|l| l.shared).collect();
    // cpp-httplib is inside the shared common; common-base is linked publicly.
    assert_eq!(shared, [true, false, true, true, true, true, true]);
    let bin = build.path().canonicalize().unwrap().join("bin");
    assert_eq!(plan.rpath_dirs(), std::slice::from_ref(&bin));
    // ggml-cpu is shared: it records libgomp itself.
    assert_eq!(plan.system, ["stdc++", "m", "pthread", "dl"]);
    let inputs = plan.inputs();
    assert!(inputs[0].ends_with("CMakeCache.txt"));
    assert!(inputs.contains(&bin.join("libllama.so")));

    let flag = cmake::rpath_flag(&plan.rpath_dirs());
    assert_eq!(flag, format!("-C link-arg=-Wl,-rpath,{}", bin.display()));
    let encoded = flag.replace(' ', "\x1f");
    assert!(cmake::has_rpath(&encoded, &plan.rpath_dirs()));
    assert!(!cmake::has_rpath("", &plan.rpath_dirs()));
    assert!(!cmake::has_rpath(
        "-C\x1flink-arg=-Wl,-rpath,/elsewhere",
        &plan.rpath_dirs()
    ));
}

#[test]
fn static_build_links_backends_openmp_and_cuda() {
    let src = tempfile::tempdir().unwrap();
    let build = fake_build(
        src.path(),
        &[
            "BUILD_SHARED_LIBS:BOOL=OFF",
            "GGML_OPENMP:BOOL=ON",
            "OpenMP_CXX_LIB_NAMES:STRING=gomp;pthread",
            "OpenMP_gomp_LIBRARY:FILEPATH=/usr/lib/gcc/x86_64-linux-gnu/12/libgomp.so",
            "GGML_CUDA:BOOL=ON",
            "CUDAToolkit_LIBRARY_DIR:PATH=/usr/local/cuda/lib64",
        ],
        STATIC_LIBS,
    );
    let plan = cmake::plan(build.path(), src.path()).unwrap();
    assert_eq!(
        names(&plan),
        [
            "llama-common",
            "llama-common-base",
            "cpp-httplib",
            "llama",
            "ggml",
            "ggml-cuda",
            "ggml-rpc",
            "ggml-cpu",
            "ggml-base"
        ]
    );
    assert!(!plan.shared);
    assert_eq!(plan.kind(), "static libraries");
    assert!(plan.libs.iter().all(|l| !l.shared));
    assert!(plan.rpath_dirs().is_empty());
    assert_eq!(
        plan.system,
        ["gomp", "pthread", "cudart", "cublas", "cublasLt", "cuda", "stdc++", "m", "dl"]
    );
    assert!(plan
        .system_dirs
        .contains(&PathBuf::from("/usr/lib/gcc/x86_64-linux-gnu/12")));
    assert!(plan
        .system_dirs
        .contains(&PathBuf::from("/usr/local/cuda/lib64/stubs")));
}

#[test]
fn older_common_target_name_and_no_openmp() {
    let src = tempfile::tempdir().unwrap();
    let build = fake_build(
        src.path(),
        &["GGML_OPENMP:BOOL=OFF"],
        &[
            "src/libllama.a",
            "common/libcommon.a",
            "ggml/src/libggml.a",
            "ggml/src/libggml-cpu.a",
            "ggml/src/libggml-base.a",
        ],
    );
    let plan = cmake::plan(build.path(), src.path()).unwrap();
    assert_eq!(
        names(&plan),
        ["common", "llama", "ggml", "ggml-cpu", "ggml-base"]
    );
    assert!(plan.backends.is_empty());
    assert_eq!(plan.system, ["stdc++", "m", "pthread", "dl"]);
}

#[test]
fn refusals_are_one_line() {
    let src = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let check = |err: String, wanted: &str| {
        assert!(err.contains(wanted), "{err}");
        assert!(err.starts_with("KCM_LLAMA_BUILD="), "{err}");
        assert!(!err.contains('\n'), "{err}");
    };

    let not_cmake = tempfile::tempdir().unwrap();
    check(
        cmake::plan(not_cmake.path(), src.path()).unwrap_err(),
        "no CMakeCache.txt",
    );

    let build = fake_build(other.path(), &[], SHARED_LIBS);
    let err = cmake::plan(build.path(), src.path()).unwrap_err();
    check(err.clone(), "not from the llama.cpp tree");
    assert!(err.contains(&other.path().display().to_string()), "{err}");

    let build = fake_build(
        src.path(),
        &["BUILD_SHARED_LIBS:BOOL=ON", "GGML_BACKEND_DL:BOOL=ON"],
        SHARED_LIBS,
    );
    check(
        cmake::plan(build.path(), src.path()).unwrap_err(),
        "GGML_BACKEND_DL=ON",
    );

    let build = fake_build(src.path(), &["LLAMA_BUILD_COMMON:BOOL=OFF"], SHARED_LIBS);
    check(
        cmake::plan(build.path(), src.path()).unwrap_err(),
        "LLAMA_BUILD_COMMON=OFF",
    );

    let unbuilt: Vec<&str> = SHARED_LIBS
        .iter()
        .copied()
        .filter(|l| !l.contains("libllama.so"))
        .collect();
    let build = fake_build(src.path(), &[], &unbuilt);
    check(
        cmake::plan(build.path(), src.path()).unwrap_err(),
        "no libllama.{so,a} (libllama) under it",
    );
}

#[test]
fn shared_wins_over_static_of_the_same_name() {
    let build = tempfile::tempdir().unwrap();
    touch(&build.path().join("bin/libggml.so"));
    touch(&build.path().join("ggml/src/libggml.a"));
    let found: BTreeMap<String, cmake::Lib> = cmake::find_libs(build.path());
    assert!(found["ggml"].shared);
    assert_eq!(found.len(), 1);
}
