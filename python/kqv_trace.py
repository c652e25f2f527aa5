"""Read a kv-cache-monitor trace (``kqv-trace-monitor --save-gguf``) from Python.

One file, on gguf-py (PyPI ``gguf``) and numpy only: put this directory on the path
(``PYTHONPATH=python``) or copy the file next to your script.

    import kqv_trace
    t = kqv_trace.open("trace.gguf")
    k = t.tensor("k", 0, 3)          # role, layer, step -> numpy array, logical layout

Both storages read the same (docs/trace-format.md, "Storage"): format version 1
(``--kv-storage full``: every GGUF tensor is the traced tensor) and version 2 (the
default, ``--kv-storage delta``: a tensor is stored whole or as the byte ranges that
changed against an earlier one). A version-2 delta is rebuilt on demand, iteratively
(a chain of any length), keeping the last tensor rebuilt per (layer, role): reading a
stream step after step, as ``Trace.stream`` does, applies one step's changes each time
(as ``TraceFile::data`` in crates/trace-format/src/stored.rs does).

Arrays
------
Every array has the tensor's logical layout in gguf-py's convention: the shape is
ggml's ``ne`` reversed, always four dimensions, ``(ne3, ne2, ne1, ne0)``, so element
``(i0, i1, i2, i3)`` of ggml is ``a[i3, i2, i1, i0]`` (use ``np.squeeze`` to drop the
ones). The strides the tensor had in ggml (``nb``, a permuted K view, a transposed V
view) are metadata only (``TensorInfo.nb``); the data is contiguous.

- F32 and F16 tensors come back as float32 / float16, whatever ``dequantize`` says.
- Quantized tensors (q8_0, q4_0, ... and bf16) come back dequantized to float32 with
  ``gguf.quants.dequantize`` when ``dequantize=True`` (the default), else as their raw
  blocks: uint8 of shape ``(ne3, ne2, ne1, ne0 / block_size * type_size)``, gguf-py's
  byte shape.
- Integer tensors come back as their numpy integer type.

An array may be a read-only view into the memory-mapped file (a tensor stored whole,
not dequantized): ``.copy()`` it to write. Rebuilt deltas are fresh arrays.

Errors
------
``open`` checks what a hostile or damaged file could get wrong before anything is read
from it, as the Rust reader does: per-tensor arrays of the wrong length or type, a
format version other than 1 or 2, and for version 2 the storage keys (every base an
earlier tensor of the same byte length, ranges sorted, disjoint, not empty, inside the
tensor, a delta's data the sum of its ranges, a whole tensor's GGUF type and shape its
recorded ones, version 2 little-endian only). Each contradiction raises ``ValueError``
with a one-line message naming the tensor; a file gguf-py cannot parse raises
``ValueError`` too. Looking up a tensor the trace does not have raises ``KeyError``.

Not read: traces written before ``kqv_trace.tensor.role`` (the seed tools'), which the
Rust reader infers from tensor names; read those with ``gguf.GGUFReader`` directly.
"""

from __future__ import annotations

import os
from typing import Iterator, NamedTuple, Optional, Union

import numpy as np
import gguf
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFEndian, GGUFValueType

__all__ = ["open", "Trace", "TensorInfo", "Step"]

_P = "kqv_trace."

# numpy types for the ggml types numpy has (the rest are blocks of bytes).
_NATIVE = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}

_INTS = {
    GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
    GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64,
}


class TensorInfo(NamedTuple):
    """One tensor of the trace's GGUF tensor table (its ``kqv_trace.tensor.*`` entries)."""

    index: int  #: position in the GGUF tensor table (``TracedTensor::index`` in Rust)
    name: str  #: GGUF tensor name (``kqv_out_kqv_out-0_step_3``)
    step: int
    layer: int  #: -1 for logits
    role: str  #: ``kqv_out``, ``attn``, ``q``, ``k``, ``v``, ``mask``, ``logits``, ...
    ggml_name: str  #: the ggml name, unshortened
    op: str  #: the ggml op that made it (``PERMUTE``, ``FLASH_ATTN_EXT``, ...)
    view_of: str  #: the tensor it was a view of, or ""
    type: GGMLQuantizationType  #: the type of its logical data
    ne: tuple  #: ggml's ne, four entries, fastest first
    nb: tuple  #: the byte strides it had in ggml (metadata: the data is contiguous)
    stored: str  #: ``whole``, ``delta`` (changed ranges) or ``same`` (bytes of ``base``)
    base: int  #: the table index it is stored against, -1 when stored whole
    n_ranges: int  #: changed byte ranges of a delta (0 otherwise)
    #: position in its step's graph of the node it was read at (``kqv_trace.tensor.graph_order``);
    #: -1 when unknown (logits, older traces)
    graph_order: int = -1

    @property
    def shape(self) -> tuple:
        """The numpy shape of its values: ``(ne3, ne2, ne1, ne0)``."""
        return tuple(reversed(self.ne))

    @property
    def n_bytes(self) -> int:
        """Bytes of its logical data."""
        n = _n_bytes(self.type, self.ne)
        assert n is not None  # checked on open
        return n


class Step(NamedTuple):
    """One step (``kqv_trace.step.*``): one ``llama_decode`` call."""

    step: int
    positions: list
    tokens: list
    sampled: Optional[int]  #: the sampler's choice from its output, None where it did not choose


def _n_bytes(ty: GGMLQuantizationType, ne) -> Optional[int]:
    size = GGML_QUANT_SIZES.get(ty)
    if size is None:
        return None
    blck, tsize = size
    n = 1
    for x in ne:
        n *= int(x)
    if n % blck:
        return None
    return n // blck * tsize


def _ggml_type(v: int) -> Optional[GGMLQuantizationType]:
    try:
        return GGMLQuantizationType(v)
    except ValueError:
        return None


def open(path: Union[str, os.PathLike]) -> "Trace":  # noqa: A001 (the module's one-line entry)
    """Open the trace at ``path`` (``ValueError`` if it is not a trace this module can read)."""
    return Trace(path)


class Trace:
    """An open trace. Attributes:

    - ``path``, ``reader`` (the ``gguf.GGUFReader``), ``format_version`` (1 or 2),
      ``complete`` (False when the run was interrupted);
    - ``tensors``: every tensor of the table as a ``TensorInfo``, in table order (logits
      rows included, role ``logits``, layer -1);
    - ``run``: the run's metadata, ``kqv_trace.run.*`` without the prefix, as a dict
      (arrays as lists);
    - ``steps``: per step a ``Step`` (positions, tokens, the sampled token);
    - ``sampled``: per step the token the sampler chose, or None.

    ``metadata()`` gives every key of the file as a dict.
    """

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = os.fspath(path)
        try:
            r = gguf.GGUFReader(self.path)
        except OSError:
            raise
        except Exception as e:  # gguf-py's own parse errors (ValueError, KeyError, ...)
            raise ValueError(f"{self.path}: not a GGUF file gguf-py can read: {e}") from None
        self.reader = r
        self._fields = r.fields
        self._little = r.endianess == GGUFEndian.LITTLE
        n = len(r.tensors)
        names = [t.name for t in r.tensors]
        self._names = names

        if _P + "tensor.role" not in self._fields:
            raise ValueError(
                f"{self.path}: no kqv_trace.tensor.role: not a kv-cache-monitor trace with "
                "per-tensor metadata (seed-tool traces: read them with gguf.GGUFReader)"
            )
        fv = self._scalar(_P + "format_version")
        if fv is None:
            raise ValueError(f"{self.path}: kqv_trace.format_version missing (it is 1 or 2)")
        if fv not in (1, 2):
            raise ValueError(f"{self.path}: kqv_trace.format_version is {fv}: only 1 and 2 exist")
        self.format_version = int(fv)
        c = self._scalar(_P + "complete")
        self.complete = True if c is None else bool(c)

        role = self._strings(_P + "tensor.role", n, "tensors")
        layer = self._ints(_P + "tensor.layer", n, "tensors")
        step = self._ints(_P + "tensor.step", n, "tensors")
        ggml_name = self._strings(_P + "tensor.ggml_name", n, "tensors")
        op = self._strings(_P + "tensor.op", n, "tensors")
        view_of = self._strings(_P + "tensor.view_of", n, "tensors")
        nb = self._ints(_P + "tensor.nb", 4 * n, "dims (4 per tensor)")
        graph_order = self._ints(_P + "tensor.graph_order", n, "tensors", missing_ok=True) or [-1] * n

        if self.format_version == 2:
            self._parse_storage(n)
        else:
            self._base = [-1] * n
            self._n_ranges = [0] * n
            self._first = [0] * n
            self._ranges = []
            self._logical = []
            for i, t in enumerate(r.tensors):
                dims = [int(x) for x in t.shape]
                if len(dims) > 4:
                    raise ValueError(f"{self._tname(i)}: {len(dims)} dimensions, a trace has at most 4")
                self._logical.append((t.tensor_type, tuple(dims + [1] * (4 - len(dims)))))

        self._canonical = []
        for i in range(n):
            b = self._base[i]
            self._canonical.append(self._canonical[b] if b >= 0 and self._n_ranges[i] == 0 else i)

        self.tensors = []
        self._index = {}
        self._stream = []
        streams: dict = {}
        for i in range(n):
            ty, ne = self._logical[i]
            b = self._base[i]
            stored = "whole" if b < 0 else ("delta" if self._n_ranges[i] else "same")
            info = TensorInfo(
                i, names[i], step[i], layer[i], role[i], ggml_name[i], op[i], view_of[i],
                ty, ne, tuple(nb[4 * i:4 * i + 4]), stored, b, self._n_ranges[i], graph_order[i],
            )
            self.tensors.append(info)
            self._index.setdefault((role[i], layer[i], step[i]), i)  # the first, as Rust's find
            self._stream.append(streams.setdefault((layer[i], role[i]), len(streams)))
        self._cache: dict = {}
        #: Deltas applied so far while rebuilding (to see what reading costs).
        self.deltas_applied = 0

        self.run = {
            k[len(_P + "run."):]: f.contents()
            for k, f in self._fields.items()
            if k.startswith(_P + "run.")
        }
        self.steps = self._parse_steps()
        self.sampled = [s.sampled for s in self.steps]

    # -- metadata -------------------------------------------------------------------------

    def metadata(self) -> dict:
        """Every metadata key of the file and its value (arrays as lists)."""
        return {k: f.contents() for k, f in self._fields.items()}

    def _tname(self, i: int) -> str:
        return f"{self.path}: tensor #{i} ({self._names[i]!r})"

    def _scalar(self, key: str):
        f = self._fields.get(key)
        if f is None:
            return None
        if not f.types or f.types[0] in (GGUFValueType.ARRAY, GGUFValueType.STRING):
            raise ValueError(f"{self.path}: {key} is not a scalar")
        return f.contents()

    def _array(self, key: str):
        """(element type or None when empty, field) of an array key; ValueError if not one."""
        f = self._fields.get(key)
        if f is None:
            return None, None
        if not f.types or f.types[0] != GGUFValueType.ARRAY:
            raise ValueError(f"{self.path}: {key} is not an array")
        sub = f.types[-1] if len(f.types) > 1 else None
        if sub == GGUFValueType.ARRAY:
            raise ValueError(f"{self.path}: {key} is an array of arrays")
        return sub, f

    def _ints(self, key: str, want: Optional[int], what: str, exact=None, missing_ok=False):
        """An integer array as Python ints (exact for 64-bit values), of `want` entries."""
        sub, f = self._array(key)
        if f is None:
            if missing_ok:
                return None
            raise ValueError(f"{self.path}: {key} missing")
        if sub is None:
            vals = []
        else:
            if exact is not None and sub != exact:
                raise ValueError(f"{self.path}: {key} is not an array of {exact.name.lower()}")
            if sub not in _INTS:
                raise ValueError(f"{self.path}: {key} is an array of {sub.name.lower()}, not integers")
            vals = np.concatenate([f.parts[j] for j in f.data]).tolist()
        if want is not None and len(vals) != want:
            raise ValueError(f"{self.path}: {key} has {len(vals)} entries for {want} {what}")
        return vals

    def _strings(self, key: str, want: int, what: str):
        sub, f = self._array(key)
        if f is None:
            raise ValueError(f"{self.path}: {key} missing")
        if sub is not None and sub != GGUFValueType.STRING:
            raise ValueError(f"{self.path}: {key} is an array of {sub.name.lower()}, not strings")
        vals = [bytes(f.parts[j]).decode("utf-8", "replace") for j in f.data]
        if len(vals) != want:
            raise ValueError(f"{self.path}: {key} has {len(vals)} entries for {want} {what}")
        return vals

    def _parse_steps(self) -> list:
        n_tokens = self._ints(_P + "step.n_tokens", None, "", missing_ok=True) or []
        positions = self._ints(_P + "step.positions", None, "", missing_ok=True) or []
        tokens = self._ints(_P + "step.tokens", None, "", missing_ok=True) or []
        sampled = self._ints(_P + "step.sampled", None, "", missing_ok=True)
        total = sum(n_tokens)
        if len(positions) != total or len(tokens) != total:
            raise ValueError(
                f"{self.path}: kqv_trace.step.n_tokens adds up to {total} tokens, but positions "
                f"has {len(positions)} and tokens {len(tokens)}"
            )
        if sampled is not None and len(sampled) != len(n_tokens):
            raise ValueError(
                f"{self.path}: kqv_trace.step.sampled has {len(sampled)} entries for "
                f"{len(n_tokens)} steps"
            )
        out, at = [], 0
        for s, k in enumerate(n_tokens):
            chose = None if sampled is None or sampled[s] < 0 else sampled[s]
            out.append(Step(s, positions[at:at + k], tokens[at:at + k], chose))
            at += k
        return out

    # -- version 2's storage --------------------------------------------------------------

    def _parse_storage(self, n: int) -> None:
        """Read and check the storage keys (as trace_format's Storage::parse does)."""
        if not self._little:
            raise ValueError(f"{self.path}: a big-endian file: format version 2 is little-endian only")
        types = self._ints(_P + "tensor.type", n, "tensors", exact=GGUFValueType.UINT32)
        nes = self._ints(_P + "tensor.ne", 4 * n, "dims (4 per tensor)", exact=GGUFValueType.UINT64)
        bases = self._ints(_P + "tensor.base", n, "tensors", exact=GGUFValueType.INT32)
        counts = self._ints(_P + "tensor.n_ranges", n, "tensors", exact=GGUFValueType.UINT32)
        ranges = self._ints(_P + "tensor.ranges", None, "", exact=GGUFValueType.UINT64)
        total = sum(counts)
        if len(ranges) != 2 * total:
            raise ValueError(
                f"{self.path}: kqv_trace.tensor.ranges has {len(ranges)} entries for {total} "
                "ranges (kqv_trace.tensor.n_ranges says; 2 per range)"
            )
        for i, b in enumerate(bases):
            if b < -1 or b >= n:
                raise ValueError(f"{self._tname(i)}: base {b} is no tensor of the table")
        for i, b in enumerate(bases):
            if b >= i:
                # A cycle or a later base: say which (a walk of at most n steps).
                j, seen = b, 0
                while j >= 0 and j != i and seen <= n:
                    j, seen = bases[j], seen + 1
                if j == i:
                    raise ValueError(
                        f"{self._tname(i)}: its bases lead back to it (a cycle): a chain must "
                        "end at a tensor stored whole"
                    )
                raise ValueError(f"{self._tname(i)}: base {b} is not an earlier tensor (a base comes first)")

        infos = self.reader.tensors
        logical, n_bytes, first = [], [], []
        at = 0
        for i in range(n):
            ty = _ggml_type(types[i])
            ne = tuple(nes[4 * i:4 * i + 4])
            nbytes = None if ty is None else _n_bytes(ty, ne)
            if nbytes is None:
                raise ValueError(
                    f"{self._tname(i)}: type {types[i]} and ne {list(ne)} (kqv_trace.tensor.type / "
                    "kqv_trace.tensor.ne) have no byte size"
                )
            info = infos[i]
            c = counts[i]
            own = ranges[2 * at:2 * (at + c)]
            dims = [int(x) for x in info.shape]
            if bases[i] == -1:
                padded = tuple(dims + [1] * (4 - len(dims)))
                if info.tensor_type != ty or len(dims) > 4 or padded != ne:
                    raise ValueError(
                        f"{self._tname(i)}: stored whole as {info.tensor_type.name.lower()} {dims}, "
                        f"but recorded as {ty.name.lower()} {list(ne)}"
                    )
                if c:
                    raise ValueError(f"{self._tname(i)}: stored whole, with {c} changed ranges")
            else:
                b = bases[i]
                if n_bytes[b] != nbytes:
                    raise ValueError(
                        f"{self._tname(i)}: {nbytes} bytes, stored against tensor #{b} "
                        f"({self._names[b]!r}) of another byte length, {n_bytes[b]}"
                    )
                if info.tensor_type != GGMLQuantizationType.I8 or len(dims) != 1:
                    raise ValueError(
                        f"{self._tname(i)}: a delta stored as {info.tensor_type.name.lower()} "
                        f"{dims}, not the 1-D i8 of its changed bytes"
                    )
                end = total_len = 0
                for k in range(c):
                    off, ln = own[2 * k], own[2 * k + 1]
                    if off + ln > nbytes:
                        raise ValueError(
                            f"{self._tname(i)}: range {k} ({off}, {ln}) outside the tensor's "
                            f"{nbytes} bytes"
                        )
                    if ln == 0 or off < end:
                        raise ValueError(
                            f"{self._tname(i)}: range {k} ({off}, {ln}) empty, overlapping or out "
                            "of order (ranges are sorted, disjoint, not empty)"
                        )
                    end = off + ln
                    total_len += ln
                if info.n_bytes != max(total_len, 1):
                    raise ValueError(
                        f"{self._tname(i)}: {info.n_bytes} bytes of delta data for ranges of "
                        f"{total_len} bytes" + (" (stored as 1 byte)" if total_len == 0 else "")
                    )
            logical.append((ty, ne))
            n_bytes.append(nbytes)
            first.append(at)
            at += c
        self._base = bases
        self._n_ranges = counts
        self._first = first
        self._ranges = ranges
        self._logical = logical

    def _file_bytes(self, i: int) -> np.ndarray:
        """The bytes GGUF tensor i holds, as a flat uint8 view of the file."""
        return self.reader.tensors[i].data.reshape(-1).view(np.uint8)

    def _apply(self, i: int, buf: np.ndarray) -> None:
        src = self._file_bytes(i)
        pos = 0
        r, f = self._ranges, self._first[i]
        for k in range(f, f + self._n_ranges[i]):
            off, ln = r[2 * k], r[2 * k + 1]
            buf[off:off + ln] = src[pos:pos + ln]  # checked on open: inside, the data their sum
            pos += ln
        self.deltas_applied += 1

    # -- data -----------------------------------------------------------------------------

    def _resolve(self, key) -> int:
        if isinstance(key, TensorInfo):
            return key.index
        if isinstance(key, tuple):
            info = self.find(*key)
            if info is None:
                raise KeyError(f"no tensor of (role, layer, step) {key} in {self.path}")
            return info.index
        i = int(key)
        if not 0 <= i < len(self.tensors):
            raise KeyError(f"no tensor #{i} in {self.path} ({len(self.tensors)} tensors)")
        return i

    def find(self, role: str, layer: int, step: int) -> Optional[TensorInfo]:
        """The tensor of (role, layer, step), or None; the first when the file has several."""
        i = self._index.get((role, int(layer), int(step)))
        return None if i is None else self.tensors[i]

    def data(self, key) -> np.ndarray:
        """A tensor's logical bytes (its values in logical contiguous order, ne0 fastest, in
        its own type), as a flat uint8 array: a view of the file for a tensor stored whole,
        rebuilt for a delta. ``key``: table index, ``TensorInfo`` or (role, layer, step)."""
        i = self._resolve(key)
        c = self._canonical[i]
        if self._base[c] < 0:
            return self._file_bytes(c)
        skey = self._stream[i]
        cached = self._cache.get(skey)
        if cached is not None and cached[0] == c:
            return cached[1].copy()
        # Back from c to the cached tensor of this stream or one stored whole: no recursion.
        path, j = [], c
        while not (cached is not None and j == cached[0]) and self._base[j] >= 0:
            path.append(j)
            j = self._base[j]
        if cached is not None and j == cached[0]:
            buf = cached[1]
        else:
            buf = self._file_bytes(j).copy()
        for k in reversed(path):
            self._apply(k, buf)
        self._cache[skey] = (c, buf)
        return buf.copy()

    def array(self, key, dequantize: bool = True) -> np.ndarray:
        """A tensor's values as a numpy array of shape ``(ne3, ne2, ne1, ne0)`` (module doc,
        "Arrays"). ``key``: table index, ``TensorInfo`` or (role, layer, step)."""
        info = self.tensors[self._resolve(key)]
        raw = self.data(info.index)
        ty, shape = info.type, info.shape
        native = _NATIVE.get(ty)
        if native is not None:
            dt = np.dtype(native).newbyteorder("<" if self._little else ">")
            return raw.view(dt).reshape(shape)
        blck, tsize = GGML_QUANT_SIZES[ty]
        if shape[-1] % blck:
            raise ValueError(
                f"{self._tname(info.index)}: {ty.name} rows of {shape[-1]} values are not whole "
                f"blocks of {blck}"
            )
        blocks = raw.reshape(shape[:-1] + (shape[-1] // blck * tsize,))
        if not dequantize:
            return blocks
        if blocks.size == 0:  # an empty cold store of the mixed cache (gguf-py cannot)
            return np.zeros(shape, dtype=np.float32)
        return gguf.quants.dequantize(blocks, ty)

    def tensor(self, role: str, layer: int, step: int, dequantize: bool = True) -> np.ndarray:
        """``array`` of the tensor of (role, layer, step); ``KeyError`` if the trace has none."""
        return self.array((role, layer, step), dequantize)

    def logits(self, step: int) -> np.ndarray:
        """The step's output logits (``--logits``) as a 1-D float32 array of n_vocab."""
        return self.array(("logits", -1, step)).reshape(-1)

    def stream(self, role: str, layer: int, dequantize: bool = True) -> Iterator:
        """(``TensorInfo``, array) for every step of one (role, layer), in table (step)
        order; each step of a version-2 trace costs its own changes."""
        for info in self.tensors:
            if info.role == role and info.layer == layer:
                yield info, self.array(info.index, dequantize)

    def __len__(self) -> int:
        return len(self.tensors)

    def __repr__(self) -> str:
        return (
            f"<kqv_trace.Trace {self.path!r}: version {self.format_version}, "
            f"{len(self.steps)} steps, {len(self.tensors)} tensors>"
        )
