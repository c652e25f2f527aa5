//! Hostile traces (issue 14): valid GGUF files whose `kqv_trace.*` metadata and tensor
//! contents contradict each other, derived from an honest trace, plus a synthetic trace
//! of any number of groups for the scale test.
//!
//! [`cases`] takes an honest trace's bytes (the tiny model traced with flash attention on,
//! at least one step of one token, at least two layers) and returns one [`Case`] per class
//! of lie in the issue, each with what a reader must do with it ([`Expect`]).
//! [`Editable`] is the GGUF rewritten in memory: metadata, tensor table and data, written
//! back with gguf-io's writer, so that every file is a well-formed GGUF and only the trace
//! layer can object.

use gguf_io::{
    Array, ByteOrder, GgmlType, GgufError, GgufFile, GgufWriter, HeaderSpec, Metadata, TensorSpec,
    Value,
};
use trace_format::keys;

use crate::Rng;

/// What every reader command must do with a case (beyond never panicking, aborting,
/// hanging, or echoing raw control characters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// An honest file (the original, or a faithful rewrite of it): exit 0 everywhere.
    Success,
    /// The data contradicts the claims: every command that interprets the trace
    /// (`--verify-attention`, `--shapes`, the analyzer both ways) exits non-zero.
    Refuse,
    /// Nothing contradicts anything (only hostile strings): any documented exit code.
    Any,
}

/// One hostile file.
#[derive(Clone, Debug)]
pub struct Case {
    /// A file-name-safe identifier (`k_2p60_cells_zero_bytes`).
    pub name: &'static str,
    /// The class of the issue it exercises, in the words.
    pub class: &'static str,
    pub bytes: Vec<u8>,
    pub expect: Expect,
}

/// Per-tensor metadata arrays and how many entries each tensor has in them.
pub const PER_TENSOR: [(&str, usize); 8] = [
    (keys::TENSOR_ROLE, 1),
    (keys::TENSOR_LAYER, 1),
    (keys::TENSOR_STEP, 1),
    (keys::TENSOR_GGML_NAME, 1),
    (keys::TENSOR_OP, 1),
    (keys::TENSOR_NB, 4),
    (keys::TENSOR_VIEW_OF, 1),
    // Optional (absent in older traces): kept in step when present.
    (keys::TENSOR_GRAPH_ORDER, 1),
];

/// Per-attention-record arrays.
pub const PER_ATTN: [&str; 6] = [
    keys::ATTN_STEP,
    keys::ATTN_LAYER,
    keys::ATTN_OP,
    keys::ATTN_SCALE,
    keys::ATTN_MAX_BIAS,
    keys::ATTN_SOFTCAP,
];

/// A GGUF held in memory for rewriting: the tensor data is kept in the file's byte order.
#[derive(Clone, Debug)]
pub struct Editable {
    pub metadata: Metadata,
    pub tensors: Vec<TensorSpec>,
    pub data: Vec<Vec<u8>>,
    pub byte_order: ByteOrder,
}

/// An array's entries `start..start + n`, as an array of the same type.
fn slice(a: &Array, start: usize, n: usize) -> Array {
    fn s<T: Clone>(v: &[T], start: usize, n: usize) -> Vec<T> {
        v.iter().skip(start).take(n).cloned().collect()
    }
    match a {
        Array::U8(v) => Array::U8(s(v, start, n)),
        Array::I8(v) => Array::I8(s(v, start, n)),
        Array::U16(v) => Array::U16(s(v, start, n)),
        Array::I16(v) => Array::I16(s(v, start, n)),
        Array::U32(v) => Array::U32(s(v, start, n)),
        Array::I32(v) => Array::I32(s(v, start, n)),
        Array::F32(v) => Array::F32(s(v, start, n)),
        Array::Bool(v) => Array::Bool(s(v, start, n)),
        Array::String(v) => Array::String(s(v, start, n)),
        Array::Array(v) => Array::Array(s(v, start, n)),
        Array::U64(v) => Array::U64(s(v, start, n)),
        Array::I64(v) => Array::I64(s(v, start, n)),
        Array::F64(v) => Array::F64(s(v, start, n)),
    }
}

/// `a` followed by `b` (same element type; `b` is dropped otherwise).
fn concat(a: &Array, b: &Array) -> Array {
    match (a, b) {
        (Array::U8(x), Array::U8(y)) => Array::U8([&x[..], y].concat()),
        (Array::I8(x), Array::I8(y)) => Array::I8([&x[..], y].concat()),
        (Array::U16(x), Array::U16(y)) => Array::U16([&x[..], y].concat()),
        (Array::I16(x), Array::I16(y)) => Array::I16([&x[..], y].concat()),
        (Array::U32(x), Array::U32(y)) => Array::U32([&x[..], y].concat()),
        (Array::I32(x), Array::I32(y)) => Array::I32([&x[..], y].concat()),
        (Array::F32(x), Array::F32(y)) => Array::F32([&x[..], y].concat()),
        (Array::Bool(x), Array::Bool(y)) => Array::Bool([&x[..], y].concat()),
        (Array::String(x), Array::String(y)) => Array::String([&x[..], y].concat()),
        (Array::Array(x), Array::Array(y)) => Array::Array([&x[..], y].concat()),
        (Array::U64(x), Array::U64(y)) => Array::U64([&x[..], y].concat()),
        (Array::I64(x), Array::I64(y)) => Array::I64([&x[..], y].concat()),
        (Array::F64(x), Array::F64(y)) => Array::F64([&x[..], y].concat()),
        _ => a.clone(),
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn random_f32(rng: &mut Rng, n: usize) -> Vec<u8> {
    f32_bytes(&(0..n).map(|_| rng.signed()).collect::<Vec<_>>())
}

impl Editable {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, GgufError> {
        let f = GgufFile::from_bytes(bytes.to_vec())?;
        let spec = HeaderSpec::from_header(f.header());
        Ok(Self {
            metadata: spec.metadata,
            tensors: spec.tensors,
            data: f
                .tensors()
                .iter()
                .map(|t| f.tensor_data(t).to_vec())
                .collect(),
            byte_order: spec.byte_order,
        })
    }

    /// Write it out with gguf-io's writer (so the GGUF layer is always well formed).
    pub fn to_bytes(&self) -> Result<Vec<u8>, GgufError> {
        let spec = HeaderSpec {
            metadata: self.metadata.clone(),
            tensors: self.tensors.clone(),
            byte_order: self.byte_order,
        };
        let mut w = GgufWriter::new(Vec::new(), &spec)?;
        for d in &self.data {
            w.write_tensor(d)?;
        }
        w.finish()
    }

    pub fn array(&self, key: &str) -> Option<&Array> {
        self.metadata.get(key).and_then(Value::as_array)
    }

    pub fn strings(&self, key: &str) -> Vec<String> {
        match self.array(key) {
            Some(Array::String(v)) => v.clone(),
            _ => Vec::new(),
        }
    }

    pub fn i64s(&self, key: &str) -> Vec<i64> {
        self.array(key)
            .map(|a| {
                (0..a.len())
                    .filter_map(|i| a.get(i).and_then(|v| v.as_i64()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Index of the tensor with this role, step and layer (the first one).
    pub fn find(&self, role: &str, step: u32, layer: i32) -> Option<usize> {
        let roles = self.strings(keys::TENSOR_ROLE);
        let steps = self.i64s(keys::TENSOR_STEP);
        let layers = self.i64s(keys::TENSOR_LAYER);
        (0..roles.len()).find(|&i| {
            roles[i] == role
                && steps.get(i) == Some(&i64::from(step))
                && layers.get(i) == Some(&i64::from(layer))
        })
    }

    /// Set entry `i` of an integer per-tensor (or per-record) array, keeping its type.
    pub fn set_int(&mut self, key: &str, i: usize, v: i64) {
        let Some(mut a) = self.array(key).cloned() else {
            return;
        };
        match &mut a {
            Array::I32(x) => x[i] = v as i32,
            Array::U32(x) => x[i] = v as u32,
            Array::U64(x) => x[i] = v as u64,
            Array::I64(x) => x[i] = v,
            _ => return,
        }
        self.metadata.set(key, a);
    }

    pub fn set_string(&mut self, key: &str, i: usize, v: &str) {
        if let Some(Array::String(mut x)) = self.array(key).cloned() {
            x[i] = v.to_owned();
            self.metadata.set(key, Array::String(x));
        }
    }

    /// Set tensor `i`'s four `nb` entries.
    pub fn set_nb(&mut self, i: usize, nb: [u64; 4]) {
        if let Some(Array::U64(mut x)) = self.array(keys::TENSOR_NB).cloned() {
            x[4 * i..4 * i + 4].copy_from_slice(&nb);
            self.metadata.set(keys::TENSOR_NB, Array::U64(x));
        }
    }

    /// Give tensor `i` new dims and data (dims padded to four with ones).
    pub fn reshape(&mut self, i: usize, dims: [u64; 4], data: Vec<u8>) {
        self.tensors[i].dims = dims.to_vec();
        self.data[i] = data;
    }

    /// Append a copy of tensor `i` (its per-tensor metadata too) named `name`, with
    /// `data` as its bytes; returns the new index.
    pub fn push_copy(&mut self, i: usize, name: &str, data: Vec<u8>) -> usize {
        for (key, per) in PER_TENSOR {
            if let Some(a) = self.array(key).cloned() {
                let extra = slice(&a, per * i, per);
                self.metadata.set(key, concat(&a, &extra));
            }
        }
        let mut spec = self.tensors[i].clone();
        spec.name = name.to_owned();
        self.tensors.push(spec);
        self.data.push(data);
        let n = self.tensors.len();
        self.metadata.set(keys::TENSOR_COUNT, n as i32);
        n - 1
    }

    /// Remove tensor `i`: its table entry, data and per-tensor array entries.
    pub fn remove(&mut self, i: usize) {
        for (key, per) in PER_TENSOR {
            if let Some(a) = self.array(key).cloned() {
                let rest = concat(&slice(&a, 0, per * i), &slice(&a, per * (i + 1), a.len()));
                self.metadata.set(key, rest);
            }
        }
        self.tensors.remove(i);
        self.data.remove(i);
        let n = self.tensors.len();
        self.metadata.set(keys::TENSOR_COUNT, n as i32);
    }

    /// Give the group (step, layer) consistent attention shapes (flash-attention layouts):
    /// q `[d, t, h]`, k `[d, n_kv, h_kv]`, v `[dv, n_kv, h_kv]`, attn `[dv, h, t]`,
    /// kqv_out `[dv*h, t]`, contiguous strides, random f32 data (zeros for f16; zero bytes
    /// whenever a dimension is 0), and no mask. An output over 64 MiB gets ne0 = 0; an
    /// input over 64 MiB panics.
    #[allow(clippy::too_many_arguments)]
    pub fn set_group(
        &mut self,
        step: u32,
        layer: i32,
        [d, dv, t, h, h_kv, n_kv]: [u64; 6],
        rng: &mut Rng,
    ) {
        if let Some(m) = self.find("mask", step, layer) {
            self.remove(m);
        }
        let shapes: [(&str, [u64; 4]); 5] = [
            ("q", [d, t, h, 1]),
            ("k", [d, n_kv, h_kv, 1]),
            ("v", [dv, n_kv, h_kv, 1]),
            ("attn", [dv, h, t, 1]),
            ("kqv_out", [dv * h, t, 1, 1]),
        ];
        for (role, ne) in shapes {
            let Some(i) = self.find(role, step, layer) else {
                continue;
            };
            let ty = self.tensors[i].ty;
            let bytes_of = |ne: [u64; 4]| {
                ne.iter()
                    .try_fold(1u64, |a, &x| a.checked_mul(x))
                    .and_then(|n| ty.bytes_for(n))
                    .filter(|&b| b <= 64 << 20)
            };
            // An output too large to hold claims no values (ne0 = 0): the reference is
            // sized from the inputs' shapes before the output is compared.
            let mut ne = ne;
            if bytes_of(ne).is_none() && matches!(role, "attn" | "kqv_out") {
                ne[0] = 0;
            }
            let bytes = bytes_of(ne).unwrap_or_else(|| panic!("{role} {ne:?}: over 64 MiB"));
            let size = ty.info().map_or(4, |x| u64::from(x.type_size));
            let mut nb = [size, 0, 0, 0];
            for k in 1..4 {
                nb[k] = nb[k - 1].saturating_mul(ne[k - 1]);
            }
            let data = if ty == GgmlType::F32 {
                random_f32(rng, (bytes / 4) as usize)
            } else {
                vec![0; bytes as usize]
            };
            self.reshape(i, ne, data);
            self.set_nb(i, nb);
        }
    }

    /// Append a copy of attention record `i` with another scale.
    pub fn push_attn_copy(&mut self, i: usize, scale: f32) {
        for key in PER_ATTN {
            if let Some(a) = self.array(key).cloned() {
                let extra = if key == keys::ATTN_SCALE {
                    Array::F32(vec![scale])
                } else {
                    slice(&a, i, 1)
                };
                self.metadata.set(key, concat(&a, &extra));
            }
        }
    }

    /// The attention record of (step, layer).
    pub fn find_attn(&self, step: u32, layer: i32) -> Option<usize> {
        let s = self.i64s(keys::ATTN_STEP);
        let l = self.i64s(keys::ATTN_LAYER);
        (0..s.len()).find(|&i| s[i] == i64::from(step) && l.get(i) == Some(&i64::from(layer)))
    }

    /// The same file in big-endian byte order: metadata is re-encoded by the writer, the
    /// tensors whose elements gguf-py swaps (f16, f32, ...) are swapped element by element.
    pub fn to_big_endian(&self) -> Self {
        let mut out = self.clone();
        out.byte_order = ByteOrder::Big;
        for (t, d) in out.tensors.iter().zip(out.data.iter_mut()) {
            if let Some(info) = t.ty.info() {
                if gguf_io::swapped_in_big_endian(t.ty) {
                    for c in d.chunks_exact_mut(info.type_size as usize) {
                        c.reverse();
                    }
                }
            }
        }
        out
    }
}

/// What the honest trace is made of, as the mutations need it.
struct Shape {
    /// A step of one token (a generated token).
    one_token_step: u32,
    n_layer: i64,
    n_steps: usize,
}

fn shape(e: &Editable) -> Shape {
    let counts = e.i64s(keys::STEP_N_TOKENS);
    let one_token_step = counts.iter().position(|&c| c == 1).unwrap_or(0) as u32;
    let layers = e.i64s(keys::TENSOR_LAYER);
    Shape {
        one_token_step,
        n_layer: layers.iter().copied().max().unwrap_or(0) + 1,
        n_steps: counts.len(),
    }
}

/// One hostile file per class of the issue, derived from an honest trace (flash attention
/// on, one-token steps, two or more layers). The first case is the honest file itself.
pub fn cases(honest: &[u8]) -> Result<Vec<Case>, GgufError> {
    let base = Editable::from_bytes(honest)?;
    let sh = shape(&base);
    let mut rng = Rng::new(0x1405_7ace);
    let mut out = Vec::new();
    let mut add = |name: &'static str, class: &'static str, e: &Editable, expect: Expect| {
        e.to_bytes().map(|bytes| {
            out.push(Case {
                name,
                class,
                bytes,
                expect,
            })
        })
    };
    let s1 = sh.one_token_step;
    let idx = |e: &Editable, role: &str| {
        e.find(role, 0, 0)
            .unwrap_or_else(|| panic!("the honest trace has no {role} at step 0 layer 0"))
    };
    let idx1 = |e: &Editable, role: &str| {
        e.find(role, s1, 0)
            .unwrap_or_else(|| panic!("the honest trace has no {role} at step {s1} layer 0"))
    };

    add("honest", "the honest trace itself", &base, Expect::Success)?;
    add(
        "big_endian",
        "an honest trace rewritten big-endian (compare with the little-endian original)",
        &base.to_big_endian(),
        Expect::Success,
    )?;

    // --- sizes taken on trust: shapes consistent with each other, data absent ---
    let zero: [(&'static str, &'static str, [u64; 6]); 5] = [
        (
            "k_2p60_cells_zero_bytes",
            "a K view claiming 2^60 cells in zero bytes (all dims but one zero)",
            [0, 0, 8, 4, 2, 1 << 60],
        ),
        (
            "out_2p61_elements",
            "an output shape of 2^61 elements (2^29 tokens x 2^30 heads x 4, zero bytes of input)",
            [0, 4, 1 << 29, 1 << 30, 1, 0],
        ),
        (
            "k_2p40_cells",
            "2^40 cells in zero bytes",
            [0, 0, 8, 4, 2, 1 << 40],
        ),
        (
            "out_4096x4096",
            "a 4096 x 4096 output (4096 tokens x 4096 heads x 64, 8 GiB of f64)",
            [0, 64, 4096, 4096, 1, 0],
        ),
        (
            "zero_element_dims",
            "zero-element dimensions (64 heads x 2048 tokens x 65,536 cells of nothing)",
            [0, 0, 2048, 64, 64, 1 << 16],
        ),
    ];
    for (name, class, dims) in zero {
        let mut e = base.clone();
        e.set_group(0, 0, dims, &mut rng);
        add(name, class, &e, Expect::Refuse)?;
    }

    // A failing group of 65,536 query heads (one token): q and kqv_out hold real, random
    // data (4 MiB each), so the group fails and the Q-head diagnosis runs.
    let mut e = base.clone();
    let (q, out_i) = (idx1(&e, "q"), idx1(&e, "kqv_out"));
    let d = e.tensors[q].dims[0];
    let heads = 65_536u64;
    e.reshape(
        q,
        [d, 1, heads, 1],
        random_f32(&mut rng, (d * heads) as usize),
    );
    e.set_nb(q, [4, 4 * d, 4 * d, 4 * d * heads]);
    e.reshape(
        out_i,
        [d * heads, 1, 1, 1],
        random_f32(&mut rng, (d * heads) as usize),
    );
    e.set_nb(out_i, [4, 4 * d * heads, 4 * d * heads, 4 * d * heads]);
    add(
        "q_heads_65536_failing",
        "a failed group with 65,536 query heads (Q-head diagnosis of 65,536^2)",
        &e,
        Expect::Refuse,
    )?;

    // head_dim 1, 1,024 heads x 1,024 tokens x 2^20 cells = 2^40 score evaluations, all
    // with real data (a few MiB; no mask, which would be 2 GiB).
    let mut e = base.clone();
    e.set_group(0, 0, [1, 1, 1024, 1024, 1, 1 << 20], &mut rng);
    add(
        "head_dim1_2p40_scores",
        "a head_dim-1 trace with 2^40 score evaluations",
        &e,
        Expect::Refuse,
    )?;

    // --- duplicates ---
    for (name, role) in [
        ("duplicate_kqv_out", "kqv_out"),
        ("duplicate_k", "k"),
        ("duplicate_q", "q"),
    ] {
        let mut e = base.clone();
        let i = idx(&e, role);
        let mut data = e.data[i].clone();
        // Other values: flip the sign bit of every f16/f32 element (f16 for k: two bytes).
        let width = if e.tensors[i].ty == GgmlType::F16 {
            2
        } else {
            4
        };
        for c in data.chunks_exact_mut(width) {
            c[width - 1] ^= 0x80;
        }
        let new_name = format!("dup_{}", e.tensors[i].name);
        let new_name: String = new_name.chars().take(63).collect();
        e.push_copy(i, &new_name, data);
        add(
            name,
            "a second kqv_out, k or q with the same (step, layer) and other values",
            &e,
            Expect::Refuse,
        )?;
    }

    let mut e = base.clone();
    for i in 0..e.tensors.len() {
        e.set_int(keys::TENSOR_STEP, i, 0);
        e.set_int(keys::TENSOR_LAYER, i, 0);
    }
    add(
        "all_labelled_0_0",
        "every tensor labelled (0, 0)",
        &e,
        Expect::Refuse,
    )?;

    // --- run flags the tensors contradict ---
    let flags: [(&'static str, &str, Value); 7] = [
        (
            "flag_mixed_kv_cache",
            keys::RUN_MIXED_KV_CACHE,
            Value::Bool(true),
        ),
        (
            "flag_flash_attn_off",
            keys::RUN_FLASH_ATTN,
            Value::from("off"),
        ),
        ("flag_kv_rotation", keys::RUN_KV_ROTATION, Value::Bool(true)),
        (
            "flag_cache_type_k_q8_0",
            keys::RUN_CACHE_TYPE_K,
            Value::from("q8_0"),
        ),
        (
            "flag_cache_type_v_q4_0",
            keys::RUN_CACHE_TYPE_V,
            Value::from("q4_0"),
        ),
        ("flag_target_layer_1", keys::TARGET_LAYER, Value::I32(1)),
        ("n_head_disagrees", keys::RUN_N_HEAD, Value::U32(8)),
    ];
    for (name, key, value) in flags {
        let mut e = base.clone();
        e.metadata.set(key, value);
        add(
            name,
            "a run flag (mixed_kv_cache, flash_attn, kv_rotation, cache_type_*, target_layer, n_head) the tensors contradict",
            &e,
            Expect::Refuse,
        )?;
    }

    // --- attention records ---
    let mut e = base.clone();
    if let Some(a) = e.find_attn(0, 0) {
        let scale = match e.array(keys::ATTN_SCALE).and_then(|x| x.get(a)) {
            Some(Value::F32(s)) => s,
            _ => 1.0,
        };
        e.push_attn_copy(a, scale * 2.0);
    }
    add(
        "attn_second_record_other_scale",
        "a second attention record for a (step, layer) with another scale",
        &e,
        Expect::Refuse,
    )?;

    // --- shapes and strides ---
    let mut e = base.clone();
    let o = idx(&e, "kqv_out");
    let dims = e.tensors[o].dims.clone();
    let (ne0, ne1) = (dims[0], dims.get(1).copied().unwrap_or(1));
    let data = e.data[o].clone();
    e.reshape(o, [ne0 / 2, ne1 * 2, 1, 1], data);
    add(
        "kqv_out_reshaped",
        "a kqv_out whose table shape is reshaped with the same bytes",
        &e,
        Expect::Refuse,
    )?;

    let mut e = base.clone();
    if let Some(Array::U64(mut nb)) = e.array(keys::TENSOR_NB).cloned() {
        nb.push(4);
        e.metadata.set(keys::TENSOR_NB, Array::U64(nb));
    }
    add(
        "nb_wrong_length",
        "nb arrays of the wrong length (4n+1)",
        &e,
        Expect::Refuse,
    )?;

    let mut e = base.clone();
    let k = idx(&e, "k");
    e.set_nb(k, [2, 1 << 63, 1 << 63, u64::MAX]);
    add(
        "nb_overflowing",
        "nb arrays overflowing",
        &e,
        Expect::Refuse,
    )?;

    // --- labels out of range ---
    let mut e = base.clone();
    let last_layer = (sh.n_layer - 1) as i32;
    for role in ["kqv_out", "attn", "q", "k", "v", "mask"] {
        if let Some(i) = e.find(role, 0, last_layer) {
            e.set_int(keys::TENSOR_LAYER, i, 7);
        }
    }
    if let Some(a) = e.find_attn(0, last_layer) {
        e.set_int(keys::ATTN_LAYER, a, 7);
    }
    add(
        "layer_outside_n_layer",
        "layers outside n_layer",
        &e,
        Expect::Refuse,
    )?;

    let mut e = base.clone();
    let far = sh.n_steps as i64 + 90;
    for role in ["kqv_out", "attn", "q", "k", "v", "mask"] {
        if let Some(i) = e.find(role, 0, 0) {
            e.set_int(keys::TENSOR_STEP, i, far);
        }
    }
    if let Some(a) = e.find_attn(0, 0) {
        e.set_int(keys::ATTN_STEP, a, far);
    }
    add(
        "step_outside_n_tokens",
        "steps outside n_tokens",
        &e,
        Expect::Refuse,
    )?;

    let mut e = base.clone();
    e.metadata.set(keys::FORMAT_VERSION, 999u32);
    add(
        "format_version_999",
        "format_version 999",
        &e,
        Expect::Refuse,
    )?;

    let mut e = base.clone();
    let h = e.metadata.get_u64(keys::RUN_N_HEAD).unwrap_or(4);
    e.metadata
        .set(keys::RUN_N_HEAD, Value::U64((1u64 << 32) + h));
    add(
        "n_head_u64_2p32_plus_h",
        "a 64-bit n_head of 2^32+4 (read as 4 when truncated)",
        &e,
        Expect::Refuse,
    )?;

    // --- output hygiene ---
    let evil = "evil\nINJECTED-LINE \u{1b}[31mred\u{1b}[0m\r\u{7}";
    let mut e = base.clone();
    e.metadata.set(keys::RUN_MODEL_PATH, evil);
    e.metadata.set(keys::RUN_ARCHITECTURE, evil);
    let o = idx(&e, "kqv_out");
    e.set_string(keys::TENSOR_GGML_NAME, o, evil);
    e.set_string(keys::TENSOR_VIEW_OF, o, evil);
    add(
        "control_chars_in_strings",
        "metadata strings with newlines or ANSI escapes (model path, ggml names)",
        &e,
        Expect::Any,
    )?;

    // The same strings where they reach error lines: a tensor name and an unknown role
    // with escapes, in a group whose kqv_out is duplicated.
    let mut e = base.clone();
    let o = idx(&e, "kqv_out");
    let data = e.data[o].iter().map(|b| b ^ 0x55).collect();
    let n = e.push_copy(o, "kqv_out\n\u{1b}[2JINJECTED-LINE_step_0", data);
    e.set_string(keys::TENSOR_GGML_NAME, n, evil);
    let m = idx(&e, "mask");
    e.set_string(keys::TENSOR_ROLE, m, "mask\n\u{1b}[31mINJECTED-LINE");
    e.tensors[m].name = "src3\u{1b}]0;title\u{7}\nINJECTED-LINE".into();
    add(
        "control_chars_in_error_paths",
        "tensor names and roles with newlines or ANSI escapes in a malformed group",
        &e,
        Expect::Refuse,
    )?;

    Ok(out)
}

/// Format version 2's storage lies (`--kv-storage delta`, docs/trace-format.md,
/// "Storage"), one file per check of the storage keys, derived from an honest version-2
/// trace with at least one delta of two or more changed bytes and a tensor stored whole
/// of another byte length before it. The first case is the honest file itself. Every lie
/// is a file-level contradiction: every command that interprets the trace refuses it.
pub fn delta_cases(honest: &[u8]) -> Result<Vec<Case>, GgufError> {
    let base = Editable::from_bytes(honest)?;
    let mut out = Vec::new();
    let mut add = |name: &'static str, class: &'static str, e: &Editable, expect: Expect| {
        e.to_bytes().map(|bytes| {
            out.push(Case {
                name,
                class,
                bytes,
                expect,
            })
        })
    };
    add(
        "honest_v2",
        "the honest version-2 trace itself",
        &base,
        Expect::Success,
    )?;
    let bases = base.i64s(keys::TENSOR_BASE);
    let counts = base.i64s(keys::TENSOR_N_RANGES);
    let first_range = |i: usize| counts[..i].iter().sum::<i64>() as usize;
    let n_bytes = |e: &Editable, i: usize| -> u64 {
        let ne = e.i64s(keys::TENSOR_NE);
        let ty = GgmlType(e.i64s(keys::TENSOR_TYPE)[i] as u32);
        let n: u64 = ne[4 * i..4 * i + 4].iter().map(|&x| x as u64).product();
        ty.bytes_for(n).unwrap_or(0)
    };
    // A delta whose first range is two bytes or more.
    let d = (0..bases.len())
        .find(|&i| {
            bases[i] >= 0
                && counts[i] > 0
                && base.i64s(keys::TENSOR_RANGES)[2 * first_range(i) + 1] >= 2
        })
        .expect("the honest version-2 trace has a delta of two bytes or more");
    let b = bases[d] as usize;
    let r = 2 * first_range(d);

    let mut e = base.clone();
    let later_whole = (d + 1..bases.len())
        .find(|&j| bases[j] == -1)
        .expect("a tensor stored whole after the delta");
    e.set_int(keys::TENSOR_BASE, d, later_whole as i64);
    add(
        "v2_base_not_earlier",
        "a delta stored against a later tensor",
        &e,
        Expect::Refuse,
    )?;

    let mut e = base.clone();
    e.set_int(keys::TENSOR_BASE, b, d as i64);
    add(
        "v2_base_cycle",
        "two tensors stored against each other (a cycle of bases)",
        &e,
        Expect::Refuse,
    )?;

    let mut e = base.clone();
    e.set_int(keys::TENSOR_BASE, d, bases.len() as i64 + 7);
    add(
        "v2_base_outside_the_table",
        "a base that is no tensor of the table",
        &e,
        Expect::Refuse,
    )?;

    let mut e = base.clone();
    let len = n_bytes(&e, d);
    e.set_int(keys::TENSOR_RANGES, r, len as i64 - 1);
    add(
        "v2_range_outside_the_tensor",
        "a changed range that ends past the tensor's bytes",
        &e,
        Expect::Refuse,
    )?;

    // The first range split in two that overlap by a byte, the data one byte longer.
    let mut e = base.clone();
    if let Some(Array::U64(mut v)) = e.array(keys::TENSOR_RANGES).cloned() {
        let (off, len) = (v[r], v[r + 1]);
        v.splice(r..r + 2, [off, 2, off + 1, len - 1]);
        e.metadata.set(keys::TENSOR_RANGES, Array::U64(v));
    }
    e.set_int(keys::TENSOR_N_RANGES, d, counts[d] + 1);
    let mut data = e.data[d].clone();
    data.insert(1, data[1]);
    let k = data.len() as u64;
    e.reshape(d, [k, 1, 1, 1], data);
    e.tensors[d].dims = vec![k];
    add(
        "v2_ranges_overlap",
        "a delta whose changed ranges overlap",
        &e,
        Expect::Refuse,
    )?;

    let mut e = base.clone();
    let mut data = e.data[d].clone();
    data.push(0);
    e.tensors[d].dims = vec![data.len() as u64];
    e.data[d] = data;
    add(
        "v2_delta_data_length",
        "a delta whose data is not the sum of its ranges",
        &e,
        Expect::Refuse,
    )?;

    let mut e = base.clone();
    let other = (0..d)
        .find(|&j| bases[j] == -1 && n_bytes(&e, j) != n_bytes(&e, d))
        .expect("a tensor stored whole of another byte length before the delta");
    e.set_int(keys::TENSOR_BASE, d, other as i64);
    add(
        "v2_base_other_length",
        "a delta stored against a tensor of another byte length",
        &e,
        Expect::Refuse,
    )?;

    let mut e = base.clone();
    let whole = (0..bases.len()).find(|&j| bases[j] == -1).unwrap_or(0);
    e.set_int(
        keys::TENSOR_NE,
        4 * whole + 1,
        2 * e.i64s(keys::TENSOR_NE)[4 * whole + 1],
    );
    add(
        "v2_whole_shape_contradicted",
        "a tensor stored whole whose recorded ne is not its GGUF shape",
        &e,
        Expect::Refuse,
    )?;

    add(
        "v2_big_endian",
        "a version-2 trace rewritten big-endian (version 2 is little-endian only)",
        &base.to_big_endian(),
        Expect::Refuse,
    )?;
    Ok(out)
}

/// The marker every injected line starts with: a line of output that begins with it
/// means a newline from the file reached the terminal raw.
pub const INJECTED: &str = "INJECTED-LINE";

/// Raw control characters in a tool's output other than newline and tab (ESC, CR, BEL,
/// ...), and lines that start with [`INJECTED`]: what a file's strings must never become.
pub fn raw_controls(output: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(output);
    let mut found = Vec::new();
    if let Some(c) = text
        .chars()
        .find(|&c| c.is_control() && c != '\n' && c != '\t')
    {
        found.push(format!("raw control character {c:?}"));
    }
    if text.lines().any(|l| l.trim_start().starts_with(INJECTED)) {
        found.push(format!("a line starting with {INJECTED} (a raw newline)"));
    }
    found
}

/// An honest synthetic trace of `groups` (step, layer) groups, `n_layer` per step
/// (`groups` is rounded up to whole steps), for the scale test and the fuzzer:
/// `attn_verify::synth`'s honest groups (seeded inputs, outputs computed in f64, so every
/// group verifies), kept tiny (one token, two cells, one head of 4) so that the work per
/// group is the reader's, not the recomputation's.
pub fn synthetic_trace(groups: usize, n_layer: u32) -> Result<Vec<u8>, attn_verify::VerifyError> {
    let n_layer = n_layer.max(1);
    let spec = attn_verify::synth::Spec {
        shapes: trace_format::synth::Shapes {
            head_dim: 4,
            n_tokens: 1,
            n_head: 1,
            n_head_kv: 1,
            n_kv: 2,
            flash: true,
        },
        n_steps: groups.div_ceil(n_layer as usize) as u32,
        n_layer,
        seed: 20_000,
    };
    attn_verify::synth::honest_trace(&spec)
}

/// Interesting integers for mutated counts, dims, strides and labels.
const INTERESTING: [i64; 16] = [
    0,
    1,
    2,
    3,
    4,
    7,
    16,
    255,
    256,
    65_536,
    -1,
    i32::MAX as i64,
    1 << 32,
    (1 << 32) + 4,
    1 << 40,
    1 << 60,
];

/// Reads a fuzzer's bytes as a sequence of small numbers (zero once exhausted).
pub struct Program<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Program<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data, at: 0 }
    }
    pub fn done(&self) -> bool {
        self.at >= self.data.len()
    }
    pub fn byte(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }
    /// An index below `n` (0 when n is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        let v = u16::from_le_bytes([self.byte(), self.byte()]) as usize;
        v % n
    }
    /// An interesting integer, or (one time in 8) eight raw bytes.
    pub fn int(&mut self) -> i64 {
        let b = self.byte();
        if b & 7 == 7 {
            let mut x = [0u8; 8];
            for v in &mut x {
                *v = self.byte();
            }
            i64::from_le_bytes(x)
        } else {
            INTERESTING[(b >> 3) as usize % INTERESTING.len()]
        }
    }
}

/// Apply a fuzzer's program of mutations to a trace (structure-aware: the GGUF stays well
/// formed; what changes is what the `kqv_trace.*` metadata and the tensor table claim).
/// Each step reads an opcode byte and its operands; mutations that the GGUF writer could
/// not write (a tensor of more than 1 MiB of data) are skipped.
pub fn mutate(e: &mut Editable, program: &[u8]) {
    let mut p = Program::new(program);
    let mut steps = 0;
    while !p.done() && steps < 64 {
        steps += 1;
        let n = e.tensors.len();
        match p.byte() % 14 {
            // A tensor's dims (data resized to fit, zeros past the old bytes).
            0 => {
                let i = p.below(n);
                let d = p.below(4);
                let v = p.int() as u64;
                let Some(t) = e.tensors.get(i) else { continue };
                let mut dims = t.dims.clone();
                dims.resize(4, 1);
                dims[d] = v;
                let Some(bytes) = dims
                    .iter()
                    .try_fold(1u64, |a, &x| a.checked_mul(x))
                    .and_then(|n| t.ty.bytes_for(n))
                    .filter(|&b| b <= 1 << 20)
                else {
                    continue;
                };
                e.tensors[i].dims = dims;
                e.data[i].resize(bytes as usize, 0);
            }
            // One nb entry.
            1 => {
                let i = p.below(n);
                let d = p.below(4);
                let v = p.int() as u64;
                if let Some(Array::U64(mut x)) = e.array(keys::TENSOR_NB).cloned() {
                    if let Some(slot) = x.get_mut(4 * i + d) {
                        *slot = v;
                        e.metadata.set(keys::TENSOR_NB, Array::U64(x));
                    }
                }
            }
            // A tensor's layer or step label.
            2 => {
                let i = p.below(n);
                let key = if p.byte() & 1 == 0 {
                    keys::TENSOR_LAYER
                } else {
                    keys::TENSOR_STEP
                };
                let v = p.int();
                if e.array(key).is_some_and(|a| i < a.len()) {
                    e.set_int(key, i, v);
                }
            }
            // A tensor's role.
            3 => {
                let i = p.below(n);
                let r = trace_format::Role::ALL[p.below(trace_format::Role::ALL.len())].name();
                if e.array(keys::TENSOR_ROLE).is_some_and(|a| i < a.len()) {
                    e.set_string(keys::TENSOR_ROLE, i, r);
                }
            }
            // A per-tensor or per-record array one entry shorter or longer.
            4 => {
                let keys_all: Vec<&str> = PER_TENSOR
                    .iter()
                    .map(|(k, _)| *k)
                    .chain(PER_ATTN)
                    .chain([keys::STEP_N_TOKENS, keys::STEP_POSITIONS])
                    .collect();
                let key = keys_all[p.below(keys_all.len())];
                let grow = p.byte() & 1 == 0;
                if let Some(a) = e.array(key).cloned() {
                    let len = a.len();
                    let b = if grow {
                        concat(&a, &slice(&a, 0, 1))
                    } else {
                        slice(&a, 0, len.saturating_sub(1))
                    };
                    e.metadata.set(key, b);
                }
            }
            // A run key.
            5 => {
                let v = p.int();
                match p.below(12) {
                    0 => e.metadata.set(keys::RUN_N_HEAD, Value::U32(v as u32)),
                    1 => e.metadata.set(keys::RUN_N_HEAD, Value::U64(v as u64)),
                    2 => e.metadata.set(keys::RUN_N_HEAD_KV, Value::U32(v as u32)),
                    3 => e.metadata.set(keys::RUN_N_LAYER, Value::U32(v as u32)),
                    4 => e.metadata.set(keys::FORMAT_VERSION, Value::U32(v as u32)),
                    5 => e.metadata.set(keys::TARGET_LAYER, Value::I32(v as i32)),
                    6 => e
                        .metadata
                        .set(keys::RUN_MIXED_KV_CACHE, Value::Bool(v & 1 == 1)),
                    7 => e
                        .metadata
                        .set(keys::RUN_KV_ROTATION, Value::Bool(v & 1 == 1)),
                    8 => e.metadata.set(
                        keys::RUN_FLASH_ATTN,
                        ["on", "off", "auto", ""][(v & 3) as usize],
                    ),
                    9 => e.metadata.set(
                        keys::RUN_CACHE_TYPE_K,
                        ["f16", "q8_0", "q4_0", "bf16"][(v & 3) as usize],
                    ),
                    10 => e.metadata.set(
                        keys::RUN_CACHE_TYPE_V,
                        ["f16", "q8_0", "q4_0", "f32"][(v & 3) as usize],
                    ),
                    _ => e.metadata.set(keys::TENSOR_COUNT, Value::I32(v as i32)),
                }
            }
            // Duplicate a tensor, with its data perturbed.
            6 => {
                let i = p.below(n);
                if i < n && n < 4096 {
                    let flip = p.byte();
                    let data = e.data[i].iter().map(|b| b ^ flip).collect();
                    let name = format!("dup{}_{}", n, e.tensors[i].name);
                    let name: String = name.chars().take(63).collect();
                    e.push_copy(i, &name, data);
                }
            }
            // Duplicate an attention record with another scale.
            7 => {
                let len = e.array(keys::ATTN_STEP).map_or(0, Array::len);
                let i = p.below(len);
                let scale =
                    f32::from_bits(u32::from_le_bytes([p.byte(), p.byte(), p.byte(), p.byte()]));
                if i < len {
                    e.push_attn_copy(i, scale);
                }
            }
            // An attention parameter.
            8 => {
                let key = [keys::ATTN_SCALE, keys::ATTN_MAX_BIAS, keys::ATTN_SOFTCAP][p.below(3)];
                let i = p.below(64);
                let v = [0.0, -1.0, 1e30, f32::NAN, f32::INFINITY, 0.125, 8.0, -0.0][p.below(8)];
                if let Some(Array::F32(mut x)) = e.array(key).cloned() {
                    if let Some(slot) = x.get_mut(i) {
                        *slot = v;
                        e.metadata.set(key, Array::F32(x));
                    }
                }
            }
            // A step's token count, or an attention record's step/layer.
            9 => {
                let key = [keys::STEP_N_TOKENS, keys::ATTN_STEP, keys::ATTN_LAYER][p.below(3)];
                let i = p.below(64);
                let v = p.int();
                if e.array(key).is_some_and(|a| i < a.len()) {
                    e.set_int(key, i, v);
                }
            }
            // A tensor's type (data resized to the new type's size).
            10 => {
                let i = p.below(n);
                let ty = [
                    GgmlType::F32,
                    GgmlType::F16,
                    GgmlType::Q8_0,
                    GgmlType::Q4_0,
                    GgmlType::BF16,
                    GgmlType::I32,
                ][p.below(6)];
                let Some(t) = e.tensors.get(i) else { continue };
                let count = t.dims.iter().try_fold(1u64, |a, &x| a.checked_mul(x));
                let Some(bytes) = count
                    .and_then(|c| ty.bytes_for(c))
                    .filter(|&b| b <= 1 << 20)
                else {
                    continue;
                };
                e.tensors[i].ty = ty;
                e.data[i].resize(bytes as usize, 0);
            }
            // Tensor data: one byte, or a run of bytes set to a pattern (NaN, inf, ...).
            11 => {
                let i = p.below(n);
                let at = p.below(1 << 16);
                let v = p.byte();
                let run = p.below(256);
                if let Some(d) = e.data.get_mut(i) {
                    let len = d.len();
                    if len > 0 {
                        for b in d.iter_mut().skip(at % len).take(run + 1) {
                            *b = v;
                        }
                    }
                }
            }
            // A string: ggml name, op, view_of or a run string, to hostile text.
            12 => {
                let i = p.below(n);
                let s = [
                    "",
                    "\n",
                    "\u{1b}[2J",
                    "x\ny",
                    "\u{0}",
                    "FLASH_ATTN_EXT",
                    "SOFT_MAX",
                ][p.below(7)];
                match p.below(4) {
                    0 => e.set_string(keys::TENSOR_GGML_NAME, i, s),
                    1 => e.set_string(keys::TENSOR_OP, i, s),
                    2 => e.set_string(keys::TENSOR_VIEW_OF, i, s),
                    _ => e.metadata.set(keys::RUN_MODEL_PATH, s),
                }
            }
            // Remove a tensor (its table entry and data; the arrays keep their length).
            _ => {
                let i = p.below(n);
                if i < n && n > 1 {
                    e.tensors.remove(i);
                    e.data.remove(i);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_controls_finds_escapes_and_injected_lines() {
        assert!(raw_controls(b"ok\n\tfine\n").is_empty());
        assert_eq!(raw_controls(b"a \x1b[31m b").len(), 1);
        assert_eq!(raw_controls(b"x\nINJECTED-LINE y\n").len(), 1);
        assert!(raw_controls(b"x \\nINJECTED-LINE y\n").is_empty());
    }

    #[test]
    fn synthetic_trace_has_six_tensors_per_group() {
        let bytes = synthetic_trace(12, 4).unwrap();
        let e = Editable::from_bytes(&bytes).unwrap();
        assert_eq!(e.tensors.len(), 72);
        assert_eq!(e.find("kqv_out", 2, 1), Some(54));
    }

    #[test]
    fn mutations_keep_the_gguf_well_formed_and_change_the_trace() {
        let base = Editable::from_bytes(&synthetic_trace(6, 2).unwrap()).unwrap();
        let original = base.to_bytes().unwrap();
        let mut rng = Rng::new(7);
        let mut changed = 0;
        for _ in 0..300 {
            let len = 1 + rng.below(48) as usize;
            let program = rng.bytes(len);
            let mut e = base.clone();
            mutate(&mut e, &program);
            // Whatever the writer accepts, the reader reads back as written.
            if let Ok(bytes) = e.to_bytes() {
                let f = GgufFile::from_bytes(bytes.clone()).unwrap();
                assert_eq!(f.tensors().len(), e.tensors.len());
                changed += usize::from(bytes != original);
            }
        }
        assert!(
            changed > 250,
            "only {changed} of 300 programs changed the trace"
        );
    }
}
