//! The source lists read from the tree's CMake files (build/cmake_lists.rs and
//! build/sources.rs): the reader on CMake text whose answer is known, and the lists this
//! build chose. On the pinned tree the CMake-derived list of every library must equal the
//! hand-written built-in list (two independent derivations of the same set of files).

#[allow(dead_code)]
#[path = "../../build/cmake_lists.rs"]
mod cmake_lists;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use ggml_trace_sys::{LLAMA_CPP_DIR, LLAMA_TREE_IS_PINNED, SOURCE_LISTS};

#[test]
fn parser_splits_commands_keeps_quoted_and_bracket_arguments_and_skips_comments() {
    let text = r#"
# a comment ( with a paren
SET(A x "y z" [[br ) # acket]] w) # trailing
#[[ a bracket
comment add_library(nope) ]]
if ((A) AND B)
  list (APPEND A "q\"uote")
endif()
"#;
    let cmds = cmake_lists::parse(text).unwrap();
    let names: Vec<&str> = cmds.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["set", "if", "list", "endif"]);
    assert_eq!(cmds[0].args, ["A", "x", "y z", "br ) # acket", "w"]);
    assert_eq!(cmds[0].line, 3);
    assert_eq!(cmds[1].args, ["(", "A", ")", "AND", "B"]);
    assert_eq!(cmds[2].args, ["APPEND", "A", "q\"uote"]);
    assert!(cmds[3].args.is_empty());
}

#[test]
fn parser_rejects_broken_text_with_the_line() {
    for (text, needle) in [
        ("set(A x\n\n", "line 1: unterminated argument list"),
        ("set(A \"x)\n", "line 1: unterminated quoted argument"),
        ("\nset A\n", "line 2: `set` is not followed by `(`"),
        ("#[[ never closed\n", "unterminated bracket"),
        ("set(A)\n)", "line 2: unexpected `)`"),
    ] {
        let err = cmake_lists::parse(text).unwrap_err();
        assert!(err.contains(needle), "{text:?}: {err}");
    }
}

#[test]
fn reader_follows_variables_globs_includes_and_every_branch() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("models")).unwrap();
    std::fs::create_dir_all(root.join("sub")).unwrap();
    for f in ["models/b.cpp", "models/a.cpp", "models/skip.h"] {
        std::fs::write(root.join(f), "").unwrap();
    }
    std::fs::write(
        root.join("sub/extra.cmake"),
        "set(EXTRA ${CMAKE_CURRENT_LIST_DIR}/e.cpp)\n",
    )
    .unwrap();
    std::fs::write(
        root.join("CMakeLists.txt"),
        r#"
file(GLOB MODELS "models/*.cpp")
set(CORE one.cpp two.c)
include(sub/extra.cmake)
include(CheckCXXCompilerFlag)
if (FOO)
    list(APPEND CORE foo.cpp)
else()
    list(APPEND CORE bar.cpp)
endif()
set(NAME mylib)
add_library(${NAME} STATIC ${CORE} hdr.h ${MODELS} ${EXTRA} ${UNKNOWN}/gen.cpp $<TARGET_OBJECTS:x>)
add_library(alias::mylib ALIAS mylib)
target_sources(${NAME} PRIVATE late.cpp)
set(CACHED v CACHE STRING "doc")
"#,
    )
    .unwrap();
    let lists = cmake_lists::read(&root.join("CMakeLists.txt"), root).unwrap();
    let got: Vec<String> = lists.targets["mylib"]
        .iter()
        .map(|p| p.strip_prefix(root).unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        got,
        [
            "one.cpp",
            "two.c",
            "foo.cpp",
            "bar.cpp",
            "hdr.h",
            "models/a.cpp",
            "models/b.cpp",
            "sub/e.cpp",
            "late.cpp"
        ]
    );
    assert!(!lists.targets.contains_key("alias::mylib"));
    assert_eq!(lists.vars["CACHED"], ["v"]);
    assert_eq!(
        lists.unresolved,
        ["${UNKNOWN}/gen.cpp", "$<TARGET_OBJECTS:x>"]
    );
}

#[test]
fn reader_bounds_include_cycles() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("CMakeLists.txt"),
        "include(CMakeLists.txt)\n",
    )
    .unwrap();
    let err = cmake_lists::read(&dir.path().join("CMakeLists.txt"), dir.path()).unwrap_err();
    assert!(err.contains("nested too deeply"), "{err}");
}

/// (library -> (how chosen, cmake set, builtin set)) from `SOURCE_LISTS`.
type Chosen = BTreeMap<String, (String, BTreeSet<String>, BTreeSet<String>)>;

fn chosen() -> Chosen {
    let mut out = Chosen::new();
    for line in SOURCE_LISTS.lines() {
        let mut parts = line.splitn(3, ' ');
        let (kind, lib, rest) = (
            parts.next().unwrap(),
            parts.next().unwrap().to_string(),
            parts.next().unwrap().to_string(),
        );
        let entry = out.entry(lib).or_default();
        match kind {
            "library" => entry.0 = rest.split(' ').next().unwrap().to_string(),
            "cmake" => assert!(entry.1.insert(rest), "listed twice: {line}"),
            "builtin" => assert!(entry.2.insert(rest), "listed twice: {line}"),
            other => panic!("unknown line kind {other}: {line}"),
        }
    }
    out
}

#[test]
fn every_library_of_this_build_took_its_sources_from_the_trees_cmake_lists() {
    let chosen = chosen();
    let names: Vec<&str> = chosen.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "common",
            "ggml",
            "ggml-base",
            "ggml-cpu",
            "ggml-rpc",
            "llama"
        ]
    );
    for (lib, (how, cmake, builtin)) in &chosen {
        assert_eq!(how, "cmake", "{lib} fell back to the built-in list");
        let extra: Vec<&String> = cmake.difference(builtin).collect();
        if !extra.is_empty() {
            // `cargo xtask test-trees` reports this line (the test fork's new source file).
            println!("source lists: {lib}: only in the CMake list: {extra:?}");
        }
        for rel in cmake {
            assert!(
                Path::new(LLAMA_CPP_DIR).join(rel).is_file(),
                "{lib}: {rel} is not in {LLAMA_CPP_DIR}"
            );
        }
    }
    let cpu = &chosen["ggml-cpu"].1;
    for expected in ["ggml/src/ggml-cpu/ops.cpp", "ggml/src/ggml-cpu/ggml-cpu.c"] {
        assert!(cpu.contains(expected), "ggml-cpu lacks {expected}");
    }
    assert!(
        !cpu.iter()
            .any(|p| p.contains("/amx/") || p.contains("cpu-feats")),
        "ggml-cpu must not compile AMX or the feature probe: {cpu:?}"
    );
    assert!(
        !chosen["common"]
            .1
            .iter()
            .any(|p| p.ends_with("download.cpp")),
        "common must not compile the download code"
    );
}

#[test]
fn on_the_pinned_tree_the_cmake_lists_equal_the_built_in_lists() {
    if !LLAMA_TREE_IS_PINNED {
        eprintln!("skipped: this build is not of the pinned tree ({LLAMA_CPP_DIR})");
        return;
    }
    for (lib, (_, cmake, builtin)) in chosen() {
        let only_cmake: Vec<_> = cmake.difference(&builtin).collect();
        let only_builtin: Vec<_> = builtin.difference(&cmake).collect();
        assert!(
            only_cmake.is_empty() && only_builtin.is_empty(),
            "{lib}: only in the CMake list {only_cmake:?}, only in the built-in list {only_builtin:?}"
        );
    }
}

#[test]
fn configure_file_substitution_fills_known_variables_and_names_unknown_ones() {
    let (text, unknown) = cmake_lists::substitute(
        "#define V \"@LLAMA_VERSION@\"\n// mail@example.com @ @@ @X@@Y@ @MISSING@\n",
        &[("LLAMA_VERSION", "0.6.0-dev"), ("X", "1"), ("Y", "2")],
    );
    assert_eq!(
        text,
        "#define V \"0.6.0-dev\"\n// mail@example.com @ @@ 12 \n"
    );
    assert_eq!(unknown, ["MISSING"]);
}
