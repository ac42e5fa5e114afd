"""The Llama-family model: whole-model forward and backward, written out by hand.

    h = E[tokens]                                             (B, T, C)
    for each layer i:                                         block_forward / block_backward
        a = rmsnorm(h, w_in);  q, k, v = a Wq^T, a Wk^T, a Wv^T (+ biases for Qwen2)
        q, k = rope(q), rope(k);  o = causal GQA attention(q, k, v)
        h = h + o Wo^T
        m = rmsnorm(h, w_post);  h = h + (silu(m Wg^T) * (m Wu^T)) Wd^T
    loss = cross-entropy(rmsnorm(h, w_final) E^T, targets)    chunked, backward fused

minilars.reference writes the same forward in fifty plain lines; this one adds what
training needs. What a block keeps for its backward is declared first (block_saved: every
tensor by op and name, with its shape, dtype, buffer and why), and the forward keeps
through `Saved`, which holds it to that declaration and mirrors it in the memory ledger;
the backward releases each op's tensors as soon as it has consumed them. The memory
planner reads the same declarations.

Recompute policies:
  none   every block keeps what its backward needs.
  layer  a block keeps only its input (the "checkpoint"); its backward first re-runs the
         block's forward, keeping, then runs the backward. Saved memory becomes
         n_layers x (B, T, C) plus one block's working set, for one extra forward.

Layers below the lowest one that holds a trainable tensor run forward only: nothing is
saved for them and the backward stops above them. With a KV cache (generation), the same
block code attends to the cached keys and values of earlier positions.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from minilars import kernels, threads
from minilars.adapters.common import Site
from minilars.config import ModelConfig
from minilars.memory import Ledger, keep_freed_memory
from minilars.ops.attention import (DEFAULT_TILE, attention_op_backward_workspace,
                                    attention_plain_backward, attention_plain_forward,
                                    attention_saves, attention_tiled_backward,
                                    attention_tiled_forward)
from minilars.ops.embedding import check_tokens, embedding_backward, embedding_forward
from minilars.ops.linear import _matmul_dyW, _matmul_xwT, linear_backward, linear_forward, linear_saves
from minilars.ops.loss import (DEFAULT_CHUNK, IGNORE, count_targets, cross_entropy_chunked,
                               cross_entropy_plain, loss_saves)
from minilars.ops.mlp import swiglu_saves
from minilars.ops.rmsnorm import rmsnorm_backward, rmsnorm_forward, rmsnorm_saves
from minilars.ops.rope import rope_backward, rope_forward, rope_saves, rope_tables
from minilars.params import init_params, linear_module, linear_shapes, lm_head_name
from minilars.checkpoints import CHECKPOINT_STORES, open_store, read_buffer_keep
from minilars.saved import Keep, Saved

POLICIES = ("none", "layer")
ATTENTION_FORMS = ("plain", "tiled")
LOSS_FORMS = ("plain", "chunked")


@dataclass
class Model:
    """Config + HF-named parameters + which of them train + the adapter on its linears.

    trainable: names (in `params`) that get gradients. Full fine-tuning: all of them.
    adapter:   the adapter's settings (minilars.adapters: LoRA, IA3, LARS) or None.
    adapted:   the (layer, linear) pairs the adapter sits on. Its tensors live in
               `params` under PEFT-style names and are what `trainable` lists.
    dtype:     compute dtype (float32, or float64 for gradient checks). Frozen matrices
               may be stored in float16; activations are always in `dtype`.
    """
    cfg: ModelConfig
    params: dict
    trainable: set = field(default_factory=set)
    dtype: type = np.float32
    adapter: object = None
    adapted: tuple = ()

    @classmethod
    def random(cls, cfg: ModelConfig, seed: int = 0, dtype=np.float32,
               frozen_dtype: str | None = None) -> "Model":
        """Seeded random weights, every matrix in `frozen_dtype` if given (adapter methods)."""
        return cls(cfg, init_params(cfg, seed, dtype, frozen_dtype), dtype=dtype)

    def train_all(self) -> "Model":
        """Full fine-tuning: every base parameter trains."""
        self.trainable = set(self.params)
        return self

    def base_param_count(self) -> int:
        return self.cfg.n_params


@dataclass(frozen=True)
class StepOptions:
    policy: str = "none"          # recompute policy: none | layer
    attention: str = "tiled"      # plain | tiled
    loss: str = "chunked"         # plain | chunked
    tile: int = DEFAULT_TILE      # attention tile (queries and keys)
    ce_chunk: int = DEFAULT_CHUNK # rows of logits alive at once in the loss
    checkpoints: str = "ram"      # where policy layer keeps block inputs: ram | bf16 | disk
    scratch_dir: str | None = None  # the disk store's folder (default: a temp dir)
    mlp_rows: int = 0             # policy layer: recompute and backprop the MLP this many
                                  # rows at a time (0: the whole block at once)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown recompute policy {self.policy!r}; expected one of {POLICIES}")
        if self.attention not in ATTENTION_FORMS:
            raise ValueError(f"unknown attention form {self.attention!r}; expected one of {ATTENTION_FORMS}")
        if self.loss not in LOSS_FORMS:
            raise ValueError(f"unknown loss form {self.loss!r}; expected one of {LOSS_FORMS}")
        if self.tile < 1 or self.ce_chunk < 1:
            raise ValueError("tile and ce_chunk must be positive")
        if self.checkpoints not in CHECKPOINT_STORES:
            raise ValueError(f"unknown checkpoint store {self.checkpoints!r}; expected one of "
                             f"{CHECKPOINT_STORES}")
        if self.mlp_rows < 0 or (self.mlp_rows and self.policy != "layer"):
            raise ValueError(f"--mlp-rows {self.mlp_rows}: a positive row count, for --policy "
                             f"layer (whose backward recomputes each block)")
        if self.checkpoints != "ram" and self.policy != "layer":
            raise ValueError(f"--checkpoints {self.checkpoints} stores the block inputs of "
                             f"--policy layer; policy {self.policy!r} keeps none")


@dataclass
class Rope:
    cos: np.ndarray   # (T, hd)
    sin: np.ndarray   # (T, hd)


# ------------------------------------------------------------------------ input checks

def check_inputs(cfg: ModelConfig, tokens: np.ndarray, targets: np.ndarray | None = None,
                 start: int = 0):
    """tokens (B, T) of valid ids at positions start .. start + T - 1 (and targets of the
    same shape): a named error for anything else, before any work."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be a (batch, seq) array, got shape {tokens.shape}")
    B, T = tokens.shape
    if T == 0 or B == 0:
        raise ValueError(f"tokens must not be empty, got shape {tokens.shape}")
    if start + T > cfg.max_position_embeddings:
        raise ValueError(f"sequence length {start + T} exceeds the model's "
                         f"max_position_embeddings ({cfg.max_position_embeddings})")
    check_tokens(tokens, cfg.vocab_size)
    if targets is not None:
        if np.shape(targets) != tokens.shape:
            raise ValueError(f"targets shape {np.shape(targets)} must equal tokens shape {tokens.shape}")
        count_targets(np.asarray(targets).reshape(-1), cfg.vocab_size)   # before any work
    return tokens


def next_token_targets(tokens: np.ndarray, loss_mask: np.ndarray | None = None) -> np.ndarray:
    """targets[b, t] = tokens[b, t+1]; the last position, and positions whose *target*
    is masked out (loss_mask[b, t+1] false), get IGNORE."""
    targets = np.full(tokens.shape, IGNORE, dtype=np.int64)
    targets[:, :-1] = tokens[:, 1:]
    if loss_mask is not None:
        targets[:, :-1][~np.asarray(loss_mask, dtype=bool)[:, 1:]] = IGNORE
    return targets


# ------------------------------------------------------------------------ what is kept, declared

def linear_saved(model: Model, layer: int, linear: str, x_buffer: str, x_shape: tuple) -> list:
    """What one of the block's linears keeps: its adapter's declaration, else its input
    when its weight trains, else nothing."""
    if (layer, linear) in model.adapted:
        out_features = linear_shapes(model.cfg)[linear][0]
        return model.adapter.saves(linear, x_buffer, x_shape, out_features, model.dtype)
    need_dW = linear_module(layer, linear) + ".weight" in model.trainable
    return linear_saves(linear, x_buffer, x_shape, model.dtype, need_dW)


def block_saved(model: Model, i: int, B: int, T: int, opts: StepOptions) -> dict:
    """Everything block i keeps for its backward, op by op in the order its forward keeps
    them: (op, name) -> Keep. The block's shared buffers are h_in (its input), attn_in
    (the normed input of q, k, v), attn_out (attention's output, o_proj's input), h_mid,
    mlp_in (the normed input of gate and up) and act (down_proj's input). With mlp_rows
    the MLP half keeps only its input h_mid; mlp_rows_saved declares each row block."""
    cfg, dt = model.cfg, model.dtype
    C, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    keeps = [*rmsnorm_saves("attn_norm", "h_in", (B, T, C), dt),
             *linear_saved(model, i, "q_proj", "attn_in", (B, T, C)),
             *linear_saved(model, i, "k_proj", "attn_in", (B, T, C)),
             *linear_saved(model, i, "v_proj", "attn_in", (B, T, C)),
             *attention_saves(opts.attention, B, nh, nkv, T, hd, dt, out_buffer="attn_out"),
             *linear_saved(model, i, "o_proj", "attn_out", (B, T, nh * hd))]
    if opts.mlp_rows:
        keeps.append(Keep("mlp_rows", "h_mid", (B, T, C), dt, "the MLP half's input: its "
                          "backward recomputes it a block of rows at a time", buffer="h_mid"))
    else:
        keeps += mlp_saved(model, i, (B, T))
    return {(k.op, k.name): k for k in keeps}


def mlp_saved(model: Model, i: int, lead: tuple) -> list:
    """What block i's MLP half keeps for rows of shape `lead` ((B, T), or (1, rows))."""
    cfg, dt = model.cfg, model.dtype
    C, F = cfg.hidden_size, cfg.intermediate_size
    return [*rmsnorm_saves("mlp_norm", "h_mid", lead + (C,), dt),
            *linear_saved(model, i, "gate_proj", "mlp_in", lead + (C,)),
            *linear_saved(model, i, "up_proj", "mlp_in", lead + (C,)),
            *swiglu_saves(lead + (F,), dt),
            *linear_saved(model, i, "down_proj", "act", lead + (F,))]


def mlp_rows_saved(model: Model, i: int, rows: int) -> dict:
    """What one row block of block i's MLP keeps (its input is a view of h_mid)."""
    return {(k.op, k.name): k for k in mlp_saved(model, i, (1, rows))}


def step_saved(model: Model, B: int, T: int, opts: StepOptions) -> dict:
    """What the step keeps outside the blocks (layer -1): the rope tables, the final
    norm's input and rstd, the loss gradient waiting for the backward, and the disk
    checkpoint store's read-back buffer."""
    cfg, dt = model.cfg, model.dtype
    keeps = [*rope_saves(T, cfg.head_dim, dt),
             *rmsnorm_saves("final_norm", "h_final", (B, T, cfg.hidden_size), dt),
             *loss_saves(B * T, cfg.hidden_size, dt)]
    if opts.policy == "layer" and opts.checkpoints == "disk":
        keeps.append(read_buffer_keep((B, T, cfg.hidden_size), dt))
    return {(k.op, k.name): k for k in keeps}


# ------------------------------------------------------------------------ linears + adapters

def linear_site(model: Model, layer: int, linear: str) -> Site:
    """An adapted linear as its adapter sees it: W, b and the adapter's own tensors."""
    module, p = linear_module(layer, linear), model.params
    return Site(layer, linear, module, p[module + ".weight"], p.get(module + ".bias"),
                {s: p[f"{module}.{s}"] for s in model.adapter.tensors})


def project(model: Model, layer: int, linear: str, x: np.ndarray, saved: Saved) -> np.ndarray:
    """One of the block's linears, with its adapter if it has one. x (B, T, in) -> (B, T, out).
    Keeps x only when W trains (dW = dy^T x); an adapter keeps what it declares."""
    if (layer, linear) in model.adapted:
        return model.adapter.forward(linear_site(model, layer, linear), x, saved)
    module = linear_module(layer, linear)
    if module + ".weight" in model.trainable:
        saved.keep(linear, "x", x)
    return linear_forward(x, model.params[module + ".weight"], model.params.get(module + ".bias"))


def project_backward(model: Model, layer: int, linear: str, dy: np.ndarray, saved: Saved,
                     grads: dict, need_dx: bool = True) -> np.ndarray | None:
    """dx of one of the block's linears (None if not needed); adds the gradients of what
    trains there into `grads` and releases the linear's kept tensors."""
    module = linear_module(layer, linear)
    if (layer, linear) in model.adapted:
        dx, adapter_grads = model.adapter.backward(linear_site(model, layer, linear), dy,
                                                   saved, need_dx)
        for suffix, g in adapter_grads.items():
            if f"{module}.{suffix}" in model.trainable:
                grads[f"{module}.{suffix}"] += g
    else:
        wname, bname = module + ".weight", module + ".bias"
        need_dW = wname in model.trainable
        dx, dW, db = linear_backward(dy, saved.get(linear, "x") if need_dW else None,
                                     model.params[wname], need_dx=need_dx, need_dW=need_dW,
                                     need_db=bname in model.trainable)
        if dW is not None:
            grads[wname] += dW
        if db is not None:
            grads[bname] += db
    saved.release(linear)
    return dx


# ------------------------------------------------------------------------ one block

def _heads(x: np.ndarray, n: int) -> np.ndarray:
    """(B, T, n*hd) -> (B, n, T, hd) view."""
    B, T, D = x.shape
    return x.reshape(B, T, n, D // n).transpose(0, 2, 1, 3)


def _merge_heads(x: np.ndarray) -> np.ndarray:
    """(B, n, T, hd) -> (B, T, n*hd), a contiguous copy."""
    B, n, T, hd = x.shape
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3)).reshape(B, T, n * hd)


def attention_forward(model: Model, i: int, h: np.ndarray, rope: Rope, saved: Saved,
                      opts: StepOptions, cache=None) -> np.ndarray:
    """The attention half of block i: o_proj(attention(rope(q), rope(k), v)) of
    rmsnorm(h), (B, T, C). With a KV cache the keys and values of earlier positions come
    from the cache (cache.attend) and nothing is kept."""
    cfg, p = model.cfg, model.params
    B, T, C = h.shape
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    a, rstd = rmsnorm_forward(h, p[f"model.layers.{i}.input_layernorm.weight"], cfg.rms_norm_eps)
    saved.keep("attn_norm", "x", h)
    saved.keep("attn_norm", "rstd", rstd)
    q = project(model, i, "q_proj", a, saved)                           # (B, T, nh*hd)
    k = project(model, i, "k_proj", a, saved)                           # (B, T, nkv*hd)
    v = project(model, i, "v_proj", a, saved)                           # (B, T, nkv*hd)
    del a
    q = rope_forward(_heads(q, nh), rope.cos, rope.sin)                 # (B, nh, T, hd)
    k = rope_forward(_heads(k, nkv), rope.cos, rope.sin)                # (B, nkv, T, hd)
    if cache is not None:
        out = cache.attend(i, q, k, _heads(v, nkv))                     # (B, T, nh, hd)
    else:
        v = np.ascontiguousarray(_heads(v, nkv))                        # (B, nkv, T, hd)
        saved.keep("attention", "q", q)
        saved.keep("attention", "k", k)
        saved.keep("attention", "v", v)
        if opts.attention == "plain":
            out, P = attention_plain_forward(q, k, v)                   # out (B, T, nh, hd)
            saved.keep("attention", "P", P)                             # (B, nh, T, T)
        else:
            out, lse = attention_tiled_forward(q, k, v, opts.tile, threads.current_threads())
            saved.keep("attention", "out", out)
            saved.keep("attention", "lse", lse)                         # (B, nh, T)
    del q, k, v
    return project(model, i, "o_proj", out.reshape(B, T, nh * cfg.head_dim), saved)


def mlp_forward(model: Model, i: int, h: np.ndarray, saved: Saved) -> np.ndarray:
    """The MLP half of block i: down(silu(gate(m)) * up(m)), m = rmsnorm(h), (B, T, C)."""
    cfg = model.cfg
    m, rstd = rmsnorm_forward(h, model.params[f"model.layers.{i}.post_attention_layernorm.weight"],
                              cfg.rms_norm_eps)
    saved.keep("mlp_norm", "x", h)
    saved.keep("mlp_norm", "rstd", rstd)
    g = project(model, i, "gate_proj", m, saved)                        # (B, T, F)
    u = project(model, i, "up_proj", m, saved)                          # (B, T, F)
    del m
    saved.keep("swiglu", "g", g)
    saved.keep("swiglu", "u", u)
    act = kernels.swiglu_forward(g, u)                                  # (B, T, F)
    del g, u
    return project(model, i, "down_proj", act, saved)


def mlp_forward_by_rows(model: Model, i: int, h_mid: np.ndarray, rows: int,
                        saved: Saved) -> np.ndarray:
    """The MLP half of block i, `rows` rows at a time, keeping nothing (`saved` keeps
    nothing): its (rows, F) intermediates instead of three (B*T, F) ones (72 MiB at T=4096
    on SmolLM2). The forward of a block that policy layer with mlp_rows recomputes, so
    the forward's peak is bounded as the backward's is."""
    B, T, C = h_mid.shape
    h2 = h_mid.reshape(-1, C)
    out = np.empty_like(h2)                                             # (B*T, C)
    for r0 in range(0, B * T, rows):
        n = h2[r0:r0 + rows].shape[0]
        out[r0:r0 + n] = mlp_forward(model, i, h2[r0:r0 + n].reshape(1, n, C), saved)[0]
    return out.reshape(B, T, C)


def block_forward(model: Model, i: int, h: np.ndarray, rope: Rope, saved: Saved,
                  opts: StepOptions, cache=None) -> np.ndarray:
    """h (B, T, C) -> h (B, T, C). Keeps into `saved` what block_backward will need
    (block_saved declares it). A forward that keeps nothing runs the MLP by opts.mlp_rows
    rows when that is set."""
    h = h + attention_forward(model, i, h, rope, saved, opts, cache)    # h_mid
    if opts.mlp_rows and not saved.enabled:
        return h + mlp_forward_by_rows(model, i, h, opts.mlp_rows, saved)
    return h + mlp_forward(model, i, h, saved)


def mlp_backward(model: Model, i: int, dh_out: np.ndarray, saved: Saved, grads: dict):
    """dh_out (B, T, C) -> the MLP half's dh_mid contribution (B, T, C)."""
    wname = f"model.layers.{i}.post_attention_layernorm.weight"
    dact = project_backward(model, i, "down_proj", dh_out, saved, grads)
    dg, du = kernels.swiglu_backward(dact, saved.get("swiglu", "g"), saved.get("swiglu", "u"),
                                     dg_out=dact)               # dg takes dact's place
    saved.release("swiglu")
    del dact
    dm = project_backward(model, i, "gate_proj", dg, saved, grads)
    del dg
    dm += project_backward(model, i, "up_proj", du, saved, grads)
    del du
    dx, dw = rmsnorm_backward(dm, saved.get("mlp_norm", "x"), saved.get("mlp_norm", "rstd"),
                              model.params[wname], need_dw=wname in model.trainable)
    saved.release("mlp_norm")
    if dw is not None:
        grads[wname] += dw
    return dx


def attention_backward(model: Model, i: int, dh_mid: np.ndarray, rope: Rope, saved: Saved,
                       grads: dict, opts: StepOptions, need_dx: bool):
    """dh_mid (B, T, C) -> the attention half's dh_in contribution (None if not needed)."""
    cfg = model.cfg
    B, T, C = dh_mid.shape
    wname = f"model.layers.{i}.input_layernorm.weight"
    dout = project_backward(model, i, "o_proj", dh_mid, saved, grads)
    dout = dout.reshape(B, T, cfg.num_attention_heads, cfg.head_dim)
    q, k, v = (saved.get("attention", n) for n in "qkv")
    if opts.attention == "plain":
        dq, dk, dv = attention_plain_backward(dout, q, k, v, saved.get("attention", "P"))
    else:
        dq, dk, dv = attention_tiled_backward(dout, q, k, v, saved.get("attention", "out"),
                                              saved.get("attention", "lse"), opts.tile,
                                              attention_backward_workers(opts))
    saved.release("attention")
    del dout, q, k, v
    dq = _merge_heads(rope_backward(dq, rope.cos, rope.sin))            # (B, T, nh*hd)
    dk = _merge_heads(rope_backward(dk, rope.cos, rope.sin))            # (B, T, nkv*hd)
    dv = _merge_heads(dv)
    need_da = need_dx or wname in model.trainable    # the input norm's weight gradient needs da
    da = project_backward(model, i, "q_proj", dq, saved, grads, need_da)
    del dq
    dak = project_backward(model, i, "k_proj", dk, saved, grads, need_da)
    dav = project_backward(model, i, "v_proj", dv, saved, grads, need_da)
    del dk, dv
    dx = dw = None
    if need_da:
        da += dak
        da += dav
        del dak, dav
        dx, dw = rmsnorm_backward(da, saved.get("attn_norm", "x"), saved.get("attn_norm", "rstd"),
                                  model.params[wname], need_dx=need_dx,
                                  need_dw=wname in model.trainable)
    saved.release("attn_norm")
    if dw is not None:
        grads[wname] += dw
    return dx


def attention_backward_workspace(cfg: ModelConfig, B: int, T: int, opts: StepOptions,
                                 itemsize: int) -> int:
    """Bytes attention_backward allocates at its peak beyond its input: o_proj's dx beside
    the attention op's backward (attention_op_backward_workspace). Later, the
    saved q, k, v and dx are freed before the q, k, v projections' dx and the norm's
    backward are made, so those stay below this (about 3.0 (T, C) floats on SmolLM2 at
    T=4096, where a sum of every array once declared 5.3 and overpredicted by 12 MiB)."""
    return (B * T * cfg.q_dim * itemsize
            + attention_op_backward_workspace(opts.attention, B, cfg.num_attention_heads,
                                              cfg.num_key_value_heads, T, cfg.head_dim,
                                              opts.tile, itemsize,
                                              attention_backward_workers(opts)))


def attention_backward_workers(opts: StepOptions) -> int:
    """Threads the tiled attention's backward is split over: the step's threads, but one
    with mlp_rows. Each further worker holds its own tiles and its own dk and dv (about
    5.8 MiB at T=2048 on SmolLM2), and with mlp_rows, the setting a tight budget picks,
    the attention half's backward is the step's peak: there the split would raise it."""
    return 1 if opts.mlp_rows else threads.current_threads()


def block_backward(model: Model, i: int, dh_out: np.ndarray, rope: Rope, saved: Saved,
                   grads: dict, opts: StepOptions, need_dx: bool = True):
    """dh_out (B, T, C) -> dh_in (B, T, C) (None if not needed); releases what it consumes."""
    if opts.mlp_rows:
        dh_mid = mlp_backward_by_rows(model, i, dh_out, saved, grads, opts)
    else:
        dh_mid = dh_out + mlp_backward(model, i, dh_out, saved, grads)
    dx = attention_backward(model, i, dh_mid, rope, saved, grads, opts, need_dx)
    return dh_mid + dx if need_dx else None


def recompute_block(model: Model, i: int, h: np.ndarray, rope: Rope, saved: Saved,
                    opts: StepOptions) -> None:
    """Policy layer, before block i's backward: its forward again, keeping. With mlp_rows
    the MLP half is not run here: only its input h_mid is kept, for mlp_backward_by_rows."""
    if not opts.mlp_rows:
        block_forward(model, i, h, rope, saved, opts)
        return
    saved.keep("mlp_rows", "h_mid", h + attention_forward(model, i, h, rope, saved, opts))


def mlp_backward_by_rows(model: Model, i: int, dh_out: np.ndarray, saved: Saved,
                         grads: dict, opts: StepOptions) -> np.ndarray:
    """dh_mid (B, T, C) through block i's MLP half, opts.mlp_rows rows at a time: each row
    block is recomputed (keeping only its own saved set) and backpropagated at once. The
    MLP acts on each position alone, so the gradients are those of the whole block."""
    h_mid = saved.get("mlp_rows", "h_mid")
    B, T, C = h_mid.shape
    h2, d2 = h_mid.reshape(-1, C), dh_out.reshape(-1, C)
    dh_mid = np.empty_like(d2)                                          # (B*T, C)
    for r0 in range(0, B * T, opts.mlp_rows):
        rows = slice(r0, r0 + opts.mlp_rows)
        n = h2[rows].shape[0]
        part = Saved(saved.ledger, i, mlp_rows_saved(model, i, n), saved.training,
                     saved.dropout_key)
        mlp_forward(model, i, h2[rows].reshape(1, n, C), part)
        dh_mid[rows] = d2[rows] + mlp_backward(model, i, d2[rows].reshape(1, n, C), part,
                                               grads)[0]
    saved.release("mlp_rows")
    return dh_mid.reshape(B, T, C)


# ------------------------------------------------------------------------ whole model

def lowest_trainable_layer(model: Model) -> int:
    """Index of the lowest block whose backward must run; 0 when the embedding trains,
    n_layers when nothing inside the blocks (or below them) trains."""
    L = model.cfg.num_hidden_layers
    if "model.embed_tokens.weight" in model.trainable:
        return 0
    lowest = L
    for name in model.trainable:
        if name.startswith("model.layers."):
            lowest = min(lowest, int(name.split(".")[2]))
    return lowest


def zero_grads(model: Model, ledger: Ledger | None = None) -> dict:
    """One gradient buffer per trainable tensor (kept across steps, like llm.c)."""
    grads = {}
    for name in sorted(model.trainable):
        grads[name] = np.zeros(model.params[name].shape, dtype=model.dtype)
        if ledger is not None:
            ledger.keep(-1, "grad", name, grads[name], category="gradients")
    return grads


@dataclass
class _Step:
    """One training step's shared state: sizes, rope tables, the ledger, the stores."""
    model: Model
    opts: StepOptions
    ledger: Ledger
    dropout_key: tuple
    B: int
    T: int
    rope: Rope = None
    outer: Saved = None                                  # layer -1: rope, final norm, loss
    saveds: dict = field(default_factory=dict)           # layer -> its Saved
    store: object = None                                 # policy layer: the checkpoint store
    dh: np.ndarray = None                                # the gradient flowing down the blocks

    def block_store(self, i: int) -> Saved:
        return Saved(self.ledger, i, block_saved(self.model, i, self.B, self.T, self.opts),
                     dropout_key=self.dropout_key)

    def passing(self) -> Saved:
        """A training forward that keeps nothing (below the lowest trainable layer, or
        before a recompute): dropout as in training."""
        return Saved.nothing(training=True, dropout_key=self.dropout_key)


def _forward_blocks(step: _Step, h: np.ndarray, lowest: int) -> np.ndarray:
    model, opts = step.model, step.opts
    passing = step.passing()
    for i in range(model.cfg.num_hidden_layers):
        if i >= lowest and opts.policy == "none":
            step.saveds[i] = step.block_store(i)
            h = block_forward(model, i, h, step.rope, step.saveds[i], opts)
            continue
        if i >= lowest:                          # policy "layer": keep only the block input
            step.store.put(i, h)
        h = block_forward(model, i, h, step.rope, passing, opts)
    return h


def _loss_forward_backward(step: _Step, h: np.ndarray, targets: np.ndarray, grads: dict):
    """Final norm, LM head and loss with the loss's gradient (fused, chunked): returns
    (loss, dh (B, T, C)) and frees what it kept."""
    model, opts, outer = step.model, step.opts, step.outer
    cfg, p, trainable = model.cfg, model.params, model.trainable
    C = cfg.hidden_size
    xf, rstd = rmsnorm_forward(h, p["model.norm.weight"], cfg.rms_norm_eps)
    outer.keep("final_norm", "x", h)
    outer.keep("final_norm", "rstd", rstd)
    del h
    head = lm_head_name(cfg)
    flat_targets = targets.reshape(-1)
    if opts.loss == "plain":
        loss, dxf, dW_head = cross_entropy_plain(xf.reshape(-1, C), p[head], flat_targets,
                                                 need_dW=head in trainable)
        if dW_head is not None:
            grads[head] += dW_head
        del dW_head
    else:
        loss, dxf = cross_entropy_chunked(
            xf.reshape(-1, C), p[head], flat_targets, need_dx=True,
            dW=grads[head] if head in trainable else None, chunk=opts.ce_chunk,
            matmul_xwT=_matmul_xwT, matmul_dyW=_matmul_dyW)
    del xf
    if not np.isfinite(loss):
        step.ledger.release_category("activations")  # nothing of this step stays registered
        raise FloatingPointError(f"loss is {loss}: the forward pass produced NaN or Inf")
    outer.keep("loss", "dx", dxf)            # the loss gradient waits here for the backward
    wname = "model.norm.weight"
    dh, dw = rmsnorm_backward(dxf.reshape(step.B, step.T, C), outer.get("final_norm", "x"),
                              outer.get("final_norm", "rstd"), p[wname],
                              need_dw=wname in trainable)
    outer.release("final_norm")
    outer.release("loss")
    if dw is not None:
        grads[wname] += dw
    return loss, dh


def _backward_blocks(step: _Step, grads: dict, lowest: int, embedding_trains: bool) -> None:
    """The blocks' backward, top first, on step.dh, which each block's gradient replaces.
    step.dh is its only holder, so a block's incoming gradient is freed as soon as the
    next is made (a caller's own name for the loss's gradient would keep one (B, T, C)
    array alive, undeclared, under every block below the top)."""
    model, opts = step.model, step.opts
    for i in reversed(range(lowest, model.cfg.num_hidden_layers)):
        if opts.policy == "layer":
            step.saveds[i] = step.block_store(i)
            recompute_block(model, i, step.store.take(i), step.rope, step.saveds[i], opts)
            step.store.release(i)
        need_dx = i > lowest or embedding_trains
        step.dh = block_backward(model, i, step.dh, step.rope, step.saveds.pop(i), grads,
                                 opts, need_dx)


def forward_backward(model: Model, tokens: np.ndarray, targets: np.ndarray,
                     grads: dict, opts: StepOptions = StepOptions(),
                     ledger: Ledger | None = None, dropout_key: tuple = (0, 0)) -> float:
    """Mean next-token loss; gradients of every trainable tensor are ADDED into `grads`.
    tokens, targets (B, T) int; targets aligned with positions (see next_token_targets).
    dropout_key: (seed, step) of the training step, from which LoRA's dropout masks are
    drawn. The first step asks malloc to keep freed memory (memory.keep_freed_memory):
    each step's activations then reuse the last step's pages instead of faulting in new ones."""
    cfg, p = model.cfg, model.params
    tokens = check_inputs(cfg, tokens, targets)
    keep_freed_memory()
    if opts.mlp_rows and getattr(model.adapter, "dropout", 0):
        raise ValueError("--mlp-rows needs LoRA dropout 0: a dropout mask is drawn for a whole "
                         "input, not for a block of its rows")
    B, T = tokens.shape
    step = _Step(model, opts, ledger if ledger is not None else Ledger(), dropout_key, B, T)
    step.outer = Saved(step.ledger, -1, step_saved(model, B, T, opts), dropout_key=dropout_key)
    step.rope = Rope(*rope_tables(T, cfg.head_dim, cfg.rope_theta, model.dtype))
    step.outer.keep("rope", "cos", step.rope.cos)
    step.outer.keep("rope", "sin", step.rope.sin)
    lowest = lowest_trainable_layer(model)
    if opts.policy == "layer":
        step.store = open_store(opts.checkpoints, step.ledger, (B, T, cfg.hidden_size),
                                model.dtype, opts.scratch_dir, step.outer)
    try:
        # each pass's input is only its callee's (a name here would keep it alive, undeclared)
        h = _forward_blocks(step, embedding_forward(tokens, p["model.embed_tokens.weight"],
                                                    model.dtype), lowest)       # (B, T, C)
        loss, step.dh = _loss_forward_backward(step, h, np.asarray(targets), grads)
        del h
        embedding_trains = "model.embed_tokens.weight" in model.trainable
        _backward_blocks(step, grads, lowest, embedding_trains)
        if embedding_trains:
            embedding_backward(step.dh, tokens, grads["model.embed_tokens.weight"])
        step.dh = None
    finally:
        if step.store is not None:
            step.store.close()                   # the disk store's file goes, whatever happened
    step.outer.release("rope")
    return loss


# ------------------------------------------------------------------------ inference

def forward_hidden(model: Model, tokens: np.ndarray, opts: StepOptions = StepOptions(),
                   training: bool = False, dropout_key: tuple = (0, 0), cache=None):
    """Final normed hidden states (B, T, C), nothing kept for backward. training=True
    computes exactly what a training step's forward does (LoRA dropout on), for checks.
    With a KV cache (minilars.generate), tokens sit at positions cache.length ... and
    attend to every earlier position; the cache grows by T."""
    cfg, p = model.cfg, model.params
    start = 0 if cache is None else cache.length
    tokens = check_inputs(cfg, tokens, start=start)
    T = tokens.shape[1]
    rope = Rope(*rope_tables(T, cfg.head_dim, cfg.rope_theta, model.dtype, start=start))
    nothing = Saved.nothing(training, dropout_key)
    h = embedding_forward(tokens, p["model.embed_tokens.weight"], model.dtype)
    for i in range(cfg.num_hidden_layers):
        h = block_forward(model, i, h, rope, nothing, opts, cache)
    if cache is not None:
        cache.length = start + T
    return rmsnorm_forward(h, p["model.norm.weight"], cfg.rms_norm_eps)[0]


def forward_logits(model: Model, tokens: np.ndarray, opts: StepOptions = StepOptions(),
                   training: bool = False, dropout_key: tuple = (0, 0)):
    """Logits (B, T, V). Materialises all of them: for tests and short prompts."""
    xf = forward_hidden(model, tokens, opts, training, dropout_key)
    return linear_forward(xf, model.params[lm_head_name(model.cfg)])


def forward_loss(model: Model, tokens: np.ndarray, targets: np.ndarray,
                 opts: StepOptions = StepOptions(), training: bool = False,
                 dropout_key: tuple = (0, 0)) -> tuple[float, int]:
    """(mean loss, number of scored tokens) without any backward state (evaluation)."""
    xf = forward_hidden(model, tokens, opts, training, dropout_key)
    C = model.cfg.hidden_size
    flat = np.asarray(targets).reshape(-1)
    loss, _ = cross_entropy_chunked(xf.reshape(-1, C), model.params[lm_head_name(model.cfg)],
                                    flat, need_dx=False, chunk=opts.ce_chunk,
                                    matmul_xwT=_matmul_xwT, matmul_dyW=_matmul_dyW)
    return loss, int((flat != IGNORE).sum())
