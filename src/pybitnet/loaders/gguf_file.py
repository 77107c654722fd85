"""Our own GGUF container reader and writer (docs/formats.md).

Why our own: gguf-py raises on bitnet.cpp's I2_S (ggml type 36) before it returns even the
metadata. This module knows only the container: header, typed key/value metadata, tensor infos,
alignment and data offsets. What the tensors mean is `loaders/gguf.py`'s job; how ternary payloads
are packed is `quant/i2s.py` and `quant/tq.py`'s.

Layering: a byte format, below the loaders. It imports only the error types, quant/'s sizes and
third-party libraries, never the model, tokenizer or command line (which may all import it).

The reader memory-maps the file and validates every count, length and offset against the file
size before it trusts it, so a corrupt or hostile file raises GGUFError (naming the key, tensor or
byte offset) instead of allocating gigabytes, looping for ever or reading past the end.
"""

from __future__ import annotations

import enum
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import gguf
import numpy as np

from ..errors import GGUFError
from ..quant.i2s import i2s_nbytes

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # v2 and v3 share the little-endian layout; v1 used 32-bit counts
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 8  # nested arrays deeper than this are surely corrupt; bounds the recursion


class ValueType(enum.IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# little-endian numpy dtypes of the fixed-size scalar value types
_SCALAR_DTYPES: dict[ValueType, np.dtype] = {
    ValueType.UINT8: np.dtype("<u1"),
    ValueType.INT8: np.dtype("<i1"),
    ValueType.UINT16: np.dtype("<u2"),
    ValueType.INT16: np.dtype("<i2"),
    ValueType.UINT32: np.dtype("<u4"),
    ValueType.INT32: np.dtype("<i4"),
    ValueType.FLOAT32: np.dtype("<f4"),
    ValueType.BOOL: np.dtype("<u1"),
    ValueType.UINT64: np.dtype("<u8"),
    ValueType.INT64: np.dtype("<i8"),
    ValueType.FLOAT64: np.dtype("<f8"),
}


@dataclass(frozen=True)
class GGUFValue:
    """One metadata value with its on-disk type (arrays also carry their element type)."""

    type: ValueType
    value: Any  # python scalar, str, or list (nested lists for arrays of arrays)
    elem_type: ValueType | None = None


@dataclass(frozen=True)
class GGMLType:
    id: int
    name: str
    block_size: int  # elements per block along ne0
    type_size: int  # bytes per block

    def nbytes(self, n_elements: int) -> int:
        if self.id == I2_S_TYPE_ID:
            return i2s_nbytes(n_elements)
        return n_elements // self.block_size * self.type_size


I2_S_TYPE_ID = 36  # bitnet.cpp fork only (docs/formats.md); unknown to mainline ggml and gguf-py
# Ids that bitnet.cpp's fork gives a meaning mainline does not know; named so the error says why.
_UNSUPPORTED_FORK_TYPES = {37: "I8_S (bitnet.cpp activation type)", 38: "TL1 (bitnet.cpp lookup-table layout)"}


def _build_type_table() -> dict[int, GGMLType]:
    table = {
        int(t): GGMLType(int(t), t.name, *gguf.GGML_QUANT_SIZES[t])
        for t in gguf.GGMLQuantizationType
        if t in gguf.GGML_QUANT_SIZES
    }
    table[I2_S_TYPE_ID] = GGMLType(I2_S_TYPE_ID, "I2_S", 128, 32)  # block facts used only for ne0 checks
    return table


GGML_TYPES: dict[int, GGMLType] = _build_type_table()
TYPE_BY_NAME: dict[str, GGMLType] = {t.name: t for t in GGML_TYPES.values()}


def ggml_type(type_id: int, tensor_name: str = "?") -> GGMLType:
    """The GGMLType of `type_id`; GGUFError naming the tensor when the id is unknown or unsupported."""
    if type_id in GGML_TYPES:
        return GGML_TYPES[type_id]
    why = _UNSUPPORTED_FORK_TYPES.get(type_id, "unknown ggml type")
    raise GGUFError(f"tensor {tensor_name!r} has ggml type {type_id}: {why}, not supported")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]  # GGUF order, ne0 (fastest) first
    type: GGMLType
    offset: int  # relative to the data section
    data_offset: int  # absolute position in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy/PyTorch order: a weight with ne [in, out] has shape (out, in)."""
        return tuple(reversed(self.ne))

    @property
    def n_elements(self) -> int:
        return math.prod(self.ne)


class _Cursor:
    """Bounds-checked little-endian reads from a buffer; every failure names what and where."""

    def __init__(self, buf: mmap.mmap | bytes, path: str) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.path = path

    def need(self, nbytes: int, what: str) -> None:
        if nbytes < 0 or self.pos + nbytes > self.size:
            raise GGUFError(
                f"{self.path}: truncated file: {what} needs {nbytes} bytes at offset {self.pos}, "
                f"file has {self.size} bytes"
            )

    def unpack(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value[0] if len(value) == 1 else value

    def string(self, what: str) -> str:
        length = self.unpack("<Q", f"length of {what}")
        self.need(length, what)
        raw = bytes(self.buf[self.pos : self.pos + length])
        self.pos += length
        # surrogateescape: tolerate (and round-trip) vocabularies with bytes that are not UTF-8
        return raw.decode("utf-8", errors="surrogateescape")

    def array(self, dtype: np.dtype, count: int, what: str) -> np.ndarray:
        self.need(count * dtype.itemsize, what)
        arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += count * dtype.itemsize
        return arr


def _value_type(raw: int, what: str, offset: int) -> ValueType:
    try:
        return ValueType(raw)
    except ValueError:
        raise GGUFError(f"{what}: unknown GGUF value type {raw} at offset {offset}") from None


def _read_value(cur: _Cursor, vtype: ValueType, key: str, depth: int = 0) -> GGUFValue:
    if vtype == ValueType.STRING:
        return GGUFValue(vtype, cur.string(f"string value of {key!r}"))
    if vtype == ValueType.ARRAY:
        if depth >= MAX_ARRAY_DEPTH:
            raise GGUFError(f"{cur.path}: key {key!r}: arrays nested deeper than {MAX_ARRAY_DEPTH} at offset {cur.pos}")
        at = cur.pos
        elem = _value_type(cur.unpack("<I", f"array type of {key!r}"), f"{cur.path}: key {key!r}", at)
        count = cur.unpack("<Q", f"array length of {key!r}")
        if elem in _SCALAR_DTYPES:
            arr = cur.array(_SCALAR_DTYPES[elem], count, f"{count} array elements of {key!r}")
            values = arr.astype(bool).tolist() if elem == ValueType.BOOL else arr.tolist()
            return GGUFValue(vtype, values, elem)
        # strings and nested arrays: each element takes at least 8 bytes (a u64 length), so a
        # count that cannot fit in the rest of the file is rejected before any looping
        cur.need(count * 8, f"{count} array elements of {key!r}")
        values = [_read_value(cur, elem, key, depth + 1).value for _ in range(count)]
        return GGUFValue(vtype, values, elem)
    dtype = _SCALAR_DTYPES[vtype]
    value = cur.array(dtype, 1, f"value of {key!r}")[0].item()
    return GGUFValue(vtype, bool(value) if vtype == ValueType.BOOL else value)


class GGUFReader:
    """A memory-mapped GGUF file: `fields` (key -> GGUFValue), `tensors` (name -> TensorInfo)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        try:
            with open(self.path, "rb") as f:
                self.file_size = os.fstat(f.fileno()).st_size
                if self.file_size < 4:
                    raise GGUFError(f"{self.path}: truncated file: {self.file_size} bytes, no GGUF header")
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as err:
            raise GGUFError(f"{self.path}: cannot open GGUF file: {err}") from None
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    # -- parsing -------------------------------------------------------------------------------
    def _parse(self) -> None:
        cur = _Cursor(self._mm, self.path)
        magic = bytes(self._mm[:4])
        if magic != GGUF_MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file: magic {magic!r} at offset 0, expected {GGUF_MAGIC!r}")
        cur.pos = 4
        self.version = cur.unpack("<I", "version")
        if self.version not in SUPPORTED_VERSIONS:
            raise GGUFError(
                f"{self.path}: unsupported GGUF version {self.version} at offset 4 "
                f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))})"
            )
        n_tensors, n_kv = cur.unpack("<QQ", "tensor and key/value counts")
        # every KV pair takes >= 12 bytes and every tensor info >= 24: reject impossible counts now
        cur.need(n_kv * 12 + n_tensors * 24, f"{n_kv} key/value pairs and {n_tensors} tensor infos")

        self.fields: dict[str, GGUFValue] = {}
        for _ in range(n_kv):
            at = cur.pos
            key = cur.string("metadata key")
            if key in self.fields:
                raise GGUFError(f"{self.path}: duplicate metadata key {key!r} at offset {at}")
            vtype = _value_type(cur.unpack("<I", f"type of {key!r}"), f"{self.path}: key {key!r}", cur.pos - 4)
            self.fields[key] = _read_value(cur, vtype, key)

        self.alignment = DEFAULT_ALIGNMENT
        if "general.alignment" in self.fields:
            field = self.fields["general.alignment"]
            align = field.value
            if field.type != ValueType.UINT32 or align <= 0 or align & (align - 1):
                raise GGUFError(f"{self.path}: general.alignment must be a u32 power of two, got {align!r}")
            self.alignment = align

        infos: list[tuple[str, tuple[int, ...], GGMLType, int]] = []
        names: set[str] = set()
        for _ in range(n_tensors):
            at = cur.pos
            name = cur.string("tensor name")
            if name in names:
                raise GGUFError(f"{self.path}: duplicate tensor {name!r} at offset {at}")
            names.add(name)
            n_dims = cur.unpack("<I", f"n_dims of tensor {name!r}")
            if n_dims > MAX_DIMS:
                raise GGUFError(f"{self.path}: tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
            ne = tuple(int(d) for d in cur.array(np.dtype("<u8"), n_dims, f"shape of tensor {name!r}"))
            type_id = cur.unpack("<I", f"ggml type of tensor {name!r}")
            gtype = ggml_type(type_id, name)
            offset = cur.unpack("<Q", f"data offset of tensor {name!r}")
            infos.append((name, ne, gtype, offset))

        self.data_start = -(-cur.pos // self.alignment) * self.alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, ne, gtype, offset in infos:
            self.tensors[name] = self._check_tensor(name, ne, gtype, offset)

    def _check_tensor(self, name: str, ne: tuple[int, ...], gtype: GGMLType, offset: int) -> TensorInfo:
        n = math.prod(ne)
        if n == 0 or n >= 2**62:
            raise GGUFError(f"{self.path}: tensor {name!r} has an invalid shape ne={list(ne)}")
        ne0 = ne[0] if ne else 1
        if gtype.id == I2_S_TYPE_ID:
            if n % 4:
                raise GGUFError(f"{self.path}: I2_S tensor {name!r} has {n} elements, not a multiple of 4")
        elif ne0 % gtype.block_size:
            raise GGUFError(
                f"{self.path}: tensor {name!r} of type {gtype.name} has row size ne0={ne0}, "
                f"not a multiple of its block size {gtype.block_size}"
            )
        if offset % self.alignment:
            raise GGUFError(
                f"{self.path}: tensor {name!r} data offset {offset} is not a multiple of the alignment {self.alignment}"
            )
        nbytes = gtype.nbytes(n)
        start = self.data_start + offset
        if start + nbytes > self.file_size:
            raise GGUFError(
                f"{self.path}: tensor {name!r} data [{start}, {start + nbytes}) lies outside the file "
                f"({self.file_size} bytes; truncated file or bad offset {offset})"
            )
        return TensorInfo(name, ne, gtype, offset, start, nbytes)

    # -- access --------------------------------------------------------------------------------
    @property
    def metadata(self) -> dict[str, Any]:
        """key -> python value (arrays as lists)."""
        return {key: field.value for key, field in self.fields.items()}

    def tensor_bytes(self, info: TensorInfo) -> np.ndarray:
        """(nbytes,) uint8, a read-only view into the mapped file (no copy)."""
        return np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=info.data_offset)

    def release(self, info: TensorInfo) -> None:
        """Drop the tensor's pages from this process's resident set (they stay in the page cache).

        Decoding touches every page of the mapping; without this a loader's peak RSS would be the
        decoded model plus the whole file.
        """
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        start = info.data_offset // page * page
        end = min(-(-(info.data_offset + info.nbytes) // page) * page, self.file_size)
        if end > start:
            self._mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        try:
            self._mm.close()
        except BufferError:
            pass  # numpy views still point into the map; it is unmapped when they are gone

    def __enter__(self) -> "GGUFReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# writer


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: its bytes are produced only when its turn comes (one tensor in memory at a time)."""

    name: str
    shape: tuple[int, ...]  # numpy order, (out, in) for a weight
    type: GGMLType
    produce: Callable[[], np.ndarray | bytes]  # -> exactly type.nbytes(n) bytes

    @property
    def nbytes(self) -> int:
        return self.type.nbytes(math.prod(self.shape))


def infer_value(value: Any) -> GGUFValue:
    """A python value -> GGUFValue: bool, int (u32 if it fits, else i32/i64/u64), float (f32), str, list."""
    if isinstance(value, GGUFValue):
        return value
    if isinstance(value, bool):
        return GGUFValue(ValueType.BOOL, value)
    if isinstance(value, (int, np.integer)):
        value = int(value)
        if 0 <= value < 2**32:
            return GGUFValue(ValueType.UINT32, value)
        if -(2**31) <= value < 0:
            return GGUFValue(ValueType.INT32, value)
        return GGUFValue(ValueType.INT64 if value < 0 else ValueType.UINT64, value)
    if isinstance(value, (float, np.floating)):
        return GGUFValue(ValueType.FLOAT32, float(value))
    if isinstance(value, str):
        return GGUFValue(ValueType.STRING, value)
    if isinstance(value, (list, tuple)):
        if not value:
            raise GGUFError("cannot infer the element type of an empty list; pass a GGUFValue")
        # one element type for the whole list, wide enough for every element (not just the first)
        kinds = {infer_value(v).type for v in value}
        if kinds <= {ValueType.UINT32, ValueType.INT32, ValueType.INT64, ValueType.UINT64}:
            low, high = min(value), max(value)
            elem = (ValueType.UINT32 if low >= 0 and high < 2**32 else ValueType.INT32 if -(2**31) <= low and high < 2**31
                    else ValueType.UINT64 if low >= 0 else ValueType.INT64)
        elif kinds <= {ValueType.UINT32, ValueType.INT32, ValueType.INT64, ValueType.UINT64, ValueType.FLOAT32}:
            elem = ValueType.FLOAT32
        elif len(kinds) == 1:
            elem = kinds.pop()
        else:
            raise GGUFError(f"cannot store a list mixing {sorted(k.name for k in kinds)} in one GGUF array")
        return GGUFValue(ValueType.ARRAY, list(value), elem)
    raise GGUFError(f"cannot store a value of type {type(value).__name__} in GGUF metadata")


def _encode_value(out: list[bytes], field: GGUFValue) -> None:
    vtype = field.type
    if vtype == ValueType.STRING:
        raw = field.value.encode("utf-8", errors="surrogateescape")
        out.append(struct.pack("<Q", len(raw)))
        out.append(raw)
    elif vtype == ValueType.ARRAY:
        elem = field.elem_type
        if elem is None:
            raise GGUFError("array value without an element type")
        out.append(struct.pack("<IQ", elem, len(field.value)))
        if elem in _SCALAR_DTYPES:
            out.append(np.asarray(field.value, dtype=_SCALAR_DTYPES[elem]).tobytes())
        else:
            for item in field.value:
                sub_elem = infer_value(item[0]).type if elem == ValueType.ARRAY and item else None
                _encode_value(out, GGUFValue(elem, item, sub_elem))
    else:
        out.append(np.asarray(field.value, dtype=_SCALAR_DTYPES[vtype]).tobytes())


def _align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def write_gguf_file(
    path: str | os.PathLike,
    fields: Mapping[str, Any],
    tensors: Iterable[TensorSpec],
    alignment: int = DEFAULT_ALIGNMENT,
) -> None:
    """Write a GGUF v3 file: metadata `fields` (python values or GGUFValue) then tensors in order.

    Written to a temporary name and renamed at the end, so a failed write leaves no partial file
    and a file that is being read (memory-mapped) is never overwritten in place.
    """
    tensors = list(tensors)
    typed = {key: infer_value(value) for key, value in fields.items()}
    if alignment != DEFAULT_ALIGNMENT:
        typed["general.alignment"] = GGUFValue(ValueType.UINT32, alignment)

    header: list[bytes] = [GGUF_MAGIC, struct.pack("<IQQ", 3, len(tensors), len(typed))]
    for key, field in typed.items():
        raw_key = key.encode("utf-8")
        header += [struct.pack("<Q", len(raw_key)), raw_key, struct.pack("<I", field.type)]
        _encode_value(header, field)
    offset = 0
    for spec in tensors:
        raw_name = spec.name.encode("utf-8")
        ne = list(reversed(spec.shape))
        header += [struct.pack("<Q", len(raw_name)), raw_name, struct.pack("<I", len(ne))]
        header += [struct.pack(f"<{len(ne)}Q", *ne), struct.pack("<IQ", spec.type.id, offset)]
        offset = _align(offset + spec.nbytes, alignment)

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            head = b"".join(header)
            f.write(head)
            f.write(b"\0" * (_align(len(head), alignment) - len(head)))
            for spec in tensors:
                data = spec.produce()
                raw = memoryview(np.ascontiguousarray(data)).cast("B") if isinstance(data, np.ndarray) else data
                if len(raw) != spec.nbytes:
                    raise GGUFError(f"tensor {spec.name!r}: produced {len(raw)} bytes, expected {spec.nbytes}")
                f.write(raw)
                f.write(b"\0" * (_align(spec.nbytes, alignment) - spec.nbytes))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All key/value metadata of a GGUF file (arrays as python lists); tensors are not read."""
    with GGUFReader(path) as reader:
        return reader.metadata
