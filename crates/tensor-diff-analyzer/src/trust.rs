//! What a trace's tensors show about its run, and the run flags checked against it.
//!
//! The analyzer decides what is comparable from the tensors themselves: the attention
//! op each traced `attn` records (`FLASH_ATTN_EXT`, `MUL_MAT` without flash attention,
//! `CUSTOM` for the mixed KV cache), the intermediates only one layout has (`kq`,
//! `kq_soft_max` without flash attention; `k_quant`/`v_quant` with the mixed KV cache),
//! the presence of `kqv_out_unrotated` (V rotated) and the K/V tensors' types; rotation
//! per layer as the trace records it from the graph (`kqv_trace.run.rotated_k` /
//! `rotated_v`; older traces: inferred from `kv_rotation` and the cache types). A run flag
//! (`kqv_trace.run.*`, `kqv_trace.target_layer`) that contradicts them is an input error
//! (exit 2), never a reason to skip a tensor. docs/diff.md, "What the tensors show".

use std::collections::HashMap;

use gguf_io::GgmlType;
use trace_format::{keys, Role, RunMeta, TraceFile, TracedTensor, MIXED_ATTN_OP};

/// A string from a file, fit for a terminal line: control characters (newlines, escape
/// sequences) shown escaped.
pub fn shown(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_owned();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// One side's Hadamard rotation (of Q/K, or of V) per layer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rotation {
    /// Per layer (index = layer); None (or past the end): `fallback`.
    pub layers: Vec<Option<bool>>,
    /// For a layer with no entry.
    pub fallback: bool,
}

impl Rotation {
    /// The same for every layer.
    pub fn uniform(rotated: bool) -> Self {
        Self {
            layers: Vec::new(),
            fallback: rotated,
        }
    }

    /// As recorded per layer; a layer not traced is not rotated (nothing of it is
    /// compared anyway).
    pub fn recorded(layers: &[Option<bool>]) -> Self {
        Self {
            layers: layers.to_vec(),
            fallback: false,
        }
    }

    pub fn at(&self, layer: i32) -> bool {
        usize::try_from(layer)
            .ok()
            .and_then(|l| self.layers.get(l).copied().flatten())
            .unwrap_or(self.fallback)
    }

    /// Some layer is rotated.
    pub fn any(&self) -> bool {
        self.fallback || self.layers.contains(&Some(true))
    }

    /// What the graph showed for `layer` (live runs).
    pub fn set(&mut self, layer: i32, rotated: bool) {
        let Ok(l) = usize::try_from(layer) else {
            return;
        };
        if self.layers.len() <= l {
            self.layers.resize(l + 1, None);
        }
        self.layers[l] = Some(rotated);
    }

    /// Layers (up to `n`, at least those with an entry) where `self` and `other` differ.
    pub fn differing(&self, other: &Rotation, n: usize) -> Vec<i32> {
        let n = n.max(self.layers.len()).max(other.layers.len());
        (0..n as i32)
            .filter(|&l| self.at(l) != other.at(l))
            .collect()
    }
}

/// What decides comparability for one side.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// Flash attention (or the mixed node, which has its layout) on; None: unknown.
    pub flash: Option<bool>,
    pub mixed: bool,
    /// Q and K rotated, per layer: the one fact no tensor shows; recorded from the graph
    /// (`kqv_trace.run.rotated_k`), else inferred from `kv_rotation` and the K cache type.
    pub rot_k: Rotation,
    /// V rotated, per layer: recorded (`rotated_v`), else `kqv_out_unrotated` is present.
    pub rot_v: Rotation,
    /// Rotation was recorded from the graph, not inferred from the run flags.
    pub rotation_recorded: bool,
}

impl Observed {
    /// What a run's own metadata says: for a live run, whose metadata comes from the
    /// running context and not from a file. Its rotation is the guess from the cache
    /// types until each layer's capture shows it ([`crate::compare::Analyzer::set_current_rotation`]).
    pub fn claimed(run: &RunMeta) -> Self {
        Self {
            flash: flash_of(run),
            mixed: run.mixed_kv_cache,
            rot_k: Rotation::uniform(run.rotated_k()),
            rot_v: Rotation::uniform(run.rotated_v()),
            rotation_recorded: false,
        }
    }
}

/// The flag's reading of flash attention (the mixed KV cache counts as on).
pub fn flash_of(run: &RunMeta) -> Option<bool> {
    if run.mixed_kv_cache {
        return Some(true);
    }
    match run.flash_attn.as_str() {
        "on" => Some(true),
        "off" => Some(false),
        _ => None,
    }
}

/// Why a trace cannot be trusted as it is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    #[error(
        "{role} of step {step}, layer {layer} is in the file twice ({first} and {second}): \
         which one to compare cannot be told"
    )]
    Duplicate {
        role: Role,
        step: u32,
        layer: i32,
        first: String,
        second: String,
    },
    #[error("{key} says {claim}, but {shown}: the metadata contradicts the tensors")]
    Contradiction {
        key: &'static str,
        claim: String,
        shown: String,
    },
    #[error("the tensors contradict each other: {0}, but {1}")]
    Inconsistent(String, String),
}

fn at(t: &TracedTensor) -> String {
    format!(
        "{} (step {}, layer {})",
        shown(&t.name),
        t.meta.step,
        t.meta.layer
    )
}

fn contradiction(key: &'static str, claim: impl Into<String>, shown: String) -> TrustError {
    TrustError::Contradiction {
        key,
        claim: claim.into(),
        shown,
    }
}

/// The first piece of evidence for each attention layout.
#[derive(Default)]
struct Layouts {
    flash: Option<String>,
    plain: Option<String>,
    mixed: Option<String>,
}

impl Layouts {
    fn op(&mut self, op: &str, what: impl FnOnce() -> String) {
        let slot = match op {
            "FLASH_ATTN_EXT" => &mut self.flash,
            "MUL_MAT" | "SOFT_MAX" => &mut self.plain,
            "CUSTOM" | MIXED_ATTN_OP => &mut self.mixed,
            _ => return,
        };
        if slot.is_none() {
            *slot = Some(what());
        }
    }

    fn role(&mut self, t: &TracedTensor) {
        let slot = match t.meta.role {
            Role::Kq | Role::KqSoftMax => &mut self.plain,
            Role::KQuant | Role::VQuant => &mut self.mixed,
            Role::Attn => {
                let op = t.meta.op.clone();
                return self.op(&op, || format!("{} has op {}", at(t), shown(&op)));
            }
            _ => return,
        };
        if slot.is_none() {
            *slot = Some(format!("{} is a {}", at(t), t.meta.role));
        }
    }
}

fn cache_type(key: &'static str, s: &str) -> Result<Option<GgmlType>, TrustError> {
    if s.is_empty() {
        return Ok(None);
    }
    GgmlType::from_name(s).map(Some).ok_or_else(|| {
        contradiction(
            key,
            format!("'{}'", shown(s)),
            "no ggml type has that name".into(),
        )
    })
}

/// Check a trace's tensor table (no duplicated (role, layer, step)) and its run flags
/// against its tensors; returns what the tensors show.
pub fn observe(trace: &TraceFile) -> Result<Observed, TrustError> {
    let run = &trace.run;
    let mut seen: HashMap<(Role, i32, u32), usize> = HashMap::with_capacity(trace.tensors.len());
    let mut layouts = Layouts::default();
    // Encoder-decoder runs record decoder layer il's cross-attention as layer n_layer + il.
    let mut cross = Layouts::default();
    let is_cross = |layer: i32| run.n_cross_layer > 0 && i64::from(layer) >= i64::from(run.n_layer);
    let (mut kqv_out, mut unrotated) = (None, None);
    let type_k = cache_type(keys::RUN_CACHE_TYPE_K, &run.cache_type_k)?;
    let type_v = cache_type(keys::RUN_CACHE_TYPE_V, &run.cache_type_v)?;
    if run.target_layer < -1
        || (run.n_layer > 0 && i64::from(run.target_layer) >= i64::from(run.n_layer))
    {
        return Err(contradiction(
            keys::TARGET_LAYER,
            run.target_layer.to_string(),
            format!("the run has {} layers (-1 means all)", run.n_layer),
        ));
    }
    for (i, t) in trace.tensors.iter().enumerate() {
        let m = &t.meta;
        if let Some(&first) = seen.get(&(m.role, m.layer, m.step)) {
            return Err(TrustError::Duplicate {
                role: m.role,
                step: m.step,
                layer: m.layer,
                first: shown(&trace.tensors[first].name),
                second: shown(&t.name),
            });
        }
        seen.insert((m.role, m.layer, m.step), i);
        if run.target_layer >= 0 && m.layer != run.target_layer {
            return Err(contradiction(
                keys::TARGET_LAYER,
                run.target_layer.to_string(),
                format!("{} is of another layer", at(t)),
            ));
        }
        // Cross-attention of decoder layer `il` is recorded as layer `n_layer + il`.
        let layers = i64::from(run.n_layer) + i64::from(run.n_cross_layer);
        if run.n_layer > 0 && (m.layer < 0 || i64::from(m.layer) >= layers) {
            return Err(contradiction(
                keys::RUN_N_LAYER,
                if run.n_cross_layer > 0 {
                    format!("{} (+ {} cross-attention)", run.n_layer, run.n_cross_layer)
                } else {
                    run.n_layer.to_string()
                },
                format!("{} is outside that range", at(t)),
            ));
        }
        if is_cross(m.layer) {
            cross.role(t);
        } else {
            layouts.role(t);
        }
        let ne = m.layout.ne;
        match m.role {
            Role::KqvOut => {
                kqv_out.get_or_insert_with(|| at(t));
            }
            Role::KqvOutUnrotated => {
                unrotated.get_or_insert_with(|| at(t));
            }
            Role::Q if run.n_head > 0 && ne[2] != u64::from(run.n_head) => {
                return Err(contradiction(
                    keys::RUN_N_HEAD,
                    run.n_head.to_string(),
                    format!("{} holds {} heads (shape {:?})", at(t), ne[2], ne),
                ));
            }
            Role::K | Role::V => {
                let (key, claimed) = if m.role == Role::K {
                    (keys::RUN_CACHE_TYPE_K, type_k)
                } else {
                    (keys::RUN_CACHE_TYPE_V, type_v)
                };
                // The cache types describe the KV cache: in an encoder-decoder run the
                // encoder's K and V come from `Kcur`/`Vcur` without a cache (F32) and are
                // not held to them; only tensors of the cache (named `cache_*`) are.
                let from_cache = run.n_cross_layer == 0
                    || m.view_of.starts_with("cache_")
                    || m.ggml_name.starts_with("cache_");
                if let Some(ty) = claimed.filter(|&ty| from_cache && ty != m.layout.ty) {
                    return Err(contradiction(
                        key,
                        ty.name(),
                        format!("{} is {}", at(t), m.layout.ty.name()),
                    ));
                }
                if m.role == Role::K && run.n_head_kv > 0 && ne[2] != u64::from(run.n_head_kv) {
                    return Err(contradiction(
                        keys::RUN_N_HEAD_KV,
                        run.n_head_kv.to_string(),
                        format!("{} holds {} KV heads (shape {:?})", at(t), ne[2], ne),
                    ));
                }
                if m.role == Role::K && run.rotated_k_at(m.layer) && ne[0] % 64 != 0 {
                    return Err(contradiction(
                        keys::RUN_KV_ROTATION,
                        format!("true with a {} K cache", run.cache_type_k),
                        format!(
                            "{} has head size {}: llama.cpp rotates only head sizes that are \
                             multiples of 64",
                            at(t),
                            ne[0]
                        ),
                    ));
                }
            }
            _ => {}
        }
    }
    for a in &trace.attn {
        let l = if is_cross(a.layer) {
            &mut cross
        } else {
            &mut layouts
        };
        l.op(&a.op, || {
            format!(
                "the attention record of step {}, layer {} has op {}",
                a.step,
                a.layer,
                shown(&a.op)
            )
        });
    }

    // The tensors themselves must tell one story.
    let kinds = [
        (&layouts.flash, "flash attention on"),
        (&layouts.plain, "flash attention off"),
        (&layouts.mixed, "the mixed KV cache"),
    ];
    let present: Vec<String> = kinds
        .iter()
        .filter_map(|(e, what)| e.as_ref().map(|e| format!("{e} ({what})")))
        .collect();
    // A mixed KV cache on a sliding-window (iSWA) model: its full-attention layers run the
    // mixed node, its window layers llama.cpp's own attention, flash or not (one story).
    let iswa_mixed = run.mixed_kv_cache && layouts.mixed.is_some() && present.len() == 2;
    if present.len() > 1 && !iswa_mixed {
        return Err(TrustError::Inconsistent(
            present[0].clone(),
            present[1].clone(),
        ));
    }

    // Flash attention. A mixed run records the flag as asked, or as its window layers ran;
    // its node has its own layout.
    if layouts.mixed.is_none() || iswa_mixed {
        let contra = match run.flash_attn.as_str() {
            "on" => layouts.plain.as_ref(),
            "off" => layouts.flash.as_ref(),
            "" | "auto" => None,
            other => {
                return Err(contradiction(
                    keys::RUN_FLASH_ATTN,
                    format!("'{}'", shown(other)),
                    "it must be on, off or auto".into(),
                ))
            }
        };
        if let Some(e) = contra {
            return Err(contradiction(
                keys::RUN_FLASH_ATTN,
                run.flash_attn.clone(),
                e.clone(),
            ));
        }
    }
    // Cross-attention (layers from n_layer on) tells its own story, by its own flag.
    if let (Some(f), Some(p)) = (&cross.flash, &cross.plain) {
        return Err(TrustError::Inconsistent(
            format!("{f} (flash attention on)"),
            format!("{p} (flash attention off)"),
        ));
    }
    let contra = match run.cross_flash_attn.as_str() {
        "on" => cross.plain.as_ref(),
        "off" => cross.flash.as_ref(),
        _ => None,
    };
    if let Some(e) = contra {
        return Err(contradiction(
            keys::RUN_CROSS_FLASH_ATTN,
            run.cross_flash_attn.clone(),
            e.clone(),
        ));
    }
    // The mixed KV cache.
    match (&layouts.mixed, run.mixed_kv_cache) {
        (Some(e), false) => {
            return Err(contradiction(
                keys::RUN_MIXED_KV_CACHE,
                "false",
                format!("{e}, which only the mixed KV cache makes"),
            ))
        }
        (None, true) => {
            if let Some(e) = layouts.flash.as_ref().or(layouts.plain.as_ref()) {
                return Err(contradiction(
                    keys::RUN_MIXED_KV_CACHE,
                    "true",
                    format!("{e}, not the mixed KV cache's attention node"),
                ));
            }
        }
        _ => {}
    }
    // Rotation. Recorded per layer: trace_format's validation checked it against the
    // kqv_out_unrotated tensors when the file was opened.
    if run.rotation_recorded() {
        return Ok(Observed {
            rot_k: Rotation::recorded(&run.rotated_k_layers),
            rot_v: Rotation::recorded(&run.rotated_v_layers),
            rotation_recorded: true,
            ..observed_layouts(run, &layouts)
        });
    }
    let quantized = |t: Option<GgmlType>| t.is_some_and(|t| t.is_quantized());
    if run.kv_rotation && !quantized(type_k) && !quantized(type_v) {
        return Err(contradiction(
            keys::RUN_KV_ROTATION,
            "true",
            format!(
                "neither cache type is quantized (K '{}', V '{}'): llama.cpp rotates only \
                 quantized caches",
                shown(&run.cache_type_k),
                shown(&run.cache_type_v)
            ),
        ));
    }
    if let Some(e) = &unrotated {
        if !run.rotated_v() {
            let (key, claim) = if run.kv_rotation {
                (keys::RUN_CACHE_TYPE_V, run.cache_type_v.clone())
            } else {
                (keys::RUN_KV_ROTATION, "false".to_owned())
            };
            return Err(contradiction(
                key,
                shown(&claim),
                format!("{e} is a kqv_out_unrotated: V was rotated"),
            ));
        }
    } else if let (true, Some(e)) = (run.rotated_v(), &kqv_out) {
        return Err(contradiction(
            keys::RUN_KV_ROTATION,
            format!("true with a {} V cache", shown(&run.cache_type_v)),
            format!("the file has no kqv_out_unrotated beside {e}: V was not rotated"),
        ));
    }

    Ok(Observed {
        rot_k: Rotation::uniform(run.rotated_k()),
        rot_v: Rotation::uniform(unrotated.is_some() || (kqv_out.is_none() && run.rotated_v())),
        rotation_recorded: false,
        ..observed_layouts(run, &layouts)
    })
}

/// Flash attention and the mixed KV cache as the tensors show them (no rotation).
fn observed_layouts(run: &RunMeta, layouts: &Layouts) -> Observed {
    Observed {
        // (the window layers of a mixed run on a sliding-window model decide)
        flash: if layouts.flash.is_some() {
            Some(true)
        } else if layouts.plain.is_some() {
            Some(false)
        } else if layouts.mixed.is_some() {
            Some(true)
        } else {
            // No attention op traced (kqv_out only): the flag decides nothing but a note.
            flash_of(run)
        },
        mixed: layouts.mixed.is_some()
            || (run.mixed_kv_cache && layouts.flash.is_none() && layouts.plain.is_none()),
        ..Observed::default()
    }
}

#[cfg(test)]
mod tests {
    use super::shown;

    #[test]
    fn control_characters_are_shown_escaped() {
        assert_eq!(shown("plain name-0 (view)"), "plain name-0 (view)");
        assert_eq!(shown("a\nb"), "a\\nb");
        assert_eq!(shown("\u{1b}[31mred"), "\\u{1b}[31mred");
        assert_eq!(shown("tab\there\r"), "tab\\there\\r");
        assert_eq!(shown("ünïcode ok"), "ünïcode ok");
    }
}
