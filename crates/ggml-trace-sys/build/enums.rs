//! The C enum values the Rust side uses by number (op codes, tensor types, flags...),
//! read from the llama.cpp tree being built instead of trusting the committed bindings.
//!
//! A fork that inserts one op before `GGML_OP_FLASH_ATTN_EXT` shifts every later op code;
//! with the committed constants the capture would then take one node for another without
//! any error. So the build script parses the tree's own `enum ggml_op { ... }` (and the
//! other enums in [`ENUMS`]) from its public headers, with a small evaluator for the
//! enumerator expressions (no libclang), and generates constants that shadow the committed
//! ones in `ggml_trace_sys::sys` (src/lib.rs).
//!
//! Also compiled into the crate's integration tests (tests/it/enum_parser.rs), so the
//! parser is unit-tested on synthetic headers.

use std::collections::BTreeMap;

/// The enums whose values the Rust side uses by number, and the public header
/// (relative to the tree) that defines each.
pub const ENUMS: &[(&str, &str)] = &[
    ("ggml_status", "ggml/include/ggml.h"),
    ("ggml_type", "ggml/include/ggml.h"),
    ("ggml_prec", "ggml/include/ggml.h"),
    ("ggml_op_hint", "ggml/include/ggml.h"),
    ("ggml_op", "ggml/include/ggml.h"),
    ("ggml_unary_op", "ggml/include/ggml.h"),
    ("ggml_log_level", "ggml/include/ggml.h"),
    ("ggml_tensor_flag", "ggml/include/ggml.h"),
    ("ggml_backend_buffer_usage", "ggml/include/ggml-backend.h"),
    ("ggml_backend_dev_type", "ggml/include/ggml-backend.h"),
    ("gguf_type", "ggml/include/gguf.h"),
    ("llama_flash_attn_type", "include/llama.h"),
];

/// One enumerator: its C name and value.
pub type Enumerator = (String, i64);

/// `text` without `/* */` and `//` comments and without preprocessor lines.
/// String literals are not special-cased: enum bodies contain none.
pub fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("/*") {
            rest = match after.find("*/") {
                Some(end) => &after[end + 2..],
                None => "",
            };
            out.push(' ');
        } else if let Some(after) = rest.strip_prefix("//") {
            rest = match after.find('\n') {
                Some(end) => &after[end..],
                None => "",
            };
        } else {
            let c = rest.chars().next().expect("rest is not empty");
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The enumerators of `enum NAME { ... }` in `header` (C source), in order, with their
/// values; `Ok(None)` when the header has no such definition.
pub fn parse_enum(header: &str, name: &str) -> Result<Option<Vec<Enumerator>>, String> {
    let text = strip_comments(header);
    let needle = format!("enum {name}");
    let mut from = 0;
    let body = loop {
        let Some(pos) = text[from..].find(&needle) else {
            return Ok(None);
        };
        let start = from + pos;
        let after = &text[start + needle.len()..];
        from = start + needle.len();
        let before_ok = text[..start]
            .chars()
            .next_back()
            .is_none_or(|c| !is_ident_char(c));
        let after_ok = after.chars().next().is_some_and(|c| !is_ident_char(c));
        if !(before_ok && after_ok && after.trim_start().starts_with('{')) {
            continue; // a use (`enum ggml_type type`), or a longer name
        }
        let open = after.find('{').expect("starts with {");
        let Some(close) = after[open..].find('}') else {
            return Err(format!("enum {name} has no closing brace"));
        };
        break after[open + 1..open + close].to_string();
    };

    let mut values: Vec<Enumerator> = Vec::new();
    let mut next = 0i64;
    for item in body.split(',') {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let (ident, expr) = match item.split_once('=') {
            Some((i, e)) => (i.trim(), Some(e.trim())),
            None => (item, None),
        };
        if ident.is_empty() || !ident.chars().all(is_ident_char) {
            return Err(format!("enum {name}: cannot read the enumerator `{item}`"));
        }
        let value = match expr {
            Some(e) => eval(e, &values)
                .map_err(|why| format!("enum {name}: cannot evaluate `{ident} = {e}`: {why}"))?,
            None => next,
        };
        next = value.wrapping_add(1);
        values.push((ident.to_string(), value));
    }
    if values.is_empty() {
        return Err(format!("enum {name} has no enumerators"));
    }
    Ok(Some(values))
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(i64),
    Ident(String),
    Op(&'static str),
}

fn tokenize(expr: &str) -> Result<Vec<Tok>, String> {
    let mut toks = Vec::new();
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit() {
            let start = i;
            while i < chars.len() && is_ident_char(chars[i]) {
                i += 1;
            }
            let lit: String = chars[start..i].iter().collect();
            let digits = lit.trim_end_matches(['u', 'U', 'l', 'L']);
            let parsed = if let Some(hex) = digits
                .strip_prefix("0x")
                .or_else(|| digits.strip_prefix("0X"))
            {
                i64::from_str_radix(hex, 16)
            } else if digits.len() > 1 && digits.starts_with('0') {
                i64::from_str_radix(&digits[1..], 8)
            } else {
                digits.parse::<i64>()
            };
            toks.push(Tok::Num(
                parsed.map_err(|_| format!("bad integer literal `{lit}`"))?,
            ));
        } else if is_ident_char(c) {
            let start = i;
            while i < chars.len() && is_ident_char(chars[i]) {
                i += 1;
            }
            toks.push(Tok::Ident(chars[start..i].iter().collect()));
        } else {
            let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
            let op = match (two.as_str(), c) {
                ("<<", _) => "<<",
                (">>", _) => ">>",
                (_, '|') => "|",
                (_, '&') => "&",
                (_, '+') => "+",
                (_, '-') => "-",
                (_, '~') => "~",
                (_, '(') => "(",
                (_, ')') => ")",
                _ => return Err(format!("unexpected `{c}`")),
            };
            i += op.len();
            toks.push(Tok::Op(op));
        }
    }
    Ok(toks)
}

/// Evaluates a C constant expression of integer literals, earlier enumerators of the
/// same enum, parentheses, unary `-`/`~`, and binary `+ - << >> & |` (C precedence).
pub fn eval(expr: &str, known: &[Enumerator]) -> Result<i64, String> {
    let toks = tokenize(expr)?;
    let mut p = Parser {
        toks: &toks,
        pos: 0,
        known,
    };
    let v = p.or()?;
    if p.pos != toks.len() {
        return Err(format!("unexpected {:?}", toks[p.pos]));
    }
    Ok(v)
}

struct Parser<'a> {
    toks: &'a [Tok],
    pos: usize,
    known: &'a [Enumerator],
}

impl Parser<'_> {
    fn eat(&mut self, op: &str) -> bool {
        if matches!(self.toks.get(self.pos), Some(Tok::Op(o)) if *o == op) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn or(&mut self) -> Result<i64, String> {
        let mut v = self.and()?;
        while self.eat("|") {
            v |= self.and()?;
        }
        Ok(v)
    }

    fn and(&mut self) -> Result<i64, String> {
        let mut v = self.shift()?;
        while self.eat("&") {
            v &= self.shift()?;
        }
        Ok(v)
    }

    fn shift(&mut self) -> Result<i64, String> {
        let mut v = self.add()?;
        loop {
            if self.eat("<<") {
                let s = self.add()?;
                v = v
                    .checked_shl(u32::try_from(s).map_err(|_| "bad shift")?)
                    .ok_or("shift overflow")?;
            } else if self.eat(">>") {
                let s = self.add()?;
                v = v
                    .checked_shr(u32::try_from(s).map_err(|_| "bad shift")?)
                    .ok_or("shift overflow")?;
            } else {
                return Ok(v);
            }
        }
    }

    fn add(&mut self) -> Result<i64, String> {
        let mut v = self.unary()?;
        loop {
            if self.eat("+") {
                v = v.checked_add(self.unary()?).ok_or("overflow")?;
            } else if self.eat("-") {
                v = v.checked_sub(self.unary()?).ok_or("overflow")?;
            } else {
                return Ok(v);
            }
        }
    }

    fn unary(&mut self) -> Result<i64, String> {
        if self.eat("-") {
            return Ok(-self.unary()?);
        }
        if self.eat("~") {
            return Ok(!self.unary()?);
        }
        if self.eat("(") {
            let v = self.or()?;
            if !self.eat(")") {
                return Err("missing `)`".into());
            }
            return Ok(v);
        }
        match self.toks.get(self.pos) {
            Some(Tok::Num(n)) => {
                self.pos += 1;
                Ok(*n)
            }
            Some(Tok::Ident(id)) => {
                self.pos += 1;
                self.known
                    .iter()
                    .find(|(name, _)| name == id)
                    .map(|(_, v)| *v)
                    .ok_or_else(|| format!("unknown name `{id}`"))
            }
            Some(t) => Err(format!("unexpected {t:?}")),
            None => Err("unexpected end".into()),
        }
    }
}

/// `pub const NAME: TYPE = VALUE;` lines of the committed bindings, for the enum types in
/// `types`: enum type -> (enumerator -> value).
pub fn committed_values(sys_rs: &str, types: &[&str]) -> BTreeMap<String, BTreeMap<String, i64>> {
    let mut out: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for line in sys_rs.lines() {
        let Some(rest) = line.trim().strip_prefix("pub const ") else {
            continue;
        };
        let Some((name, rest)) = rest.split_once(':') else {
            continue;
        };
        let Some((ty, value)) = rest.split_once('=') else {
            continue;
        };
        let ty = ty.trim();
        if !types.contains(&ty) {
            continue;
        }
        let Ok(value) = value.trim().trim_end_matches(';').trim().parse::<i64>() else {
            continue;
        };
        out.entry(ty.to_string())
            .or_default()
            .insert(name.trim().to_string(), value);
    }
    out
}

/// `pub type NAME = ::std::os::raw::c_uint;` -> whether enum NAME is unsigned in the
/// committed bindings (bindgen picks `c_uint` for enums without negative values).
pub fn committed_is_unsigned(sys_rs: &str, ty: &str) -> bool {
    let prefix = format!("pub type {ty} = ");
    sys_rs
        .lines()
        .find_map(|l| l.trim().strip_prefix(&prefix))
        .is_some_and(|rest| rest.contains("c_uint"))
}

/// What the generator found: the Rust source with the constants, and the differences to
/// the committed bindings (for the build script's report).
pub struct Rendered {
    pub rust: String,
    /// Enumerators whose value in the tree differs from the committed one:
    /// (name, committed, tree).
    pub changed: Vec<(String, i64, i64)>,
    /// Enumerators of the committed bindings that the tree does not have.
    pub missing: Vec<String>,
    /// Names present in both (for the test that compares the two sets).
    pub common: Vec<String>,
}

/// Rust source defining every enumerator of `tree_enums` as a constant of the bindings'
/// enum type. Committed enumerators the tree lacks get the type's maximum, a value no
/// tensor field holds, so code comparing against them never matches.
pub fn render(tree_enums: &[(String, Vec<Enumerator>)], sys_rs: &str) -> Result<Rendered, String> {
    let types: Vec<&str> = tree_enums.iter().map(|(t, _)| t.as_str()).collect();
    let committed = committed_values(sys_rs, &types);
    let mut rust = String::from(
        "// @generated by crates/ggml-trace-sys/build.rs (build/enums.rs) from the llama.cpp\n\
         // tree being built. Shadows the committed constants in `sys`.\n",
    );
    let mut changed = Vec::new();
    let mut missing = Vec::new();
    let mut common = Vec::new();
    for (ty, values) in tree_enums {
        let unsigned = committed_is_unsigned(sys_rs, ty);
        let old = committed.get(ty.as_str());
        for (name, value) in values {
            if unsigned && *value < 0 {
                return Err(format!(
                    "{name} = {value} in the tree, but enum {ty} is unsigned in the committed bindings"
                ));
            }
            rust.push_str(&format!("pub const {name}: {ty} = {value};\n"));
            if let Some(&was) = old.and_then(|m| m.get(name)) {
                common.push(name.clone());
                if was != *value {
                    changed.push((name.clone(), was, *value));
                }
            }
        }
        for name in old.into_iter().flat_map(|m| m.keys()) {
            if !values.iter().any(|(n, _)| n == name) {
                rust.push_str(&format!(
                    "/// Not in the llama.cpp tree being built: never matches.\npub const {name}: {ty} = {ty}::MAX;\n"
                ));
                missing.push(name.clone());
            }
        }
    }
    Ok(Rendered {
        rust,
        changed,
        missing,
        common,
    })
}
