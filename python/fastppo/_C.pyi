# Typed stub of the compiled core (csrc/bindings.cpp). Strides are in elements.
from typing import Any

__version__: str
WITH_CUDA: bool

def build_info() -> dict[str, Any]: ...
def cuda_device_count() -> int: ...
def gae(
    T: int,
    N: int,
    dtype: str,
    rewards: tuple[int, int, int],
    values: tuple[int, int, int],
    dones: tuple[int, int, int],
    dones_dtype: str,
    terminated: tuple[int, int, int],
    terminated_dtype: str,
    last_value: tuple[int, int],
    adv: int,
    ret: int,
    gamma: float,
    lam: float,
    device: int,
    stream: int,
) -> None: ...
