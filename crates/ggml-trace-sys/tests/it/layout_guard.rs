//! The struct layout guard (build/layout.rs): the expectations read from the committed
//! bindings, the guard passing on the pinned headers and failing with one line naming the
//! field on headers whose `struct ggml_tensor` gained a member.

#[allow(dead_code)]
#[path = "../../build/layout.rs"]
mod layout;

use std::path::{Path, PathBuf};
use std::process::Command;

use ggml_trace_sys::LLAMA_CPP_DIR;
use layout::Check;

fn committed() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/sys.rs")).unwrap()
}

fn compiler(include: &Path) -> Command {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let mut cmd = Command::new(cxx);
    cmd.arg("-std=c++17")
        .arg("-I")
        .arg(include.join("include"))
        .arg("-I")
        .arg(include.join("ggml/include"))
        .arg("-I")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/csrc"));
    cmd
}

#[test]
fn checks_come_from_the_bindings_layout_tests() {
    let checks = layout::checks(&committed(), layout::GUARDED);
    assert!(checks.contains(&Check::Size {
        ty: "ggml_tensor".into(),
        size: 336
    }));
    // bindgen's `type_` is C's `type`.
    assert!(checks.contains(&Check::Offset {
        ty: "ggml_tensor".into(),
        field: "type".into(),
        offset: 0
    }));
    assert!(checks.contains(&Check::Offset {
        ty: "ggml_tensor".into(),
        field: "flags".into(),
        offset: 148
    }));
    for ty in layout::GUARDED {
        assert!(
            checks
                .iter()
                .any(|c| matches!(c, Check::Size { ty: t, .. } if t == ty)),
            "no size for {ty}"
        );
    }
    // ggml_tensor's 14 fields, and nothing of unguarded structs.
    let tensor = checks
        .iter()
        .filter(|c| matches!(c, Check::Offset { ty, .. } if ty == "ggml_tensor"))
        .count();
    assert_eq!(tensor, 14);
    assert!(!checks
        .iter()
        .any(|c| matches!(c, Check::Size { ty, .. } if ty == "ggml_opt_params")));
    println!("{} checks", checks.len());
}

fn scratch_copy(dir: &Path) -> PathBuf {
    let copy = dir.join("tree");
    for sub in ["include", "ggml/include"] {
        let from = Path::new(LLAMA_CPP_DIR).join(sub);
        let to = copy.join(sub);
        std::fs::create_dir_all(&to).unwrap();
        for entry in std::fs::read_dir(&from).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() {
                std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
            }
        }
    }
    copy
}

#[test]
fn guard_passes_on_the_tree_built_and_names_the_moved_field_otherwise() {
    let source = layout::render(&layout::checks(&committed(), layout::GUARDED));
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("guard.cpp");
    if ggml_trace_sys::LLAMA_TREE_IS_PINNED {
        layout::verify(compiler(Path::new(LLAMA_CPP_DIR)), &source, &file).unwrap();
    }

    // A fork that adds a member after `op` moves op_params and everything after it.
    let tree = scratch_copy(tmp.path());
    let ggml_h = tree.join("ggml/include/ggml.h");
    let text = std::fs::read_to_string(&ggml_h).unwrap();
    let forked = text.replacen(
        "        enum ggml_op op;\n",
        "        enum ggml_op op;\n        int32_t kcm_fork_field;\n",
        1,
    );
    assert_ne!(forked, text);
    std::fs::write(&ggml_h, forked).unwrap();
    let err = layout::verify(compiler(&tree), &source, &file).unwrap_err();
    println!("{err}");
    assert_eq!(err, "ggml_tensor::op_params is not at offset 84");

    // A field the bindings know is gone: the compiler's own first error, on one line.
    let gone = text.replacen("        int32_t flags;\n", "", 1);
    std::fs::write(&ggml_h, gone).unwrap();
    let err = layout::verify(compiler(&tree), &source, &file).unwrap_err();
    println!("{err}");
    assert!(
        err.starts_with("the layout guard does not compile against the tree ("),
        "{err}"
    );
    assert!(err.contains("flags"), "{err}");
    assert!(!err.contains('\n'));
}

/// A tree without the mixed KV cache: `llama_context_params` lacks the patch's three
/// fields. The full guard fails on it; the guard of such builds (`without_mixed_kv`:
/// those fields and the struct's size dropped, nothing else) passes, and still catches a
/// moved field of the same struct.
#[test]
fn without_the_mixed_kv_cache_only_its_fields_are_not_guarded() {
    let all = layout::checks(&committed(), layout::GUARDED);
    let reduced = layout::without_mixed_kv(all.clone());
    let dropped: Vec<&Check> = all.iter().filter(|c| !reduced.contains(c)).collect();
    assert_eq!(
        dropped,
        vec![
            &Check::Size {
                ty: "llama_context_params".into(),
                size: 176
            },
            &Check::Offset {
                ty: "llama_context_params".into(),
                field: "mixed_kv_cache".into(),
                offset: 160
            },
            &Check::Offset {
                ty: "llama_context_params".into(),
                field: "mixed_hot_window".into(),
                offset: 164
            },
            &Check::Offset {
                ty: "llama_context_params".into(),
                field: "mixed_cold_type".into(),
                offset: 168
            },
            &Check::Offset {
                ty: "llama_context_params".into(),
                field: "mixed_swa_type".into(),
                offset: 172
            },
        ]
    );

    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("guard.cpp");
    let tree = scratch_copy(tmp.path());
    let llama_h = tree.join("include/llama.h");
    let text = std::fs::read_to_string(&llama_h).unwrap();
    // The built tree's llama.h without the patch's fields (unchanged if it has none).
    let plain: String = text
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            !(t.starts_with("bool           mixed_kv_cache;")
                || t.starts_with("uint32_t       mixed_hot_window;")
                || t.starts_with("enum ggml_type mixed_cold_type;")
                || t.starts_with("enum ggml_type mixed_swa_type;"))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(!plain.contains("mixed_kv_cache;"), "the fields were found");
    std::fs::write(&llama_h, &plain).unwrap();
    let err = layout::verify(compiler(&tree), &layout::render(&all), &file).unwrap_err();
    println!("full guard: {err}");
    assert!(err.contains("mixed_kv_cache"), "{err}");
    layout::verify(compiler(&tree), &layout::render(&reduced), &file).unwrap();

    // A field before them that moved is still caught.
    let moved = plain.replacen(
        "        uint32_t n_ctx;",
        "        uint32_t kcm_new_field;\n        uint32_t n_ctx;",
        1,
    );
    assert_ne!(moved, plain);
    std::fs::write(&llama_h, moved).unwrap();
    let err = layout::verify(compiler(&tree), &layout::render(&reduced), &file).unwrap_err();
    println!("reduced guard: {err}");
    assert!(err.starts_with("llama_context_params::"), "{err}");
}
