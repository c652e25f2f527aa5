//! SIMD flags for ggml-cpu, chosen for the machine that runs the build.
//!
//! build.rs runs on the host and we never cross-compile, so the host's CPU is
//! the target CPU. Features are read from /proc/cpuinfo (falling back to
//! `is_x86_feature_detected!` for the basic ones) and turned into explicit
//! `-m` flags plus the `GGML_*` defines cmake's non-native x86 path sets
//! (ggml/src/ggml-cpu/CMakeLists.txt). Only ggml-cpu gets these flags, as with
//! cmake; ggml-base, llama and common are compiled for the baseline x86-64.
//!
//! AMX is never enabled. On the machines this project was measured on,
//! `-march=native` turns on AMX (amx_tile, amx_int8, amx_bf16), and
//! upstream's AMX path then segfaults in `ggml_backend_amx_mul_mat` on Q4_K
//! models (llama.cpp issue #20824). So: no `-march=native`, an explicit list
//! of `-m` flags without AMX, `-mno-amx-*` appended last (so an override
//! containing `-march=native` is safe too), and the ggml-cpu/amx/ sources are
//! not compiled (build/sources.rs).
//!
//! Override: `KCM_CPU_FLAGS="-mavx2 -mfma -mf16c"` replaces the detected
//! flags (whitespace-separated compiler flags). The matching GGML_* defines
//! are derived from the `-m` flags it contains.

use std::collections::BTreeSet;

pub const OVERRIDE_ENV: &str = "KCM_CPU_FLAGS";

/// (cpuinfo flag(s) that must all be present, compiler flags, ggml define)
const X86_FEATURES: &[(&[&str], &[&str], &str)] = &[
    (&["sse4_2"], &["-msse4.2"], "GGML_SSE42"),
    (&["f16c"], &["-mf16c"], "GGML_F16C"),
    (&["fma"], &["-mfma"], "GGML_FMA"),
    (&["bmi2"], &["-mbmi2"], "GGML_BMI2"),
    (&["avx"], &["-mavx"], "GGML_AVX"),
    (&["avx2"], &["-mavx2"], "GGML_AVX2"),
    (&["avx_vnni"], &["-mavxvnni"], "GGML_AVX_VNNI"),
    // cmake's GGML_AVX512 means all five of these together.
    (
        &["avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"],
        &[
            "-mavx512f",
            "-mavx512cd",
            "-mavx512vl",
            "-mavx512dq",
            "-mavx512bw",
        ],
        "GGML_AVX512",
    ),
    (&["avx512vbmi"], &["-mavx512vbmi"], "GGML_AVX512_VBMI"),
    (&["avx512_vnni"], &["-mavx512vnni"], "GGML_AVX512_VNNI"),
    (&["avx512_bf16"], &["-mavx512bf16"], "GGML_AVX512_BF16"),
];

/// Appended after every other flag; see the module comment.
const NO_AMX: &[&str] = &["-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"];

#[derive(Debug, Clone)]
pub struct CpuFlags {
    /// `x86` or `generic` (selects ggml-cpu/arch/ sources).
    pub arch: Arch,
    /// Compiler flags, without the trailing `no_amx`.
    pub flags: Vec<String>,
    /// The `NO_AMX` flags this compiler accepts; they go after `flags`.
    pub no_amx: Vec<String>,
    /// GGML_* defines (only informational for a static build: ggml reads the
    /// compiler's __AVX2__ etc.; cmake sets them, so we do too).
    pub defines: Vec<&'static str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    X86,
    Generic,
}

impl CpuFlags {
    pub fn for_host() -> CpuFlags {
        if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() != Ok("x86_64") {
            // Untested: no SIMD-specific sources, ggml's scalar fallbacks.
            return CpuFlags {
                arch: Arch::Generic,
                flags: Vec::new(),
                no_amx: Vec::new(),
                defines: vec!["GGML_CPU_GENERIC"],
            };
        }
        let flags = match std::env::var(OVERRIDE_ENV) {
            Ok(text) if !text.trim().is_empty() => {
                text.split_whitespace().map(str::to_string).collect()
            }
            _ => detected_x86_flags(&host_x86_features()),
        };
        let defines = X86_FEATURES
            .iter()
            .filter(|(_, fl, _)| fl.iter().all(|f| flags.iter().any(|g| g == f)))
            .map(|(_, _, define)| *define)
            .collect();
        CpuFlags {
            arch: Arch::X86,
            flags,
            no_amx: supported_no_amx_flags(),
            defines,
        }
    }
}

/// Older compilers do not know `-mno-amx-*`; they cannot emit AMX either.
fn supported_no_amx_flags() -> Vec<String> {
    let mut probe = cc::Build::new();
    probe.cpp(true).cargo_metadata(false);
    NO_AMX
        .iter()
        .filter(|f| probe.is_flag_supported(f).unwrap_or(false))
        .map(|f| f.to_string())
        .collect()
}

fn detected_x86_flags(host: &BTreeSet<String>) -> Vec<String> {
    X86_FEATURES
        .iter()
        .filter(|(need, _, _)| need.iter().all(|n| host.contains(*n)))
        .flat_map(|(_, flags, _)| flags.iter().map(|f| f.to_string()))
        .collect()
}

/// The host's feature names as /proc/cpuinfo spells them.
fn host_x86_features() -> BTreeSet<String> {
    if let Ok(text) = std::fs::read_to_string("/proc/cpuinfo") {
        if let Some(line) = text.lines().find(|l| l.starts_with("flags")) {
            if let Some((_, list)) = line.split_once(':') {
                return list.split_whitespace().map(str::to_string).collect();
            }
        }
    }
    fallback_x86_features()
}

#[cfg(target_arch = "x86_64")]
fn fallback_x86_features() -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    let mut add = |name: &str, present: bool| {
        if present {
            set.insert(name.to_string());
        }
    };
    add("sse4_2", is_x86_feature_detected!("sse4.2"));
    add("f16c", is_x86_feature_detected!("f16c"));
    add("fma", is_x86_feature_detected!("fma"));
    add("bmi2", is_x86_feature_detected!("bmi2"));
    add("avx", is_x86_feature_detected!("avx"));
    add("avx2", is_x86_feature_detected!("avx2"));
    set
}

#[cfg(not(target_arch = "x86_64"))]
fn fallback_x86_features() -> BTreeSet<String> {
    BTreeSet::new()
}
