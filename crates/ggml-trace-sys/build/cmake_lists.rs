//! Reads the source lists out of a llama.cpp tree's CMake files (issue 18: nothing
//! version-specific is silently assumed; a fork that adds a source file lists it there).
//!
//! This is not a CMake interpreter. It reads the commands that build source lists —
//! `set`, `list(APPEND ...)`, `file(GLOB ...)`, `include`, `add_library`,
//! `target_sources` and ggml's `ggml_add_backend_library` — in file order, expands
//! `${VAR}` references to what it has seen, and takes EVERY branch of `if`/`else`
//! (a list is the union over all configurations). Callers (build/sources.rs) then drop
//! what does not belong to this build (other CPUs' kernels, optional features) by an
//! explicit exclusion list. An argument that refers to a variable it does not know
//! (`${CMAKE_CURRENT_BINARY_DIR}/build-info.cpp`, a generator expression) is left out
//! and counted in [`Lists::unresolved`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One command invocation: its name (lower case: CMake command names are
/// case-insensitive) and its arguments, quotes removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub name: String,
    pub args: Vec<String>,
    /// 1-based line of the command name.
    pub line: usize,
}

/// Splits CMake source text into commands. Comments (`# ...`, `#[[ ... ]]`) are
/// skipped; quoted (`"..."`) and bracket (`[[...]]`, `[=[...]=]`) arguments are kept
/// whole; parentheses nested inside an argument list (`if((A) AND B)`) are kept as
/// arguments of their own.
pub fn parse(text: &str) -> Result<Vec<Command>, String> {
    let mut p = Parser {
        chars: text.chars().collect(),
        pos: 0,
        line: 1,
    };
    let mut commands = Vec::new();
    loop {
        p.skip_space_and_comments()?;
        let Some(c) = p.peek() else { break };
        if !(c.is_ascii_alphabetic() || c == '_') {
            return Err(format!("line {}: unexpected `{c}`", p.line));
        }
        let line = p.line;
        let mut name = String::new();
        while let Some(c) = p.peek().filter(|c| c.is_ascii_alphanumeric() || *c == '_') {
            name.push(c);
            p.bump();
        }
        while p.peek().is_some_and(|c| c == ' ' || c == '\t') {
            p.bump();
        }
        if p.peek() != Some('(') {
            return Err(format!("line {line}: `{name}` is not followed by `(`"));
        }
        p.bump();
        let args = p.arguments(line)?;
        commands.push(Command {
            name: name.to_ascii_lowercase(),
            args,
            line,
        });
    }
    Ok(commands)
}

struct Parser {
    chars: Vec<char>,
    pos: usize,
    line: usize,
}

impl Parser {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn peek_at(&self, ahead: usize) -> Option<char> {
        self.chars.get(self.pos + ahead).copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += 1;
        if c == '\n' {
            self.line += 1;
        }
        Some(c)
    }

    fn skip_space_and_comments(&mut self) -> Result<(), String> {
        while let Some(c) = self.peek() {
            if c.is_whitespace() {
                self.bump();
            } else if c == '#' {
                self.comment()?;
            } else {
                break;
            }
        }
        Ok(())
    }

    /// At `#`: a bracket comment (`#[[...]]`, `#[==[...]==]`) or a line comment.
    fn comment(&mut self) -> Result<(), String> {
        self.bump();
        if let Some(level) = self.bracket_level() {
            self.open_bracket(level);
            self.bracket_body(level)?;
            return Ok(());
        }
        while self.peek().is_some_and(|c| c != '\n') {
            self.bump();
        }
        Ok(())
    }

    /// The number of `=` of a bracket opening `[=*[` at the current position, or None
    /// when there is none there. Consumes nothing.
    fn bracket_level(&self) -> Option<usize> {
        if self.peek() != Some('[') {
            return None;
        }
        let mut n = 1;
        while self.peek_at(n) == Some('=') {
            n += 1;
        }
        (self.peek_at(n) == Some('[')).then_some(n - 1)
    }

    /// Consumes a bracket opening of `level`.
    fn open_bracket(&mut self, level: usize) {
        for _ in 0..level + 2 {
            self.bump();
        }
    }

    /// After a bracket opening of `level`: everything up to the matching `]=*]`.
    fn bracket_body(&mut self, level: usize) -> Result<String, String> {
        let start = self.line;
        let mut body = String::new();
        loop {
            let Some(c) = self.bump() else {
                return Err(format!("line {start}: unterminated bracket"));
            };
            if c == ']' {
                let closes = (0..level).all(|i| self.peek_at(i) == Some('='))
                    && self.peek_at(level) == Some(']');
                if closes {
                    for _ in 0..=level {
                        self.bump();
                    }
                    return Ok(body);
                }
            }
            body.push(c);
        }
    }

    /// After the opening `(` of a command: its arguments up to the matching `)`.
    fn arguments(&mut self, line: usize) -> Result<Vec<String>, String> {
        let mut args = Vec::new();
        let mut depth = 0usize;
        loop {
            self.skip_space_and_comments()?;
            let Some(c) = self.peek() else {
                return Err(format!("line {line}: unterminated argument list"));
            };
            match c {
                ')' => {
                    self.bump();
                    if depth == 0 {
                        return Ok(args);
                    }
                    depth -= 1;
                    args.push(")".into());
                }
                '(' => {
                    self.bump();
                    depth += 1;
                    args.push("(".into());
                }
                '"' => {
                    self.bump();
                    args.push(self.quoted(line)?);
                }
                '[' if self.bracket_level().is_some() => {
                    let level = self.bracket_level().unwrap_or(0);
                    self.open_bracket(level);
                    args.push(self.bracket_body(level)?);
                }
                _ => args.push(self.unquoted()),
            }
        }
    }

    /// After an opening `"`: the argument up to the closing one (`\"`, `\\` and `\n`
    /// escapes; a backslash before a newline continues the line).
    fn quoted(&mut self, line: usize) -> Result<String, String> {
        let mut s = String::new();
        loop {
            match self.bump() {
                None => return Err(format!("line {line}: unterminated quoted argument")),
                Some('"') => return Ok(s),
                Some('\\') => match self.bump() {
                    Some('n') => s.push('\n'),
                    Some('t') => s.push('\t'),
                    Some('\n') => {}
                    Some(other) => s.push(other),
                    None => return Err(format!("line {line}: unterminated quoted argument")),
                },
                Some(c) => s.push(c),
            }
        }
    }

    /// An unquoted argument: up to whitespace, a parenthesis or a comment. Quotes
    /// inside (`-DX="y"`) are kept as they are.
    fn unquoted(&mut self) -> String {
        let mut s = String::new();
        while let Some(c) = self.peek() {
            if c.is_whitespace() || c == '(' || c == ')' || c == '#' {
                break;
            }
            s.push(c);
            self.bump();
        }
        s
    }
}

/// What reading one or more CMake files produced.
#[derive(Debug, Default)]
pub struct Lists {
    /// Variables, as lists (`set(A x y)` is `[x, y]`).
    pub vars: HashMap<String, Vec<String>>,
    /// Targets' sources, by target name, resolved against the directory they were
    /// declared in (`add_library`, `target_sources`, `ggml_add_backend_library`).
    pub targets: HashMap<String, Vec<PathBuf>>,
    /// Arguments left out because they refer to a variable never set in the files read.
    pub unresolved: Vec<String>,
}

impl Lists {
    /// The paths in variable `name`, resolved against `base`.
    pub fn var_paths(&self, name: &str, base: &Path) -> Option<Vec<PathBuf>> {
        self.vars
            .get(name)
            .map(|items| items.iter().map(|i| base.join(i)).collect())
    }
}

/// The deepest `include()` chain followed (CMake files do not include themselves in
/// practice; this bounds a hostile or broken tree).
const MAX_INCLUDE_DEPTH: usize = 8;

/// Reads `file` as if it were the CMake file of directory `base` (relative source
/// paths are resolved against `base`; `${CMAKE_CURRENT_LIST_DIR}` is `file`'s
/// directory). `include(x)` is followed, relative to `base`.
pub fn read(file: &Path, base: &Path) -> Result<Lists, String> {
    let mut lists = Lists::default();
    read_into(&mut lists, file, base, 0)?;
    Ok(lists)
}

fn read_into(lists: &mut Lists, file: &Path, base: &Path, depth: usize) -> Result<(), String> {
    if depth > MAX_INCLUDE_DEPTH {
        return Err(format!("{}: include() nested too deeply", file.display()));
    }
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let commands = parse(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    let list_dir = file.parent().unwrap_or(base).to_path_buf();
    lists.vars.insert(
        "CMAKE_CURRENT_LIST_DIR".into(),
        vec![list_dir.display().to_string()],
    );
    lists.vars.insert(
        "CMAKE_CURRENT_SOURCE_DIR".into(),
        vec![base.display().to_string()],
    );
    for cmd in &commands {
        let args = expand_all(lists, &cmd.args);
        match cmd.name.as_str() {
            "set" => {
                let Some((name, values)) = args.split_first() else {
                    continue;
                };
                let end = values
                    .iter()
                    .position(|v| v == "CACHE" || v == "PARENT_SCOPE")
                    .unwrap_or(values.len());
                lists.vars.insert(name.clone(), values[..end].to_vec());
            }
            "list" => {
                if let [op, name, values @ ..] = args.as_slice() {
                    if op == "APPEND" {
                        lists
                            .vars
                            .entry(name.clone())
                            .or_default()
                            .extend(values.iter().cloned());
                    }
                }
            }
            "file" => {
                if let [op, name, patterns @ ..] = args.as_slice() {
                    if op == "GLOB" {
                        let mut found = Vec::new();
                        for pattern in patterns.iter().filter(|p| *p != "CONFIGURE_DEPENDS") {
                            found.extend(glob(base, pattern));
                        }
                        lists.vars.insert(name.clone(), found);
                    }
                }
            }
            "include" => {
                if let Some(name) = args.first() {
                    let path = base.join(name);
                    if path.extension().is_some_and(|e| e == "cmake" || e == "txt")
                        && path.is_file()
                    {
                        read_into(lists, &path, base, depth + 1)?;
                        // Back in this file.
                        lists.vars.insert(
                            "CMAKE_CURRENT_LIST_DIR".into(),
                            vec![list_dir.display().to_string()],
                        );
                    }
                }
            }
            "add_library" | "target_sources" | "ggml_add_backend_library" => {
                let Some((target, items)) = args.split_first() else {
                    continue;
                };
                if items
                    .first()
                    .is_some_and(|i| i == "ALIAS" || i == "IMPORTED")
                {
                    continue;
                }
                let sources = items
                    .iter()
                    .filter(|i| !TARGET_KEYWORDS.contains(&i.as_str()))
                    .map(|i| base.join(i));
                lists
                    .targets
                    .entry(target.clone())
                    .or_default()
                    .extend(sources);
            }
            _ => {}
        }
    }
    Ok(())
}

/// Keywords of `add_library` and `target_sources` that are not sources.
const TARGET_KEYWORDS: &[&str] = &[
    "STATIC",
    "SHARED",
    "MODULE",
    "OBJECT",
    "INTERFACE",
    "EXCLUDE_FROM_ALL",
    "PRIVATE",
    "PUBLIC",
];

/// Expands every argument; a `${VAR}` that is a list splices its items, an argument
/// naming an unknown variable (or a generator expression `$<...>`) is dropped.
fn expand_all(lists: &mut Lists, args: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for arg in args {
        match expand(&lists.vars, arg) {
            Some(text) => out.extend(
                text.split(';')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
            ),
            None => lists.unresolved.push(arg.clone()),
        }
    }
    out
}

/// `arg` with every `${NAME}` replaced by the variable's items joined with `;`, or
/// None when a name is unknown or the argument holds a generator expression.
fn expand(vars: &HashMap<String, Vec<String>>, arg: &str) -> Option<String> {
    if arg.contains("$<") {
        return None;
    }
    let mut out = String::new();
    let mut rest = arg;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}')?;
        let name = &after[..end];
        if name.contains("${") {
            return None;
        }
        out.push_str(&vars.get(name)?.join(";"));
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Some(out)
}

/// `file(GLOB)` for the patterns llama.cpp uses: `dir/*.ext` or `*.ext` (a `*` in the
/// last component only), relative to `base` or absolute. Sorted, as paths relative
/// to `base` when the pattern was relative.
fn glob(base: &Path, pattern: &str) -> Vec<String> {
    let (dir, name) = match pattern.rsplit_once('/') {
        Some((d, n)) => (d, n),
        None => ("", pattern),
    };
    if dir.contains('*') {
        return Vec::new();
    }
    let Some((prefix, suffix)) = name.split_once('*') else {
        return Vec::new();
    };
    if suffix.contains('*') {
        return Vec::new();
    }
    let full = base.join(dir);
    let Ok(entries) = std::fs::read_dir(&full) else {
        return Vec::new();
    };
    let mut found: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.len() >= prefix.len() + suffix.len())
        .filter(|n| n.starts_with(prefix) && n.ends_with(suffix))
        .map(|n| {
            if dir.is_empty() {
                n
            } else {
                format!("{dir}/{n}")
            }
        })
        .collect();
    found.sort();
    found
}

/// CMake's `configure_file(... @ONLY)`: `@NAME@` (NAME of letters, digits and `_`)
/// replaced from `vars`; also returns the names it had no value for.
pub fn substitute(template: &str, vars: &[(&str, &str)]) -> (String, Vec<String>) {
    let mut out = String::with_capacity(template.len());
    let mut unknown = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find('@') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let name_len = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        if name_len > 0 && after[name_len..].starts_with('@') {
            let name = &after[..name_len];
            match vars.iter().find(|(n, _)| *n == name) {
                Some((_, value)) => out.push_str(value),
                None => unknown.push(name.to_string()),
            }
            rest = &after[name_len + 1..];
        } else {
            out.push('@');
            rest = after;
        }
    }
    out.push_str(rest);
    (out, unknown)
}
