"""The one layer between fastppo's Python wrappers and ``fastppo._C``.

``fastppo._C`` knows nothing of numpy or torch: it takes data pointers, strides in elements, dtype
names, a device index (-1 for the CPU) and a CUDA stream. Every wrapper gets those here, checks its
arguments here, and allocates numpy outputs here. torch is never imported here: a tensor can only
reach us if the caller already imported it.

One error policy: ``TypeError`` for the wrong kind of object or the wrong dtype, ``ValueError`` for a
wrong shape, device or value. Each message starts with the public function's name and says which
argument, what it got and what was expected. Messages are built only on failure: these checks run
on every call.
"""

from __future__ import annotations

import math
import numbers
import sys
from typing import Any, NamedTuple, Sequence

import numpy as np

from . import _C

# ------------------------------------------------------------------ dtypes

FLOAT_DTYPES = ("float32", "float64")
# Accepted where a kernel reads them (as stored, or through a float32 copy) and computes in float32.
LOW_PRECISION_DTYPES = ("bfloat16", "float16")
FLAG_DTYPES = ("bool", "uint8", "int8", "int32", "int64", "float32", "float64")
INDEX_DTYPES = ("int64", "int32")
_DTYPES_WHAT = {
    FLOAT_DTYPES: "float32 or float64",
    FLAG_DTYPES: "bool, or 0/1 as uint8, int8, int32, int64, float32 or float64",
    INDEX_DTYPES: "int64 or int32 (use .long())",
}


class _DtypeNames(dict):
    """numpy or torch dtype -> the name ``fastppo._C`` takes (``"float32"``, ``"bool"``): a plain dict
    lookup once a dtype has been seen (numpy's ``dtype.name`` costs microseconds)."""

    def __missing__(self, dtype: Any) -> str:
        name = dtype.name if isinstance(dtype, np.dtype) else str(dtype).removeprefix("torch.")
        self[dtype] = name
        return name


DTYPE_NAMES = _DtypeNames()


def _dtypes_what(dtypes: Sequence[str]) -> str:
    known = _DTYPES_WHAT.get(tuple(dtypes))
    if known:
        return known
    *head, last = dtypes
    return f"{', '.join(head)} or {last}" if head else last


def _dtype_text(x: Any) -> str:
    """A dtype as messages show it: ``torch.float32`` for a tensor, ``float32`` for numpy."""
    return x.dtype.name if isinstance(x, np.ndarray) else str(x.dtype)


def _bad_dtype(fn: str, name: str, x: Any, what: str) -> TypeError:
    return TypeError(f"{fn}: {name} has dtype {_dtype_text(x)}; expected {what}")


# ------------------------------------------------------------------ kinds of array


def kind_of(x: Any) -> str | None:
    """``"numpy"``, ``"torch"`` or None for anything else."""
    if isinstance(x, np.ndarray):
        return "numpy"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return "torch"
    return None


_KIND_NAMES = {"numpy": "numpy.ndarray", "torch": "torch.Tensor", None: "numpy.ndarray or a torch.Tensor"}


def describe(x: Any) -> str:
    """How an argument is shown in an error message."""
    kind = kind_of(x)
    if kind is None:
        return type(x).__name__
    device = "cpu" if kind == "numpy" else x.device
    return f"{_KIND_NAMES[kind]} of shape {tuple(x.shape)}, dtype {DTYPE_NAMES[x.dtype]}, on {device}"


# ------------------------------------------------------------------ argument checks


def require_array(fn: str, name: str, x: Any, kind: str | None = None, dtypes: Sequence[str] | None = None,
                  what: str | None = None) -> str:
    """``x`` must be a numpy array or a dense torch tensor (of ``kind`` when given) and, when
    ``dtypes`` is given, of one of those dtypes (``what`` describes them). Returns its kind."""
    torch = sys.modules.get("torch")  # kind_of, inlined: this runs on every call
    if torch is not None and isinstance(x, torch.Tensor):
        got = "torch"
    else:
        got = "numpy" if isinstance(x, np.ndarray) else None
    if got is None or (kind is not None and got != kind):
        raise TypeError(f"{fn}: {name} must be a {_KIND_NAMES[kind]}, got {describe(x)}")
    if got == "torch" and x.layout is not torch.strided:
        raise TypeError(f"{fn}: {name} must be a dense (strided) tensor, got layout {x.layout}")
    if dtypes is not None and DTYPE_NAMES[x.dtype] not in dtypes:
        raise _bad_dtype(fn, name, x, what or _dtypes_what(dtypes))
    return got


def require_dtype(fn: str, name: str, x: Any, dtypes: Sequence[str], what: str | None = None) -> None:
    """``x`` must be of one of ``dtypes`` (``what`` describes them)."""
    if DTYPE_NAMES[x.dtype] not in dtypes:
        raise _bad_dtype(fn, name, x, what or _dtypes_what(dtypes))


def require_like(fn: str, name: str, x: Any, like: Any, like_name: str, dtypes: Sequence[str] | None = None,
                 shape: tuple | None = None, shape_what: str | None = None) -> None:
    """``x`` must be an array of ``like``'s kind and device (dense, for a tensor), of its dtype (of
    one of ``dtypes`` when given) and of its shape (of ``shape`` when given; ``shape_what`` says
    what that shape is)."""
    if type(x) is not type(like) and kind_of(x) != kind_of(like):  # a subclass (nn.Parameter) is of its kind
        raise TypeError(f"{fn}: {name} must be a {_KIND_NAMES[kind_of(like)]} like {like_name}, got {describe(x)}")
    if dtypes is None:
        if x.dtype != like.dtype and DTYPE_NAMES[x.dtype] != DTYPE_NAMES[like.dtype]:  # numpy: any byte order
            raise _bad_dtype(fn, name, x, f"{_dtype_text(like)}, the dtype of {like_name}")
    elif DTYPE_NAMES[x.dtype] not in dtypes:
        raise _bad_dtype(fn, name, x, _dtypes_what(dtypes))
    if x.shape != (like.shape if shape is None else shape):
        expected = tuple(like.shape if shape is None else shape)
        raise ValueError(f"{fn}: {name} has shape {tuple(x.shape)}; expected {expected}, "
                         f"{shape_what or 'the shape of ' + like_name}")
    if not isinstance(x, np.ndarray) and (x.device != like.device or x.layout is not like.layout):
        if x.device != like.device:
            raise ValueError(f"{fn}: {name} is on {x.device} but {like_name} is on {like.device}; expected one device")
        raise TypeError(f"{fn}: {name} must be a dense (strided) tensor, got layout {x.layout}")


def require_contiguous(fn: str, name: str, x: Any, kind: str, dtypes: Sequence[str] | None,
                       shape: tuple | None = None) -> None:
    """``x`` must be C-contiguous CPU memory that compiled code reads or writes by address: a
    ``kind`` array of one of ``dtypes`` (any when None) and of ``shape`` (a tuple; any when None)."""
    require_array(fn, name, x, kind, dtypes)
    if shape is not None and x.shape != shape:
        raise ValueError(f"{fn}: {name} has shape {tuple(x.shape)}; expected {tuple(shape)}")
    if not (x.flags.c_contiguous if kind == "numpy" else x.is_contiguous()):
        raise ValueError(f"{fn}: {name} must be C-contiguous, got strides {strides_of(x)}")
    if kind == "torch" and not x.is_cpu:
        raise ValueError(f"{fn}: {name} is on {x.device}; expected the CPU")


def require_writable(fn: str, name: str, x: Any) -> None:
    """``x`` is an output that compiled code writes by address in its native byte order: a numpy
    array must be writeable, aligned and of native byte order, a tensor must not require grad
    (autograd cannot see such a write, so torch refuses it for its own ``out=`` arguments)."""
    if isinstance(x, np.ndarray):
        if not x.dtype.isnative:
            raise TypeError(f"{fn}: {name} has dtype {x.dtype.str} (non-native byte order); expected "
                            f"{x.dtype.newbyteorder('=').str}")
        if not x.flags.writeable:
            raise ValueError(f"{fn}: {name} is read-only; expected a writeable array")
        if not x.flags.aligned:
            raise ValueError(f"{fn}: {name} is not aligned to its dtype; expected an aligned array")
    elif x.requires_grad:
        raise ValueError(f"{fn}: {name} requires grad; expected a tensor that does not (autograd cannot record "
                         "the write): pass out.detach() or allocate it under torch.no_grad()")


def require_real(fn: str, name: str, value: Any, what: str, low: float = -math.inf, high: float = math.inf,
                 open_low: bool = False, finite: bool = True) -> float:
    """``value`` as a float: a real number (not a bool) in ``[low, high]`` (``(low, high]`` when
    ``open_low``), finite unless ``finite`` is False; ``what`` says that in words (``"a finite
    number > 0"``)."""
    if type(value) is not float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{fn}: {name} must be {what}, got {type(value).__name__} {value!r}")
        value = float(value)
    if not ((value > low if open_low else value >= low) and value <= high) or (finite and not math.isfinite(value)):
        raise ValueError(f"{fn}: {name} must be {what}, got {value!r}")  # NaN fails every comparison
    return value


def check_device(fn: str, name: str, x: Any) -> None:
    """``x`` must be on the CPU, or on a CUDA device with a build of fastppo that has CUDA."""
    if isinstance(x, np.ndarray) or x.is_cpu:
        return
    if not x.is_cuda:
        raise ValueError(f"{fn}: {name} is on {x.device}; fastppo runs on cpu and cuda devices")
    if not _C.WITH_CUDA:
        raise ValueError(
            f"{fn}: {name} is on {x.device} but this build of fastppo has no CUDA support (it was compiled "
            "without a CUDA compiler); move the tensors to the CPU or install a CUDA build"
        )


# ------------------------------------------------------------------ what fastppo._C takes


def device_stream(x: Any) -> tuple[int, int]:
    """The ``(device, stream)`` pair of a ``fastppo._C`` call on ``x``'s memory: ``(-1, 0)`` on the
    CPU; on CUDA the device index and the caller's current stream there (kernels run on it)."""
    if isinstance(x, np.ndarray) or not x.is_cuda:
        return -1, 0
    device = x.device
    return device.index, sys.modules["torch"].cuda.current_stream(device).cuda_stream


def spec(x: Any) -> tuple | None:
    """A tensor as ``fastppo._C`` reads it: ``(data_ptr, stride)`` of a 1-D tensor,
    ``(data_ptr, row stride, column stride)`` of a 2-D one (strides in elements); None for None."""
    return None if x is None else (x.data_ptr(), *x.stride())


def row_spec(x: Any) -> tuple | None:
    """``(data_ptr, row stride, column stride)`` of a 1-D or 2-D tensor read as rows: a 1-D tensor
    is one row (row stride 0: every row reads it). None for None."""
    if x is None:
        return None
    strides = x.stride()
    return (x.data_ptr(), 0, *strides) if len(strides) == 1 else (x.data_ptr(), *strides)


class Buffer(NamedTuple):
    """A 2-D ``[T, N]`` window on an array: what a kernel needs to read it in place."""

    obj: Any  # the array or tensor viewed; kept alive while the kernel runs
    data: Any  # what fastppo._C reads the address from: the numpy array itself, or an int
    strides: tuple[int, int]  # in elements
    dtype: str


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
    return Buffer(view, data_arg(view), strides, DTYPE_NAMES[view.dtype])


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


# ------------------------------------------------------------------ numpy outputs


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
    return sys.modules["torch"].empty((T, N), dtype=x.dtype, device=x.device)


def full_like_scalar(x: Any, value: float) -> Any:
    """A one-element array of ``x``'s kind, dtype and device holding ``value``."""
    if isinstance(x, np.ndarray):
        return np.full((1,), value, dtype=x.dtype.newbyteorder("="))
    return sys.modules["torch"].full((1,), value, dtype=x.dtype, device=x.device)


# ------------------------------------------------------------------ low precision through float32


def is_low_precision(x: Any) -> bool:
    """Whether ``x`` holds bfloat16 or float16 (numpy's float16 included)."""
    return DTYPE_NAMES[x.dtype] in LOW_PRECISION_DTYPES


def widen(x: Any) -> Any:
    """A float32 copy of a bfloat16 / float16 array (exact), of its kind and device; anything
    else (None, a flag array, a Python number) as it is."""
    if x is None or isinstance(x, numbers.Real) or not is_low_precision(x):
        return x
    return x.astype(np.float32) if isinstance(x, np.ndarray) else x.float()


def narrow(x: Any, like: Any, out: Any = None) -> Any:
    """float32 results ``x`` rounded (to nearest even) to ``like``'s dtype: into ``out`` when
    given (reshaped to its shape), else as a new array of ``x``'s kind and device."""
    if isinstance(x, np.ndarray):
        if out is None:
            return x.astype(like.dtype.newbyteorder("="))
        np.copyto(out, x.reshape(out.shape), casting="same_kind")
        return out
    if out is None:
        return x.to(like.dtype)
    return out.copy_(x.reshape(out.shape))
