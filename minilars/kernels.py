"""The C core's front door: loads minilars._cext, checks arguments, dispatches to C or to
the NumPy twins.

The C path is active when the cffi module `minilars._cext` was built (setup.py does it
when a C compiler exists) and the environment does not set MINILARS_NO_C=1.
`kernel_status()` says which path is active and why; `use_c(False)` switches to the
NumPy twins (as a call, or as a context manager that restores the previous choice).

Every public function checks its arguments first, on both paths, so that a program
behaves the same with and without a compiler: arrays must be NumPy arrays of a float
dtype the function supports, C-contiguous, non-empty, with matching shapes. A bad
argument raises ValueError naming it. float64 inputs always take the NumPy path (that
is what gradient checks use); the C kernels are float32.

The C kernels allocate nothing: each call allocates its scratch here as a NumPy array
(sized by the kernel's *_workspace function), so tracemalloc and the ledger see it.

Kernels and their twins (the twin is the specification):
    lars_gate_forward / lars_gate_backward   minilars.ops.lars_gate (same names)
    matmul_xwT   y = x W^T    matmul_xwT_numpy
    matmul_dyW   dx = dy W    matmul_dyW_numpy
W may be float32/float64 (NumPy BLAS), float16, or bfloat16 stored as uint16.
"""
from __future__ import annotations

import os

import numpy as np

from minilars.ops import lars_gate as lars_spec

_WEIGHT_TILE = 256       # rows of W converted at once by the NumPy twins

# ---------------------------------------------------------------------- loading

_lib = None
_ffi = None
_status = {"active": False, "reason": "", "openmp": False, "threads": 1}


def _load() -> None:
    global _lib, _ffi
    if os.environ.get("MINILARS_NO_C") == "1":
        _status["reason"] = "disabled by MINILARS_NO_C=1"
        return
    # OpenMP threads that spin while NumPy's BLAS threads work (or while another process
    # holds a core) slow small kernels by 10x or more; sleep instead. The user's own
    # setting wins. It must be set before libgomp starts, i.e. before _cext loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        from minilars import _cext
    except ImportError as e:
        _status["reason"] = (f"minilars._cext not built ({e}); reinstall with a C compiler "
                             "(pip install -e .) or run python cext/build_cffi.py")
        return
    _lib, _ffi = _cext.lib, _cext.ffi
    _status.update(active=True, openmp=bool(_lib.minilars_has_openmp()),
                   threads=int(_lib.minilars_max_threads()),
                   module=getattr(_cext, "__file__", "minilars._cext"))
    _status["reason"] = ("C core loaded" + (" with OpenMP" if _status["openmp"] else
                                             " without OpenMP (single thread)"))


_load()
_enabled = _lib is not None


def kernel_status() -> dict:
    """Which kernel path is active and why: active, reason, openmp, threads (and module
    when loaded). `active` also reflects use_c()."""
    status = dict(_status)
    status["active"] = _enabled
    if _lib is not None and not _enabled:
        status["reason"] = "C core loaded but switched off by use_c(False)"
    if _lib is not None:
        status["threads"] = int(_lib.minilars_max_threads())
    return status


def c_available() -> bool:
    """True when the compiled module is loaded (whatever use_c says)."""
    return _lib is not None


class use_c:
    """Switch the C path on or off: `use_c(False)` as a call, or
    `with use_c(False): ...` to restore the previous choice afterwards.
    Asking for C when the module is not loaded raises RuntimeError."""

    def __init__(self, enabled: bool):
        global _enabled
        if enabled and _lib is None:
            raise RuntimeError(f"the C core is not available: {_status['reason']}")
        self.previous = _enabled
        _enabled = bool(enabled)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _enabled
        _enabled = self.previous
        return False


# ------------------------------------------------------------- argument checks

def _check_array(name: str, a, ndim: int | None = None, dtypes=None, where: str = "") -> np.ndarray:
    """a must be a C-contiguous, non-empty ndarray of one of `dtypes` with `ndim` dims."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{where}: {name} must be a numpy array, got {type(a).__name__}")
    if dtypes is not None and a.dtype not in dtypes:
        raise ValueError(f"{where}: {name} has dtype {a.dtype}; expected one of "
                         f"{', '.join(str(np.dtype(d)) for d in dtypes)}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{where}: {name} must have {ndim} dimensions, got shape {a.shape}")
    if a.ndim == 0 or a.size == 0:
        raise ValueError(f"{where}: {name} is empty (shape {a.shape})")
    if not a.flags.c_contiguous:
        raise ValueError(f"{where}: {name} must be C-contiguous (use np.ascontiguousarray)")
    return a


def _check_rc(rc: int, where: str) -> None:
    if rc != _lib.MINILARS_OK:
        raise ValueError(f"{where}: the C kernel rejected its arguments (code {rc})")


def _ptr(ctype: str, a: np.ndarray):
    return _ffi.from_buffer(ctype, a)


def _workspace(where: str, floats: int) -> np.ndarray:
    """The C kernels allocate nothing themselves: their scratch is this NumPy array, so
    tracemalloc and the memory ledger see it like any other temporary."""
    if floats < 0:
        raise ValueError(f"{where}: the C kernel rejected these sizes")
    return np.empty(max(int(floats), 1), dtype=np.float32)


_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_WEIGHTS = _FLOATS + (np.dtype(np.float16), np.dtype(np.uint16))


# ------------------------------------------------------------- LARS gate

def _check_lars(where, x, U, V, alpha, block, extra=()):
    """Checks shared by the LARS kernels; returns (x2d (N, in), alpha as float)."""
    _check_array("x", x, None, _FLOATS, where)
    for name, a in extra:
        _check_array(name, a, None, _FLOATS, where)
        if a.shape != x.shape or a.dtype != x.dtype:
            raise ValueError(f"{where}: {name} has shape {a.shape} and dtype {a.dtype}; "
                             f"expected x's {x.shape} and {x.dtype}")
    _check_array("U", U, 2, (x.dtype,), where)
    _check_array("V", V, 2, (x.dtype,), where)
    in_features = x.shape[-1]
    if not isinstance(block, (int, np.integer)) or block < 1 or in_features % block:
        raise ValueError(f"{where}: block {block!r} must be a positive integer dividing "
                         f"x's last dimension {in_features}")
    groups = in_features // block
    rank = U.shape[1]
    if U.shape[0] != in_features:
        raise ValueError(f"{where}: U has shape {U.shape}; expected ({in_features}, rank)")
    if V.shape != (rank, groups):
        raise ValueError(f"{where}: V has shape {V.shape}; expected ({rank}, {groups}) = "
                         f"(rank, in/block)")
    alpha_array = np.asarray(alpha)
    if alpha_array.size != 1 or not np.issubdtype(alpha_array.dtype, np.number):
        raise ValueError(f"{where}: alpha must be a number or a one-element array, got "
                         f"shape {alpha_array.shape}")
    return x.reshape(-1, in_features), float(alpha_array.reshape(()))


def _c_for(*arrays) -> bool:
    return _enabled and all(a.dtype == np.float32 for a in arrays)


def lars_gate_forward(x: np.ndarray, U: np.ndarray, V: np.ndarray, alpha, block: int,
                      eps: float = 1e-5) -> np.ndarray:
    """x (..., in) -> x~ (..., in), the LARS gate applied blockwise (see
    minilars.ops.lars_gate). Reads x, U (in, r), V (r, in/block), alpha; returns a new array."""
    where = "lars_gate_forward"
    x2d, alpha_value = _check_lars(where, x, U, V, alpha, block)
    if not _c_for(x):
        return lars_spec.lars_gate_forward(x, U, V, alpha, block, eps)
    rows, in_features = x2d.shape
    rank, threads = U.shape[1], int(_lib.minilars_max_threads())
    out = np.empty_like(x2d)                                          # (N, in)
    work = _workspace(where, _lib.minilars_lars_forward_workspace(in_features, rank, int(block),
                                                                  threads))
    rc = _lib.minilars_lars_forward(_ptr("float[]", x2d), _ptr("float[]", U), _ptr("float[]", V),
                                    alpha_value, float(eps), rows, in_features, rank,
                                    int(block), _ptr("float[]", out),
                                    threads, _ptr("float[]", work), work.size)
    _check_rc(rc, where)
    return out.reshape(x.shape)


def lars_gate_backward(dx_tilde: np.ndarray, x: np.ndarray, U: np.ndarray, V: np.ndarray,
                       alpha, block: int, eps: float = 1e-5, need_dx: bool = True):
    """Gradients of the LARS gate from dx~ (..., in) and x (..., in) only.
    Returns (dx (..., in) or None, dU (in, r), dV (r, g), dalpha (scalar of x's dtype))."""
    where = "lars_gate_backward"
    x2d, alpha_value = _check_lars(where, x, U, V, alpha, block, extra=[("dx_tilde", dx_tilde)])
    if not _c_for(x):
        return lars_spec.lars_gate_backward(dx_tilde, x, U, V, alpha, block, eps, need_dx)
    rows, in_features = x2d.shape
    dxt2d = dx_tilde.reshape(rows, in_features)
    dx = np.empty_like(x2d) if need_dx else None                      # (N, in)
    dU = np.empty_like(U)                                             # (in, r)
    dV = np.empty_like(V)                                             # (r, g)
    dalpha = np.empty(1, dtype=np.float32)
    rank, threads = U.shape[1], int(_lib.minilars_max_threads())
    work = _workspace(where, _lib.minilars_lars_backward_workspace(in_features, rank, int(block),
                                                                   threads))
    rc = _lib.minilars_lars_backward(
        _ptr("float[]", dxt2d), _ptr("float[]", x2d), _ptr("float[]", U), _ptr("float[]", V),
        alpha_value, float(eps), rows, in_features, rank, int(block),
        _ptr("float[]", dx) if need_dx else _ffi.NULL, _ptr("float[]", dU), _ptr("float[]", dV),
        _ptr("float[]", dalpha), threads, _ptr("float[]", work), work.size)
    _check_rc(rc, where)
    return (dx.reshape(x.shape) if need_dx else None), dU, dV, dalpha[0]


# ------------------------------------------------------------- bfloat16

def bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16 array) -> float32 values (exact: the bits are the top half)."""
    u16 = np.asarray(u16)
    if u16.dtype != np.uint16:
        raise ValueError(f"bf16_to_f32: expected uint16 bits, got dtype {u16.dtype}")
    return (u16.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(f32: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest, ties to even; NaN stays a
    (quiet) NaN, overflow rounds to infinity as IEEE rounding does."""
    f32 = np.asarray(f32, dtype=np.float32)
    bits = f32.view(np.uint32).astype(np.uint64)
    lsb = (bits >> 16) & 1
    rounded = ((bits + 0x7FFF + lsb) >> 16).astype(np.uint16)
    nan = np.isnan(f32)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return rounded


def half_to_float(W: np.ndarray, dtype=np.float32) -> np.ndarray:
    """float16 or bfloat16-as-uint16 (or float) weights -> `dtype` (a new array)."""
    if W.dtype == np.uint16:
        return bf16_to_f32(W).astype(dtype, copy=False)
    return W.astype(dtype)


# ------------------------------------------------------------- matmuls

def matmul_xwT_numpy(x: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Twin of the C kernel: y (N, out) = x (N, in) W^T, W (out, in) any weight dtype,
    converted _WEIGHT_TILE rows at a time, so no full float copy of W is made."""
    out_features = W.shape[0]
    y = np.empty((x.shape[0], out_features), dtype=x.dtype)          # (N, out)
    for m0 in range(0, out_features, _WEIGHT_TILE):
        W_tile = half_to_float(W[m0:m0 + _WEIGHT_TILE], x.dtype)      # (tile, in)
        y[:, m0:m0 + _WEIGHT_TILE] = x @ W_tile.T
    return y


def matmul_dyW_numpy(dy: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Twin of the C kernel: dx (N, in) = dy (N, out) W, W (out, in) any weight dtype,
    converted _WEIGHT_TILE rows at a time."""
    out_features, in_features = W.shape
    dx = np.zeros((dy.shape[0], in_features), dtype=dy.dtype)        # (N, in)
    for m0 in range(0, out_features, _WEIGHT_TILE):
        W_tile = half_to_float(W[m0:m0 + _WEIGHT_TILE], dy.dtype)     # (tile, in)
        dx += dy[:, m0:m0 + _WEIGHT_TILE] @ W_tile
    return dx


def _weight_format(W: np.ndarray) -> int:
    return _lib.MINILARS_WEIGHT_BF16 if W.dtype == np.uint16 else _lib.MINILARS_WEIGHT_F16


def _check_matmul(where, a_name, a, W, a_dim_of_W):
    _check_array(a_name, a, 2, _FLOATS, where)
    _check_array("W", W, 2, _WEIGHTS, where)
    if a.shape[1] != W.shape[a_dim_of_W]:
        raise ValueError(f"{where}: {a_name} has shape {a.shape} but W has shape {W.shape}; "
                         f"{a_name}.shape[1] must equal W.shape[{a_dim_of_W}]")
    if W.dtype in _FLOATS and W.dtype != a.dtype:
        raise ValueError(f"{where}: W has dtype {W.dtype} but {a_name} has {a.dtype}")


def _half_matmul_c(where: str, kernel, workspace, a: np.ndarray, W: np.ndarray,
                   outer: int) -> np.ndarray:
    """One call of a half-weight matmul kernel: out (rows, outer) from a (rows, inner) and
    W's uint16 bits. Both kernels take (a, W, format, rows, inner, outer, out, threads,
    work, work_size); their workspace functions take (rows, inner, outer, threads)."""
    rows, inner = a.shape
    threads = int(_lib.minilars_max_threads())
    out = np.empty((rows, outer), dtype=np.float32)                  # (rows, outer)
    work = _workspace(where, workspace(rows, inner, outer, threads))
    rc = kernel(_ptr("float[]", a), _ptr("uint16_t[]", W), _weight_format(W), rows, inner,
                outer, _ptr("float[]", out), threads, _ptr("float[]", work), work.size)
    _check_rc(rc, where)
    return out


def matmul_xwT(x: np.ndarray, W: np.ndarray) -> np.ndarray:
    """y (N, out) = x (N, in) W^T for W (out, in) in float32/float64 (NumPy BLAS), float16
    or bfloat16 bits (uint16; C kernel with float32 accumulation when x is float32)."""
    where = "matmul_xwT"
    _check_matmul(where, "x", x, W, 1)
    if W.dtype in _FLOATS:
        return x @ W.T
    if not _c_for(x):
        return matmul_xwT_numpy(x, W)
    return _half_matmul_c(where, _lib.minilars_matmul_xwT, _lib.minilars_matmul_xwT_workspace,
                          x, W, outer=W.shape[0])


def matmul_dyW(dy: np.ndarray, W: np.ndarray) -> np.ndarray:
    """dx (N, in) = dy (N, out) W for W (out, in), dtypes as in matmul_xwT."""
    where = "matmul_dyW"
    _check_matmul(where, "dy", dy, W, 0)
    if W.dtype in _FLOATS:
        return dy @ W
    if not _c_for(dy):
        return matmul_dyW_numpy(dy, W)
    return _half_matmul_c(where, _lib.minilars_matmul_dyW, _lib.minilars_matmul_dyW_workspace,
                          dy, W, outer=W.shape[1])


def half_to_f32_c(W: np.ndarray) -> np.ndarray:
    """The C conversion of float16/bfloat16 bits to float32 (for tests of the tiles'
    conversion); requires the C core."""
    if _lib is None:
        raise RuntimeError(f"the C core is not available: {_status['reason']}")
    _check_array("W", W, None, (np.dtype(np.float16), np.dtype(np.uint16)), "half_to_f32_c")
    out = np.empty(W.shape, dtype=np.float32)
    rc = _lib.minilars_half_to_f32(_ptr("uint16_t[]", W.view(np.uint16)), _weight_format(W),
                                   W.size, _ptr("float[]", out))
    _check_rc(rc, "half_to_f32_c")
    return out
