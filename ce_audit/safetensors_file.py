"""A .safetensors file read without running anything: an 8-byte header length, a JSON header, the data.

Every tensor's ``data_offsets`` [begin, end) count from the first byte after the header; they are checked
before anything is mapped: 0 ≤ begin ≤ end ≤ the data's length (never inside the header, never past the
end of the file), end − begin equal to dtype size × the product of the shape, and no two tensors sharing
a byte. A file that breaks any of these raises ValueError, which the replay turns into one line.
"""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from ce_audit.dtypes import FORMATS

MAX_HEADER_BYTES = 100 << 20  # the format's own limit on the JSON header

# safetensors dtype codes (the format's header, https://github.com/huggingface/safetensors)
DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": FORMATS["bfloat16"].numpy_dtype,
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "U16": np.dtype(np.uint16),
    "U32": np.dtype(np.uint32),
    "U64": np.dtype(np.uint64),
    "BOOL": np.dtype(np.bool_),
}


def _integers(value: Any, what: str, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in value):
        raise ValueError(f"tensor {name!r}: {what} must be a list of integers")
    return tuple(value)


def _entry(name: str, entry: Any, data_bytes: int) -> tuple[np.dtype[Any], tuple[int, ...], int, int]:
    """A tensor's dtype, shape and byte range [begin, end), each checked against the data's length."""
    if not isinstance(entry, dict):
        raise ValueError(f"tensor {name!r}: its header entry is not an object")
    dtype = DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise ValueError(f"tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
    shape = _integers(entry.get("shape"), "shape", name)
    offsets = _integers(entry.get("data_offsets"), "data_offsets", name)
    if len(offsets) != 2 or any(n < 0 for n in shape):
        raise ValueError(f"tensor {name!r}: data_offsets must be [begin, end] and the shape not negative")
    begin, end = offsets
    if not 0 <= begin <= end <= data_bytes:
        raise ValueError(
            f"tensor {name!r}: data_offsets [{begin}, {end}] lie outside the file's {data_bytes} bytes "
            "of data (after the header)"
        )
    if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise ValueError(f"tensor {name!r}: its byte range does not match its shape")
    return dtype, shape, begin, end


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file as a read-only memory map: the header is JSON, nothing runs."""
    file_bytes = path.stat().st_size
    with open(path, "rb") as stream:
        head = stream.read(8)
        if len(head) < 8:
            raise ValueError("file too short for a safetensors header")
        size = int.from_bytes(head, "little")
        if size > min(MAX_HEADER_BYTES, file_bytes - 8):
            raise ValueError("header length past the end of the file")
        header = json.loads(stream.read(size))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    data_start = 8 + size
    entries = {
        name: _entry(name, entry, file_bytes - data_start)
        for name, entry in header.items()
        if name != "__metadata__"
    }
    ranges = sorted((begin, end, name) for name, (_, _, begin, end) in entries.items() if end > begin)
    for (_, end, first), (begin, _, second) in pairwise(ranges):  # sorted: a neighbour overlaps if any
        if begin < end:
            raise ValueError(f"tensors {first!r} and {second!r} overlap")
    arrays = {}
    for name, (dtype, shape, begin, end) in entries.items():
        if end == begin:
            arrays[name] = np.zeros(shape, dtype=dtype)
        else:
            arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)
    return arrays
