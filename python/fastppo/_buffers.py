"""Turning numpy arrays and torch tensors into the raw buffers that ``fastppo._C`` reads.

``fastppo._C`` knows nothing of numpy or torch: it takes a data pointer, strides in elements,
a dtype name, a device index (-1 for the CPU) and a CUDA stream. This module produces those
from the caller's arrays, checks them with messages that name the argument, and allocates
outputs in the caller's framework. torch is never imported here: a tensor can only reach us
if the caller already imported it.
"""

from __future__ import annotations

import numbers
import sys
from typing import Any, NamedTuple, Sequence

import numpy as np

from . import _C

FLOAT_DTYPES = ("float32", "float64")
FLAG_DTYPES = ("bool", "uint8", "int8", "int32", "int64", "float32", "float64")


class Buffer(NamedTuple):
    """A 2-D ``[T, N]`` window on an array: what a kernel needs to read it in place."""

    obj: Any  # the array or tensor viewed; kept alive while the kernel runs
    data: Any  # what fastppo._C reads the address from: the numpy array itself, or an int
    strides: tuple[int, int]  # in elements
    dtype: str


def _torch_tensor_type() -> type | None:
    torch = sys.modules.get("torch")
    return None if torch is None else torch.Tensor


def kind_of(x: Any) -> str | None:
    """``"numpy"``, ``"torch"`` or None for anything else."""
    if isinstance(x, np.ndarray):
        return "numpy"
    tensor = _torch_tensor_type()
    if tensor is not None and isinstance(x, tensor):
        return "torch"
    return None


_dtype_names: dict = {}  # dtype object -> name; numpy's dtype.name costs microseconds


def dtype_name(x: Any) -> str:
    dtype = x.dtype
    name = _dtype_names.get(dtype)
    if name is None:
        name = dtype.name if isinstance(x, np.ndarray) else str(dtype).removeprefix("torch.")
        _dtype_names[dtype] = name
    return name


def device_name(x: Any) -> str:
    return "cpu" if isinstance(x, np.ndarray) else str(x.device)


def describe(x: Any) -> str:
    """How an argument is shown in an error message."""
    kind = kind_of(x)
    if kind is None:
        return type(x).__name__
    shape = tuple(x.shape)
    return f"{'numpy.ndarray' if kind == 'numpy' else 'torch.Tensor'} of shape {shape}, dtype {dtype_name(x)}, on {device_name(x)}"


def require_array(fn: str, name: str, x: Any, kind: str | None = None) -> str:
    """Checks that ``x`` is a numpy array or a strided torch tensor (of ``kind`` when given)."""
    got = kind_of(x)
    if got is None:
        raise TypeError(f"{fn}: {name} must be a numpy.ndarray or a torch.Tensor, got {describe(x)}")
    if kind is not None and got != kind:
        expected = "numpy.ndarray" if kind == "numpy" else "torch.Tensor"
        raise TypeError(
            f"{fn}: {name} is a {'numpy.ndarray' if got == 'numpy' else 'torch.Tensor'} but the other "
            f"arguments are {expected}s; pass every array as one kind"
        )
    if got == "torch" and str(x.layout) != "torch.strided":
        raise TypeError(f"{fn}: {name} must be a dense (strided) tensor, got layout {x.layout}")
    return got


def require_dtype(fn: str, name: str, x: Any, allowed: Sequence[str], what: str) -> str:
    dtype = dtype_name(x)
    if dtype not in allowed:
        raise TypeError(f"{fn}: {name} has dtype {dtype}; expected {what}")
    return dtype


def require_shape(fn: str, name: str, x: Any, shape: tuple[int, ...], what: str) -> None:
    if tuple(x.shape) != shape:
        raise ValueError(f"{fn}: {name} has shape {tuple(x.shape)}; expected {shape}, {what}")


def require_unit_interval(fn: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a real number in [0, 1], got {type(value).__name__} {value!r}")
    value = float(value)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{fn}: {name} must be in [0, 1], got {value!r}")
    return value


def device_index(fn: str, arrays: dict[str, Any]) -> int:
    """The one device all ``arrays`` live on: -1 for the CPU, else the CUDA device index."""
    items = list(arrays.items())
    first_name, first = items[0]
    first_device = first.device if not isinstance(first, np.ndarray) else "cpu"
    for name, x in items[1:]:
        dev = x.device if not isinstance(x, np.ndarray) else "cpu"
        if dev != first_device:
            raise ValueError(
                f"{fn}: {name} is on {device_name(x)} but {first_name} is on {device_name(first)}; "
                "expected every array on one device"
            )
    kind = device_name(first) if isinstance(first_device, str) else first_device.type
    if kind == "cpu":
        return -1
    if not kind.startswith("cuda"):
        raise ValueError(f"{fn}: {first_name} is on {device_name(first)}; fastppo runs on cpu and cuda devices")
    if not _C.WITH_CUDA:
        raise ValueError(
            f"{fn}: {first_name} is on {device_name(first)} but this build of fastppo has no CUDA support "
            "(it was compiled without a CUDA compiler); move the tensors to the CPU or install a CUDA build"
        )
    return first.device.index


def cuda_stream(x: Any) -> int:
    """The caller's current CUDA stream on ``x``'s device, as an integer handle."""
    import torch

    return torch.cuda.current_stream(x.device).cuda_stream


def _numpy_readable(x: np.ndarray) -> np.ndarray:
    """``x`` itself when the kernels can read it through element strides, else a copy."""
    item = x.dtype.itemsize
    if x.dtype.isnative and x.flags.aligned and all(s % item == 0 for s in x.strides):
        return x
    return np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("="))


def rows(x: Any, T: int, N: int) -> Buffer:
    """A ``[T, N]`` view of ``x`` (shape ``[T, ...]``, or ``[...]`` with T = 1), without a copy
    whenever the trailing dimensions can be merged through strides (always for 1-D and 2-D)."""
    if isinstance(x, np.ndarray):
        view = _numpy_readable(x)
        if view.shape != (T, N):
            view = view.reshape(T, N)  # numpy reshape returns a view when it can
        item = view.dtype.itemsize
        strides = (view.strides[0] // item, view.strides[1] // item)
    else:
        view = x if x.shape == (T, N) else x.detach().reshape(T, N)  # a view when the strides allow it
        strides = (view.stride(0), view.stride(1))
    return Buffer(view, data_arg(view), strides, dtype_name(view))


def data_arg(x: Any) -> Any:
    """The data argument of a fastppo._C call: a numpy array as is, a tensor's address."""
    return x if isinstance(x, np.ndarray) else x.data_ptr()


def address(x: Any) -> int:
    return x.ctypes.data if isinstance(x, np.ndarray) else x.data_ptr()


def is_c_contiguous(x: Any) -> bool:
    return bool(x.flags.c_contiguous) if isinstance(x, np.ndarray) else x.is_contiguous()


def strides_of(x: Any) -> tuple[int, ...]:
    """Strides in elements."""
    if isinstance(x, np.ndarray):
        return tuple(s // x.dtype.itemsize for s in x.strides)
    return tuple(x.stride())


def may_overlap(a: Any, b: Any) -> bool:
    """Whether two arrays may share memory (conservative for torch: same storage)."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return bool(np.may_share_memory(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return False
    if a.numel() == 0 or b.numel() == 0:
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class _RecyclingPool:
    """Memory for large numpy outputs, reused once no array refers to it any more.

    A fresh multi-megabyte ``np.empty`` is new memory from the OS: every page faults on first
    write, and faults taken by several threads at once serialize in the kernel (at T=1024,
    N=4096 that made ``gae``'s fresh outputs cost 3-4x its ``out=`` path). torch avoids this with
    its caching allocator; this is the same idea for numpy. Each block is a byte array owned
    here; outputs are views of it, and every view of a view refers to the block (numpy collapses
    ``base``), so the block is free exactly when its reference count is back to the pool's own.
    Only blocks of at least ``min_bytes`` are pooled, at most ``max_blocks`` of them."""

    def __init__(self, min_bytes: int = 1 << 20, max_blocks: int = 8):
        self.min_bytes, self.max_blocks = min_bytes, max_blocks
        self.blocks: list = []

    def empty(self, shape: tuple, dtype: np.dtype) -> np.ndarray:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if nbytes < self.min_bytes:
            return np.empty(shape, dtype=dtype)
        block = None
        for i in range(len(self.blocks)):
            candidate = self.blocks[i]
            # References: the list, `candidate` and getrefcount's argument. More: a live output.
            if candidate.nbytes == nbytes and sys.getrefcount(candidate) == 3:
                block = candidate
                del self.blocks[i]
                break
        if block is None:
            block = np.empty(nbytes, dtype=np.uint8)
            if len(self.blocks) >= self.max_blocks:
                del self.blocks[0]  # forgotten here; it lives on while its outputs do
        self.blocks.append(block)  # most recently used last
        return block.view(dtype).reshape(shape)


_POOL = _RecyclingPool()


def empty_like_rows(x: Any, T: int, N: int) -> Any:
    """A new contiguous ``[T, N]`` array of ``x``'s kind, dtype and device (large numpy outputs
    reuse the memory of earlier outputs that are gone, see ``_RecyclingPool``)."""
    if isinstance(x, np.ndarray):
        return _POOL.empty((T, N), x.dtype.newbyteorder("="))
    import torch

    return torch.empty((T, N), dtype=x.dtype, device=x.device)


def full_like_scalar(x: Any, value: float) -> Any:
    """A one-element array of ``x``'s kind, dtype and device holding ``value``."""
    if isinstance(x, np.ndarray):
        return np.full((1,), value, dtype=x.dtype.newbyteorder("="))
    import torch

    return torch.full((1,), value, dtype=x.dtype, device=x.device)
