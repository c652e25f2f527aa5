//! The enum constants generated from the tree's headers (build/enums.rs): equal to the
//! committed bindings on the pinned tree, and the parser itself on synthetic headers,
//! including the pinned ggml.h with an op inserted before GGML_OP_FLASH_ATTN_EXT.

#[allow(dead_code)]
#[path = "../../build/enums.rs"]
mod enums;

use ggml_trace_sys::{committed, sys, ENUMS_TREE_VS_COMMITTED, LLAMA_ORIGIN, LLAMA_TREE_IS_PINNED};

#[test]
fn generated_enum_values_equal_the_committed_bindings_on_the_pinned_tree() {
    if !LLAMA_TREE_IS_PINNED {
        println!(
            "skipped: built against {LLAMA_ORIGIN} ({}), not the pinned tree whose values the committed bindings hold",
            ggml_trace_sys::LLAMA_CPP_DIR
        );
        return;
    }
    let differ: Vec<_> = ENUMS_TREE_VS_COMMITTED
        .iter()
        .filter(|(_, tree, committed)| tree != committed)
        .collect();
    assert!(differ.is_empty(), "{differ:?}");
    // Every enumerator of every generated enum is compared: ggml_op alone has 97.
    println!("{} enum constants compared", ENUMS_TREE_VS_COMMITTED.len());
    assert!(ENUMS_TREE_VS_COMMITTED.len() > 200);
    for name in [
        "GGML_OP_FLASH_ATTN_EXT",
        "GGML_OP_COUNT",
        "GGML_TYPE_COUNT",
        "GGML_OP_SET_ROWS",
    ] {
        assert!(
            ENUMS_TREE_VS_COMMITTED.iter().any(|(n, _, _)| *n == name),
            "{name} not compared"
        );
    }
    assert_eq!(sys::GGML_OP_FLASH_ATTN_EXT, 74);
    assert_eq!(
        sys::GGML_OP_FLASH_ATTN_EXT,
        committed::GGML_OP_FLASH_ATTN_EXT
    );
    assert_eq!(sys::GGML_TYPE_Q8_0, 8);
    assert_eq!(sys::GGML_STATUS_ALLOC_FAILED, -2);
    assert_eq!(sys::LLAMA_FLASH_ATTN_TYPE_AUTO, -1);
}

#[test]
fn parser_reads_a_synthetic_header_with_an_inserted_op() {
    let header = r#"
        #pragma once
        GGML_API enum ggml_op ggml_some_fn(enum ggml_op op); // a use, not the definition
        enum ggml_op_pool { GGML_OP_POOL_MAX, GGML_OP_POOL_AVG };
        enum ggml_op {
            GGML_OP_NONE = 0,
            GGML_OP_DUP,     /* a comment, with a comma */
            GGML_OP_ADD,
        #ifdef SOMETHING
        #endif
            GGML_OP_MY_FORK_OP, // inserted by a fork
            GGML_OP_FLASH_ATTN_EXT,
            GGML_OP_COUNT,
        };
    "#;
    let ops = enums::parse_enum(header, "ggml_op").unwrap().unwrap();
    let expect = [
        ("GGML_OP_NONE", 0),
        ("GGML_OP_DUP", 1),
        ("GGML_OP_ADD", 2),
        ("GGML_OP_MY_FORK_OP", 3),
        ("GGML_OP_FLASH_ATTN_EXT", 4),
        ("GGML_OP_COUNT", 5),
    ];
    let got: Vec<(&str, i64)> = ops.iter().map(|(n, v)| (n.as_str(), *v)).collect();
    assert_eq!(got, expect);
    assert_eq!(enums::parse_enum(header, "ggml_type").unwrap(), None);
}

#[test]
fn parser_on_the_pinned_ggml_h_with_an_op_inserted_before_flash_attn_ext() {
    let path = format!("{}/ggml/include/ggml.h", ggml_trace_sys::LLAMA_CPP_DIR);
    let header = std::fs::read_to_string(&path).unwrap();
    let plain = enums::parse_enum(&header, "ggml_op").unwrap().unwrap();
    let value = |ops: &[(String, i64)], name: &str| {
        ops.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .unwrap()
    };
    // Independent oracle: the committed bindings (bindgen/libclang on the pinned tree).
    if LLAMA_TREE_IS_PINNED {
        assert_eq!(plain.len() as i64, i64::from(committed::GGML_OP_COUNT) + 1);
        for (name, v) in &plain {
            let pair = ENUMS_TREE_VS_COMMITTED
                .iter()
                .find(|(n, _, _)| n == name)
                .unwrap();
            assert_eq!(*v, pair.2, "{name}");
        }
    }
    let fa = value(&plain, "GGML_OP_FLASH_ATTN_EXT");
    let forked = header.replacen(
        "GGML_OP_FLASH_ATTN_EXT,",
        "GGML_OP_KCM_FORK_OP,\n        GGML_OP_FLASH_ATTN_EXT,",
        1,
    );
    assert_ne!(
        forked, header,
        "GGML_OP_FLASH_ATTN_EXT, not found in {path}"
    );
    let ops = enums::parse_enum(&forked, "ggml_op").unwrap().unwrap();
    assert_eq!(ops.len(), plain.len() + 1);
    assert_eq!(value(&ops, "GGML_OP_KCM_FORK_OP"), fa);
    assert_eq!(value(&ops, "GGML_OP_FLASH_ATTN_EXT"), fa + 1);
    assert_eq!(
        value(&ops, "GGML_OP_COUNT"),
        value(&plain, "GGML_OP_COUNT") + 1
    );
    for (name, v) in &plain {
        let now = value(&ops, name);
        assert_eq!(now, if *v < fa { *v } else { v + 1 }, "{name}");
    }
}

#[test]
fn evaluator_handles_c_constant_expressions() {
    let known = vec![("A".to_string(), 4), ("B".to_string(), 1)];
    for (expr, want) in [
        ("0x10", 16),
        ("-2", -2),
        ("(1 << 3) | 1", 9),
        ("1 << 2 + 1", 8), // + binds tighter than <<
        ("A + B", 5),
        ("A | B << 4", 20),
        ("~0 & 0xff", 255),
        ("1024u", 1024),
        ("010", 8),
    ] {
        assert_eq!(enums::eval(expr, &known), Ok(want), "{expr}");
    }
    assert!(enums::eval("C + 1", &known).is_err());
    assert!(enums::eval("1 +", &known).is_err());
    assert!(enums::eval("sizeof(int)", &known).is_err());
    let bad = "enum e { X = sizeof(int), };";
    let err = enums::parse_enum(bad, "e").unwrap_err();
    assert!(err.contains("X = sizeof(int)"), "{err}");
}

#[test]
fn render_reports_changed_and_missing_enumerators() {
    let sys_rs = "pub const GGML_OP_NONE: ggml_op = 0;\n\
                  pub const GGML_OP_GONE: ggml_op = 1;\n\
                  pub const GGML_OP_FLASH_ATTN_EXT: ggml_op = 2;\n\
                  pub type ggml_op = ::std::os::raw::c_uint;\n";
    let tree = vec![(
        "ggml_op".to_string(),
        vec![
            ("GGML_OP_NONE".to_string(), 0),
            ("GGML_OP_NEW".to_string(), 1),
            ("GGML_OP_FLASH_ATTN_EXT".to_string(), 2 + 1),
        ],
    )];
    let r = enums::render(&tree, sys_rs).unwrap();
    assert_eq!(
        r.changed,
        vec![("GGML_OP_FLASH_ATTN_EXT".to_string(), 2, 3)]
    );
    assert_eq!(r.missing, vec!["GGML_OP_GONE".to_string()]);
    assert_eq!(
        r.common,
        vec![
            "GGML_OP_NONE".to_string(),
            "GGML_OP_FLASH_ATTN_EXT".to_string()
        ]
    );
    assert!(
        r.rust
            .contains("pub const GGML_OP_FLASH_ATTN_EXT: ggml_op = 3;"),
        "{}",
        r.rust
    );
    assert!(
        r.rust
            .contains("pub const GGML_OP_GONE: ggml_op = ggml_op::MAX;"),
        "{}",
        r.rust
    );
    // An unsigned enum in the bindings cannot take a negative value from the tree.
    let neg = vec![(
        "ggml_op".to_string(),
        vec![("GGML_OP_NONE".to_string(), -1)],
    )];
    assert!(enums::render(&neg, sys_rs).is_err());
}

/// ggml's own name table of the tree built (`ggml_op_name`, compiled from its ggml.c) as
/// the oracle: every generated `GGML_OP_X` names op `X`. On a tree whose op numbers moved
/// (`cargo xtask test-trees`, the fork), the committed constants name other ops: what the
/// capture would have misread without the generated ones.
#[test]
fn generated_op_codes_name_the_same_op_in_the_tree_built() {
    let name = |op: sys::ggml_op| {
        // SAFETY: ggml_op_name indexes a static table; every op below is < GGML_OP_COUNT
        // of the tree built (checked first).
        let p = unsafe { sys::ggml_op_name(op) };
        // SAFETY: a NUL-terminated string in static storage.
        unsafe { std::ffi::CStr::from_ptr(p) }
            .to_string_lossy()
            .into_owned()
    };
    let ops: Vec<(&str, i64, i64)> = ENUMS_TREE_VS_COMMITTED
        .iter()
        .copied()
        .filter(|(n, _, _)| n.starts_with("GGML_OP_") && *n != "GGML_OP_COUNT")
        .filter(|(n, _, _)| !n.starts_with("GGML_OP_POOL_"))
        .collect();
    assert!(ops.len() > 90, "{}", ops.len());
    let mut misread = Vec::new();
    for (full, tree, committed) in &ops {
        assert!(*tree < i64::from(sys::GGML_OP_COUNT), "{full}");
        let short = full.trim_start_matches("GGML_OP_");
        assert_eq!(name(*tree as sys::ggml_op), short, "{full} = {tree}");
        if committed != tree && *committed < i64::from(sys::GGML_OP_COUNT) {
            misread.push(format!(
                "{full} ({committed}) is {} here",
                name(*committed as sys::ggml_op)
            ));
        }
    }
    println!("{} op codes checked against ggml_op_name", ops.len());
    if LLAMA_TREE_IS_PINNED {
        assert!(misread.is_empty(), "{misread:?}");
    } else {
        println!(
            "with the committed op codes, {} ops would be misread on {LLAMA_ORIGIN}: {}",
            misread.len(),
            misread
                .iter()
                .take(3)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
}
