"""How frozen weight matrices may be stored, and the one rule about it.

A frozen matrix (an embedding or a linear's weight that does not train) may be held in a
narrower dtype than the compute dtype; activations, norms, biases and everything that
trains stay in the compute dtype. Full fine-tuning trains every weight, so it has no
frozen matrices to narrow: asking for both is refused, by train, memory and every other
command alike.
"""
from __future__ import annotations

import numpy as np

FROZEN_DTYPES = {"float16": np.float16}


def parse_frozen_dtype(name: str | None) -> str | None:
    """A frozen-dtype name (None: the compute dtype); unknown names are refused."""
    if name is None or name in FROZEN_DTYPES:
        return name
    raise ValueError(f"unknown frozen dtype {name!r}; expected one of {', '.join(FROZEN_DTYPES)}")


def check_frozen_dtype(method: str, name: str | None) -> None:
    """The rule: narrowed frozen weights go with adapter methods only."""
    parse_frozen_dtype(name)
    if name is not None and method == "full":
        raise ValueError(f"--frozen-dtype {name} applies to adapter methods: full fine-tuning "
                         "trains every weight, so none is frozen")


def frozen_numpy_dtype(name: str | None):
    """The NumPy dtype a frozen matrix is held in, or None for the compute dtype."""
    return None if name is None else FROZEN_DTYPES[parse_frozen_dtype(name)]


def freeze_matrices(params: dict, trainable, name: str | None) -> None:
    """Narrow every 2-D parameter that does not train to the frozen dtype, in place."""
    dtype = frozen_numpy_dtype(name)
    if dtype is None:
        return
    for key, array in params.items():
        if array.ndim == 2 and key not in trainable:
            params[key] = array.astype(dtype)
