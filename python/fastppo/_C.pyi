# Typed stub of the compiled core (csrc/bindings.cpp). Strides are in elements; a buffer's data
# is an integer address or a numpy array (whose address is read in C++).
from typing import Any, Union

import numpy as np

Data = Union[int, np.ndarray]

__version__: str
WITH_CUDA: bool

def build_info() -> dict[str, Any]: ...
def cuda_device_count() -> int: ...
def gae(
    T: int,
    N: int,
    dtype: str,
    rewards: tuple[Data, int, int],
    values: tuple[Data, int, int],
    dones: tuple[Data, int, int],
    dones_dtype: str,
    terminated: tuple[Data, int, int],
    terminated_dtype: str,
    last_value: tuple[Data, int],
    adv: Data,
    ret: Data,
    gamma: float,
    lam: float,
    device: int,
    stream: int,
) -> None: ...
