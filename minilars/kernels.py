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
    dequantize   a tile of a frozen W to float32    dequantize_numpy (minilars.quant.dequantize,
                                                    minilars.frozen.bf16_values)
    gather_rows  rows of a frozen E to float32      minilars.frozen.rows_to_float
    matmul_xwT   y = x W^T    matmul_xwT_numpy   (tiles dequantized in C, NumPy's BLAS;
                                                  few rows: minilars_matvec_xwT)
    matmul_dyW   dx = dy W    matmul_dyW_numpy
    swiglu_forward / swiglu_backward         minilars.ops.mlp (same names)
    attention_tile_softmax / _probs / _dscores   minilars.ops.attention_tiles
                                                 (tile_softmax / tile_probs / tile_dscores)
A frozen W may be a float32/float64 ndarray (NumPy's BLAS), a float16 ndarray, or a
minilars.frozen.Packed matrix: bfloat16 bits ("bf16") or GGUF blocks ("q8_0", "q4_0",
"q4_1").
"""
from __future__ import annotations

import os

import numpy as np

from minilars import quant
from minilars.frozen import Packed, bf16_values, rows_to_float
from minilars.ops import attention_tiles as attention_spec
from minilars.ops import lars_gate as lars_spec
from minilars.ops import mlp as mlp_spec

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
                   build=_ffi.string(_lib.minilars_build_features()).decode(),
                   module=getattr(_cext, "__file__", "minilars._cext"))
    _status["reason"] = ("C core loaded" + (" with OpenMP" if _status["openmp"] else
                                             " without OpenMP (single thread)"))


_load()
_enabled = _lib is not None


def kernel_status() -> dict:
    """Which kernel path is active and why: active, reason, openmp, threads (and, when
    loaded, module and build: what the C build compiled, minilars_build_features's words).
    `active` also reflects use_c()."""
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
_HALF = (np.dtype(np.float16),)


def _check_same(where: str, named: list) -> np.ndarray:
    """Each (name, array) a C-contiguous float array of the first one's shape and dtype."""
    first_name, first = named[0]
    for name, a in named:
        _check_array(name, a, None, _FLOATS, where)
        if a.shape != first.shape or a.dtype != first.dtype:
            raise ValueError(f"{where}: {name} has shape {a.shape} and dtype {a.dtype}; "
                             f"expected {first_name}'s {first.shape} and {first.dtype}")
    return first


# ------------------------------------------------------------- LARS gate

def _check_lars(where, x, U, V, alpha, block, extra=()):
    """Checks shared by the LARS kernels; returns (x2d (N, in), alpha as float)."""
    _check_same(where, [("x", x), *extra])
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


# ------------------------------------------------------------- SwiGLU

def swiglu_forward(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """act = silu(g) * u, (..., F), as minilars.ops.mlp.swiglu_forward; keeps nothing."""
    where = "swiglu_forward"
    _check_same(where, [("g", g), ("u", u)])
    if not _c_for(g):
        return mlp_spec.swiglu_forward(g, u)
    act = np.empty_like(g)                                            # (..., F)
    _check_rc(_lib.minilars_swiglu_forward(_ptr("float[]", g), _ptr("float[]", u), g.size,
                                           _ptr("float[]", act), int(_lib.minilars_max_threads())),
              where)
    return act


def swiglu_backward(dact: np.ndarray, g: np.ndarray, u: np.ndarray, dg_out=None):
    """(dg, du), each (..., F), from dact and the kept g and u, as
    minilars.ops.mlp.swiglu_backward; dg_out=dact writes dg over dact."""
    where = "swiglu_backward"
    named = [("g", g), ("u", u), ("dact", dact)] + ([] if dg_out is None else [("dg_out", dg_out)])
    _check_same(where, named)
    if not _c_for(g):
        return mlp_spec.swiglu_backward(dact, g, u, dg_out)
    dg = np.empty_like(g) if dg_out is None else dg_out              # (..., F)
    du = np.empty_like(g)                                             # (..., F)
    _check_rc(_lib.minilars_swiglu_backward(_ptr("float[]", dact), _ptr("float[]", g),
                                            _ptr("float[]", u), g.size, _ptr("float[]", dg),
                                            _ptr("float[]", du), int(_lib.minilars_max_threads())),
              where)
    return dg, du


# ------------------------------------------------------------- tiled attention
#
# The element-wise steps between the tiled attention's products, in place on blocks laid
# out as the attention makes them: scores (..., R_head, tk) and per-row vectors
# (..., R_head), flattened here to (R, tk) and (R,) rows.

def _check_tile(where: str, scores_name: str, S, rows: list, blocks: list,
                diagonal: bool) -> tuple:
    """S a C-contiguous float array (..., tk); each of `rows` (name, array) of shape
    S.shape[:-1], each of `blocks` of shape S.shape[:-1] + (anything,), all of S's dtype.
    Returns S as (R, tk). On the diagonal, tk must divide R (tq = tk)."""
    _check_array(scores_name, S, None, _FLOATS, where)
    if S.ndim < 2:
        raise ValueError(f"{where}: {scores_name} must have at least 2 dimensions, got {S.shape}")
    for name, a, is_block in [(n, a, False) for n, a in rows] + [(n, a, True) for n, a in blocks]:
        _check_array(name, a, None, (S.dtype,), where)
        want = S.shape[:-1] + (a.shape[-1:] if is_block else ())
        if a.shape != want:
            raise ValueError(f"{where}: {name} has shape {a.shape}; expected {want}")
    S2 = S.reshape(-1, S.shape[-1])
    if diagonal and S2.shape[0] % S2.shape[1]:
        raise ValueError(f"{where}: a diagonal tile's {S2.shape[0]} rows are not a multiple of "
                         f"its {S2.shape[1]} columns (query and key tiles must match)")
    return S2


def _attention_team(threads: int | None) -> int:
    """The OpenMP threads a tile kernel may use: the step's count (threads.set_threads) when
    None. A worker of the split attention passes 1: it owns one core, and a thread that
    OpenMP did not start sees the machine's default count, not the step's."""
    return int(_lib.minilars_max_threads()) if threads is None else threads


def attention_tile_softmax(S: np.ndarray, row_max: np.ndarray, row_sum: np.ndarray,
                           acc: np.ndarray, diagonal: bool, threads: int | None = None) -> None:
    """One key tile of the forward's online softmax, in place (see
    minilars.ops.attention_tiles.tile_softmax): S (..., tk) becomes P; row_max, row_sum
    (...) and acc (..., hd) are updated. `threads`: see _attention_team."""
    where = "attention_tile_softmax"
    S2 = _check_tile(where, "S", S, [("row_max", row_max), ("row_sum", row_sum)],
                     [("acc", acc)], diagonal)
    m, l, a = row_max.reshape(-1), row_sum.reshape(-1), acc.reshape(len(S2), -1)
    if not _c_for(S):
        return attention_spec.tile_softmax(S2, m, l, a, diagonal)
    _check_rc(_lib.minilars_attention_tile_softmax(
        _ptr("float[]", S2), S2.shape[0], S2.shape[1], S2.shape[1] if diagonal else 0,
        _ptr("float[]", m), _ptr("float[]", l), _ptr("float[]", a), a.shape[1],
        _attention_team(threads)), where)


def attention_tile_probs(S: np.ndarray, lse: np.ndarray, diagonal: bool,
                         threads: int | None = None) -> None:
    """S (..., tk) scores -> P = exp(S - lse) in place, lse (...) (see
    minilars.ops.attention_tiles.tile_probs). `threads`: see _attention_team."""
    where = "attention_tile_probs"
    S2 = _check_tile(where, "S", S, [("lse", lse)], [], diagonal)
    if not _c_for(S):
        return attention_spec.tile_probs(S2, lse.reshape(-1), diagonal)
    _check_rc(_lib.minilars_attention_tile_probs(
        _ptr("float[]", S2), S2.shape[0], S2.shape[1], S2.shape[1] if diagonal else 0,
        _ptr("float[]", lse), _attention_team(threads)), where)


def attention_tile_dscores(P: np.ndarray, dP: np.ndarray, D: np.ndarray,
                           threads: int | None = None) -> None:
    """dP (..., tk) -> dS = P * (dP - D) in place; P (..., tk), D (...) (see
    minilars.ops.attention_tiles.tile_dscores). `threads`: see _attention_team."""
    where = "attention_tile_dscores"
    dP2 = _check_tile(where, "dP", dP, [("D", D)], [("P", P)], False)
    if P.shape != dP.shape:
        raise ValueError(f"{where}: P has shape {P.shape}; expected dP's {dP.shape}")
    if not _c_for(dP):
        return attention_spec.tile_dscores(P.reshape(dP2.shape), dP2, D.reshape(-1))
    _check_rc(_lib.minilars_attention_tile_dscores(
        _ptr("float[]", P), _ptr("float[]", dP2), dP2.shape[0], dP2.shape[1],
        _ptr("float[]", D), _attention_team(threads)), where)


# ------------------------------------------------------------- frozen weights
#
# A frozen weight W (out, in) is a float32/float64 ndarray (NumPy's BLAS directly), a
# float16 ndarray, or a Packed matrix (bf16 bits; GGUF blocks of 32 weights along a row).
# Products with the narrow forms go one tile of W at a time: the tile is dequantized into a
# float32 buffer, by the C kernel minilars_dequantize into one buffer reused for every tile
# (the C path), or by NumPy into a new array (the twins, dequantize_numpy), and NumPy's
# BLAS multiplies by it with out= into the result's slice. Both paths run the same driver
# (_xwT_tiled, _dyW_tiled) with the same tiles, so they make the same BLAS calls on the
# same numbers: their results are bit-identical. Tile edges are multiples of _TILE_ALIGN
# (32), so they fall on the GGUF block boundaries. A new weight format is one more case in
# the C kernel and in dequantize_numpy; the driver does not change. With fewer than
# _FEW_ROWS rows (generation: one token), y = x W^T is one C call that streams W once
# (minilars_matvec_xwT).

_TILE_FLOATS = 1 << 19   # at most this many floats in one dequantized tile of W (2 MiB)
_TILE_ALIGN = 32         # tile edges on multiples of 32 (GGUF's blocks, BLAS's register tiles)
_FEW_ROWS = 8            # x with fewer rows: minilars_matvec_xwT (it measured faster up to ~10)
_MATVEC_ONE_THREAD = 1 << 22   # W of fewer weights: the matvec on one thread (see _matvec_xwT_c)

# Packed formats -> the C kernels' MINILARS_WEIGHT_* names (float16 ndarrays: ..._F16)
_PACKED_CODES = {"bf16": "MINILARS_WEIGHT_BF16", "q8_0": "MINILARS_WEIGHT_Q8_0",
                 "q4_0": "MINILARS_WEIGHT_Q4_0", "q4_1": "MINILARS_WEIGHT_Q4_1"}


def _check_frozen(name: str, W, where: str) -> None:
    """W must be a float16 ndarray or a Packed matrix of a known format whose data the C
    kernels can read (C-contiguous, non-empty; that data matches its shape is checked by
    Packed itself, when it is made)."""
    if isinstance(W, Packed):
        if W.format not in _PACKED_CODES:
            raise ValueError(f"{where}: {name} is a Packed matrix of format {W.format!r}; "
                             f"expected one of {', '.join(_PACKED_CODES)}")
        _check_array(f"{name}.data", W.data, 2, None, where)
        return
    _check_array(name, W, 2, _HALF, where)


def _block_cols(W) -> int:
    """Columns per block of W's format: 32 for the GGUF blocks, 1 otherwise."""
    return quant.BLOCK if isinstance(W, Packed) and W.format in quant.FORMATS else 1


def _weight_format(W) -> int:
    """The C kernels' MINILARS_WEIGHT_* code for W's format."""
    if isinstance(W, Packed):
        return getattr(_lib, _PACKED_CODES[W.format])
    return _lib.MINILARS_WEIGHT_F16


def _weight_ptr(W):
    """W's bytes, row after row, as the C kernels read them (a `const void *`)."""
    return _ffi.from_buffer("char[]", W.data if isinstance(W, Packed) else W)


def dequantize_numpy(W, r0: int, r1: int, c0: int, c1: int, dtype=np.float32) -> np.ndarray:
    """Twin of minilars_dequantize: W[r0:r1, c0:c1] of a float16 ndarray or a Packed
    matrix as a new (r1 - r0, c1 - c0) array of `dtype`, exactly: float16 by NumPy's cast,
    bf16 by frozen.bf16_values, GGUF blocks by quant.dequantize on the blocks of columns
    c0..c1 (on block boundaries) of rows r0..r1."""
    if not isinstance(W, Packed):
        return W[r0:r1, c0:c1].astype(dtype)
    if W.format == "bf16":
        return bf16_values(W.data[r0:r1, c0:c1]).astype(dtype, copy=False)
    nbytes = quant.BLOCK_BYTES[W.format]
    blocks = W.data[r0:r1, c0 // quant.BLOCK * nbytes:c1 // quant.BLOCK * nbytes]
    return quant.dequantize(blocks, W.format, c1 - c0).astype(dtype, copy=False)


def _split(n: int, most: int) -> list[tuple[int, int]]:
    """range(n) as the fewest pieces [(a0, a1), ...] of at most max(most, _TILE_ALIGN)
    values, all but the last of one size, a multiple of _TILE_ALIGN."""
    most = max(most // _TILE_ALIGN, 1) * _TILE_ALIGN
    pieces = -(-n // most)
    size = -(-(-(-n // pieces)) // _TILE_ALIGN) * _TILE_ALIGN      # <= most
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _xwT_tiles(out_features: int, in_features: int) -> list[tuple[int, int]]:
    """Row ranges [(m0, m1), ...] of W for y = x W^T: tiles of whole rows (all of `in`)."""
    return _split(out_features, _TILE_FLOATS // in_features)


def _dyW_tiles(out_features: int, in_features: int) -> list[tuple[int, int, int, int]]:
    """Tiles (k0, k1, c0, c1) of W for dx = dy W, in order. Column tiles over all of
    W's rows when a _TILE_ALIGN-wide one fits in _TILE_FLOATS (then each dx column range is
    one product, no accumulation); else (a tall W, such as a tied LM head) row tiles of all
    columns, whose products are summed into dx."""
    if out_features * _TILE_ALIGN <= _TILE_FLOATS:
        return [(0, out_features, c0, c1)
                for c0, c1 in _split(in_features, _TILE_FLOATS // out_features)]
    return [(k0, k1, 0, in_features)
            for k0, k1 in _split(out_features, _TILE_FLOATS // in_features)]


def tile_bytes(out_features: int, in_features: int) -> int:
    """Bytes of the float32 buffer that the C path dequantizes a (out, in) W's tiles into,
    the larger of its two products' (at most _TILE_FLOATS floats): the planner's figure."""
    xwT = max((m1 - m0) * in_features for m0, m1 in _xwT_tiles(out_features, in_features))
    dyW = max((k1 - k0) * (c1 - c0) for k0, k1, c0, c1 in _dyW_tiles(out_features, in_features))
    return 4 * max(xwT, dyW)


def _xwT_tiled(x: np.ndarray, W, dequantize) -> np.ndarray:
    """y (N, out) = x (N, in) W^T, W (out, in) dequantized a tile at a time by
    dequantize(r0, r1, c0, c1) -> (r1 - r0, c1 - c0) array of x's dtype."""
    out_features, in_features = W.shape
    y = np.empty((x.shape[0], out_features), dtype=x.dtype)           # (N, out)
    for m0, m1 in _xwT_tiles(out_features, in_features):
        np.matmul(x, dequantize(m0, m1, 0, in_features).T, out=y[:, m0:m1])
    return y


def _dyW_tiled(dy: np.ndarray, W, dequantize) -> np.ndarray:
    """dx (N, in) = dy (N, out) W, W (out, in) dequantized a tile at a time (see
    _xwT_tiled). Row tiles after the first of a column range are summed into dx through
    one (N, c1 - c0) temporary."""
    out_features, in_features = W.shape
    dx = np.empty((dy.shape[0], in_features), dtype=dy.dtype)         # (N, in)
    partial = None
    for k0, k1, c0, c1 in _dyW_tiles(out_features, in_features):
        # the tile (k1-k0, c1-c0) is not named, so the twin's new one per tile is freed
        # before the next, as the C path's buffer is reused
        if k0 == 0:
            np.matmul(dy[:, k0:k1], dequantize(k0, k1, c0, c1), out=dx[:, c0:c1])
            continue
        if partial is None:
            partial = np.empty((dy.shape[0], c1 - c0), dtype=dy.dtype)  # (N, c1-c0)
        np.matmul(dy[:, k0:k1], dequantize(k0, k1, c0, c1), out=partial)
        dx[:, c0:c1] += partial
    return dx


def matmul_xwT_numpy(x: np.ndarray, W) -> np.ndarray:
    """Twin of the C path: y (N, out) = x (N, in) W^T, W (out, in) float16 or Packed,
    dequantized by NumPy into a new array per tile (the same tiles as the C path)."""
    return _xwT_tiled(x, W, lambda r0, r1, c0, c1: dequantize_numpy(W, r0, r1, c0, c1, x.dtype))


def matmul_dyW_numpy(dy: np.ndarray, W) -> np.ndarray:
    """Twin of the C path: dx (N, in) = dy (N, out) W, W as in matmul_xwT_numpy."""
    return _dyW_tiled(dy, W, lambda r0, r1, c0, c1: dequantize_numpy(W, r0, r1, c0, c1, dy.dtype))


def _c_dequantizer(where: str, W, tiles) -> callable:
    """dequantize(r0, r1, c0, c1) for the driver: the C kernel writing into one float32
    buffer, sized for the largest of `tiles` (r0, r1, c0, c1) and reused for each."""
    rows, cols = (int(n) for n in W.shape)
    buffer = _workspace(where, max((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in tiles))
    W_ptr, fmt = _weight_ptr(W), _weight_format(W)

    def dequantize(r0, r1, c0, c1):
        tile = buffer[:(r1 - r0) * (c1 - c0)].reshape(r1 - r0, c1 - c0)
        _check_rc(_lib.minilars_dequantize(W_ptr, fmt, rows, cols, r0, r1, c0, c1,
                                           _ptr("float[]", tile)), where)
        return tile
    return dequantize


def _is_float(W) -> bool:
    return isinstance(W, np.ndarray) and W.dtype in _FLOATS


def _check_matmul(where, a_name, a, W, a_dim_of_W):
    _check_array(a_name, a, 2, _FLOATS, where)
    if isinstance(W, Packed):
        _check_frozen("W", W, where)
    else:
        _check_array("W", W, 2, _FLOATS + _HALF, where)
        if W.dtype in _FLOATS and W.dtype != a.dtype:
            raise ValueError(f"{where}: W has dtype {W.dtype} but {a_name} has {a.dtype}")
    if a.shape[1] != W.shape[a_dim_of_W]:
        raise ValueError(f"{where}: {a_name} has shape {a.shape} but W has shape "
                         f"{tuple(W.shape)}; {a_name}.shape[1] must equal W.shape[{a_dim_of_W}]")


def _matvec_xwT_c(where: str, x: np.ndarray, W) -> np.ndarray:
    """y (rows, out) = x (rows, in) W^T in one C call that streams W once (few rows).
    One thread for a W of fewer than _MATVEC_ONE_THREAD weights: waking OpenMP's sleeping
    threads (and sharing cores with BLAS's, still spinning after the last product) costs
    more than they save there (an MLP matrix of SmolLM2, 1536 x 576 in Q8_0: 0.08 ms on
    one thread, 0.13 ms on two, on 2 cores); the tied LM head (28 M weights) uses them."""
    rows, in_features = x.shape
    out_features = int(W.shape[0])
    threads = (1 if out_features * in_features < _MATVEC_ONE_THREAD
               else int(_lib.minilars_max_threads()))
    y = np.empty((rows, out_features), dtype=np.float32)             # (rows, out)
    work = _workspace(where, _lib.minilars_matvec_xwT_workspace(in_features, threads))
    rc = _lib.minilars_matvec_xwT(_ptr("float[]", x), _weight_ptr(W),
                                  _weight_format(W), rows, in_features, out_features,
                                  _ptr("float[]", y), threads, _ptr("float[]", work), work.size)
    _check_rc(rc, where)
    return y


def matmul_xwT(x: np.ndarray, W) -> np.ndarray:
    """y (N, out) = x (N, in) W^T for W (out, in) a float32/float64 ndarray (NumPy BLAS), a
    float16 ndarray or a Packed matrix (dequantized a tile at a time, float32 BLAS, when x
    is float32 and the C path is on; else the twin matmul_xwT_numpy)."""
    where = "matmul_xwT"
    _check_matmul(where, "x", x, W, 1)
    if _is_float(W):
        return x @ W.T
    if not _c_for(x):
        return matmul_xwT_numpy(x, W)
    if x.shape[0] < _FEW_ROWS:
        return _matvec_xwT_c(where, x, W)
    return _xwT_tiled(x, W, _c_dequantizer(where, W, [(m0, m1, 0, W.shape[1])
                                                      for m0, m1 in _xwT_tiles(*W.shape)]))


def matmul_dyW(dy: np.ndarray, W) -> np.ndarray:
    """dx (N, in) = dy (N, out) W for W (out, in), forms and paths as in matmul_xwT
    (without the few-rows kernel: dx = dy W is training, not generation)."""
    where = "matmul_dyW"
    _check_matmul(where, "dy", dy, W, 0)
    if _is_float(W):
        return dy @ W
    if not _c_for(dy):
        return matmul_dyW_numpy(dy, W)
    return _dyW_tiled(dy, W, _c_dequantizer(where, W, _dyW_tiles(*W.shape)))


def dequantize(W, rows: tuple[int, int] | None = None,
               cols: tuple[int, int] | None = None) -> np.ndarray:
    """W[r0:r1, c0:c1] of a float16 ndarray or Packed matrix W as a new float32 array,
    rows=(r0, r1) and cols=(c0, c1) defaulting to all (for GGUF blocks c0 and c1 must be
    multiples of 32): the C kernel when the C path is on, else dequantize_numpy (both
    exact, and equal bit for bit)."""
    where = "dequantize"
    _check_frozen("W", W, where)
    bounds = []
    for name, span, n in (("rows", rows, W.shape[0]), ("cols", cols, W.shape[1])):
        span = (0, n) if span is None else span
        if not (isinstance(span, (tuple, list)) and len(span) == 2
                and all(isinstance(a, (int, np.integer)) for a in span)
                and 0 <= span[0] < span[1] <= n):
            raise ValueError(f"{where}: {name} {span!r} must be (start, stop) with "
                             f"0 <= start < stop <= {n}")
        bounds += [int(span[0]), int(span[1])]
    block = _block_cols(W)
    if bounds[2] % block or bounds[3] % block:
        raise ValueError(f"{where}: cols {tuple(bounds[2:])} must fall on the {W.format} "
                         f"blocks' boundaries (multiples of {block})")
    if not _enabled:
        return dequantize_numpy(W, *bounds)
    return _c_dequantizer(where, W, [bounds])(*bounds)     # its buffer is this one tile


def gather_rows(E, index) -> np.ndarray:
    """Rows `index` (1-D integers, each in [0, rows)) of a float16 ndarray or Packed matrix
    E (rows, in) as a new (len(index), in) float32 array, dequantizing only those rows (an
    embedding lookup): the C kernel minilars_gather_rows when the C path is on, else its
    twin frozen.rows_to_float (equal bit for bit)."""
    where = "gather_rows"
    _check_frozen("E", E, where)
    index = np.asarray(index)
    if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
        raise ValueError(f"{where}: index must be a 1-D array of integers, got "
                         f"{index.dtype} of shape {index.shape}")
    rows, cols = (int(n) for n in E.shape)
    if index.size and (index.min() < 0 or index.max() >= rows):
        bad = index[(index < 0) | (index >= rows)][0]
        raise ValueError(f"{where}: index holds {int(bad)}, outside [0, {rows}) "
                         f"(the rows of E)")
    if not _enabled or index.size == 0:
        return rows_to_float(E, index, np.float32)
    index64 = np.ascontiguousarray(index, dtype=np.int64)             # (n,)
    out = np.empty((index.size, cols), dtype=np.float32)              # (n, in)
    rc = _lib.minilars_gather_rows(_weight_ptr(E), _weight_format(E), rows, cols,
                                   _ffi.from_buffer("int64_t[]", index64), index.size,
                                   _ptr("float[]", out))
    _check_rc(rc, where)
    return out
