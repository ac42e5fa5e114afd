"""The Llama-family model: whole-model forward and backward, written out by hand.

    h = E[tokens]                                             (B, T, C)
    for each layer i:                                         block_forward / block_backward
        a = rmsnorm(h, w_in);  q, k, v = a Wq^T, a Wk^T, a Wv^T (+ biases for Qwen2)
        q, k = rope(q), rope(k);  o = causal GQA attention(q, k, v)
        h = h + o Wo^T
        m = rmsnorm(h, w_post);  h = h + (silu(m Wg^T) * (m Wu^T)) Wd^T
    loss = cross-entropy(rmsnorm(h, w_final) E^T, targets)    chunked, backward fused

Every tensor a forward keeps for its backward goes through `Saved.keep(op, name, x)`,
which mirrors it in the memory ledger under (layer, op, name); the backward releases each
op's tensors as soon as it has consumed them.

Recompute policies:
  none   every block keeps what its backward needs.
  layer  a block keeps only its input (the "checkpoint"); its backward first re-runs the
         block's forward, keeping, then runs the backward. Saved memory becomes
         n_layers x (B, T, C) plus one block's working set, for one extra forward.

Layers below the lowest one that holds a trainable tensor run forward only: nothing is
saved for them and the backward stops above them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from minilars.config import ModelConfig
from minilars.memory import Ledger
from minilars.ops.attention import (DEFAULT_TILE, attention_plain_backward,
                                    attention_plain_forward, attention_tiled_backward,
                                    attention_tiled_forward)
from minilars.ops.embedding import check_tokens, embedding_backward, embedding_forward
from minilars.ops.linear import _matmul_dyW, _matmul_xwT, linear_backward, linear_forward
from minilars.ops.loss import (DEFAULT_CHUNK, IGNORE, count_targets, cross_entropy_chunked,
                               cross_entropy_plain)
from minilars.ops.mlp import swiglu_backward, swiglu_forward
from minilars.ops.rmsnorm import rmsnorm_backward, rmsnorm_forward
from minilars.ops.rope import rope_backward, rope_forward, rope_tables
from minilars.params import init_params, linear_param_name, lm_head_name

POLICIES = ("none", "layer")
ATTENTION_FORMS = ("plain", "tiled")
LOSS_FORMS = ("plain", "chunked")


@dataclass
class Model:
    """Config + HF-named parameters + which of them train + adapters on linears.

    trainable: names (in `params`) that get gradients. Full fine-tuning: all of them.
    adapters:  module name (e.g. "model.layers.0.self_attn.q_proj") -> adapter state; the
               adapter's own tensors live in `params` under PEFT-style names and are
               listed in `trainable`.
    dtype:     compute dtype (float32, or float64 for gradient checks). Frozen matrices
               may be stored in float16; activations are always in `dtype`.
    """
    cfg: ModelConfig
    params: dict
    trainable: set = field(default_factory=set)
    adapters: dict = field(default_factory=dict)
    dtype: type = np.float32

    @classmethod
    def random(cls, cfg: ModelConfig, seed: int = 0, dtype=np.float32) -> "Model":
        return cls(cfg, init_params(cfg, seed, dtype), dtype=dtype)

    def train_all(self) -> "Model":
        """Full fine-tuning: every base parameter trains."""
        self.trainable = set(self.params)
        return self

    def base_param_count(self) -> int:
        return sum(v.size for k, v in self.params.items() if not _is_adapter_param(k))


def _is_adapter_param(name: str) -> bool:
    return any(tag in name for tag in (".lora_", ".ia3_", ".lars_"))


@dataclass(frozen=True)
class StepOptions:
    policy: str = "none"          # recompute policy: none | layer
    attention: str = "tiled"      # plain | tiled
    loss: str = "chunked"         # plain | chunked
    tile: int = DEFAULT_TILE      # attention tile (queries and keys)
    ce_chunk: int = DEFAULT_CHUNK # rows of logits alive at once in the loss

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown recompute policy {self.policy!r}; expected one of {POLICIES}")
        if self.attention not in ATTENTION_FORMS:
            raise ValueError(f"unknown attention form {self.attention!r}; expected one of {ATTENTION_FORMS}")
        if self.loss not in LOSS_FORMS:
            raise ValueError(f"unknown loss form {self.loss!r}; expected one of {LOSS_FORMS}")
        if self.tile < 1 or self.ce_chunk < 1:
            raise ValueError("tile and ce_chunk must be positive")


@dataclass
class Saved:
    """What one layer keeps for its backward, by (op, name), mirrored in the ledger.
    With enabled=False (forward-only, or a checkpointed block) nothing is kept; training
    says whether this forward is part of a training step (LoRA dropout applies) or not."""
    ledger: Ledger
    layer: int
    enabled: bool = True
    training: bool = True         # False in evaluation and generation: no dropout
    tensors: dict = field(default_factory=dict)

    def keep(self, op: str, name: str, array: np.ndarray) -> np.ndarray:
        if self.enabled:
            self.tensors[(op, name)] = array
            self.ledger.keep(self.layer, op, name, array)
        return array

    def get(self, op: str, name: str) -> np.ndarray | None:
        return self.tensors.get((op, name))

    def release(self, op: str) -> None:
        for key in [k for k in self.tensors if k[0] == op]:
            del self.tensors[key]
        self.ledger.release_op(self.layer, op)


@dataclass
class Rope:
    cos: np.ndarray   # (T, hd)
    sin: np.ndarray   # (T, hd)


# ------------------------------------------------------------------------ input checks

def check_inputs(cfg: ModelConfig, tokens: np.ndarray, targets: np.ndarray | None = None):
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be a (batch, seq) array, got shape {tokens.shape}")
    B, T = tokens.shape
    if T == 0 or B == 0:
        raise ValueError(f"tokens must not be empty, got shape {tokens.shape}")
    if T > cfg.max_position_embeddings:
        raise ValueError(f"sequence length {T} exceeds the model's max_position_embeddings "
                         f"({cfg.max_position_embeddings})")
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


# ------------------------------------------------------------------------ linears + adapters

def _module_name(layer: int, linear: str) -> str:
    return linear_param_name(layer, linear)[: -len(".weight")]


def project(model: Model, layer: int, linear: str, x: np.ndarray, saved: Saved) -> np.ndarray:
    """One of the block's linears, with its adapter if it has one. x (B, T, in) -> (B, T, out)."""
    module = _module_name(layer, linear)
    W = model.params[module + ".weight"]
    b = model.params.get(module + ".bias")
    adapter = model.adapters.get(module)
    if adapter is not None:
        from minilars.adapters import adapter_forward
        return adapter_forward(adapter, model, module, x, W, b, saved, linear)
    if module + ".weight" in model.trainable:
        saved.keep(linear, "x", x)          # only a trainable W needs its input kept
    return linear_forward(x, W, b)


def project_backward(model: Model, layer: int, linear: str, dy: np.ndarray, saved: Saved,
                     grads: dict, need_dx: bool = True) -> np.ndarray | None:
    module = _module_name(layer, linear)
    W = model.params[module + ".weight"]
    adapter = model.adapters.get(module)
    if adapter is not None:
        from minilars.adapters import adapter_backward
        dx = adapter_backward(adapter, model, module, dy, W, saved, linear, grads, need_dx)
    else:
        wname, bname = module + ".weight", module + ".bias"
        dx, dW, db = linear_backward(dy, saved.get(linear, "x"), W, need_dx=need_dx,
                                     need_dW=wname in model.trainable,
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


def block_forward(model: Model, i: int, h: np.ndarray, rope: Rope, saved: Saved,
                  opts: StepOptions) -> np.ndarray:
    """h (B, T, C) -> h (B, T, C). Keeps into `saved` what block_backward will need."""
    cfg, p = model.cfg, model.params
    pre = f"model.layers.{i}."
    B, T, C = h.shape
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads

    # attention half
    a, rstd = rmsnorm_forward(h, p[pre + "input_layernorm.weight"], cfg.rms_norm_eps)
    saved.keep("attn_norm", "x", h)
    saved.keep("attn_norm", "rstd", rstd)
    q = project(model, i, "q_proj", a, saved)                           # (B, T, nh*hd)
    k = project(model, i, "k_proj", a, saved)                           # (B, T, nkv*hd)
    v = project(model, i, "v_proj", a, saved)                           # (B, T, nkv*hd)
    del a
    q = rope_forward(_heads(q, nh), rope.cos, rope.sin)                 # (B, nh, T, hd)
    k = rope_forward(_heads(k, nkv), rope.cos, rope.sin)                # (B, nkv, T, hd)
    v = np.ascontiguousarray(_heads(v, nkv))                            # (B, nkv, T, hd)
    saved.keep("attention", "q", q)
    saved.keep("attention", "k", k)
    saved.keep("attention", "v", v)
    if opts.attention == "plain":
        out, P = attention_plain_forward(q, k, v)                       # out (B, T, nh, hd)
        saved.keep("attention", "P", P)                                 # (B, nh, T, T)
    else:
        out, lse = attention_tiled_forward(q, k, v, opts.tile)
        saved.keep("attention", "out", out)
        saved.keep("attention", "lse", lse)                             # (B, nh, T)
    del q, k, v
    h = h + project(model, i, "o_proj", out.reshape(B, T, nh * cfg.head_dim), saved)
    del out

    # MLP half
    m, rstd = rmsnorm_forward(h, p[pre + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
    saved.keep("mlp_norm", "x", h)
    saved.keep("mlp_norm", "rstd", rstd)
    g = project(model, i, "gate_proj", m, saved)                        # (B, T, F)
    u = project(model, i, "up_proj", m, saved)                          # (B, T, F)
    del m
    saved.keep("swiglu", "g", g)
    saved.keep("swiglu", "u", u)
    act = swiglu_forward(g, u)                                          # (B, T, F)
    del g, u
    return h + project(model, i, "down_proj", act, saved)


def block_backward(model: Model, i: int, dh_out: np.ndarray, rope: Rope, saved: Saved,
                   grads: dict, opts: StepOptions, need_dx: bool = True):
    """dh_out (B, T, C) -> dh_in (B, T, C) (None if not needed); releases what it consumes."""
    cfg, p, trainable = model.cfg, model.params, model.trainable
    pre = f"model.layers.{i}."
    nh = cfg.num_attention_heads

    # MLP half: h_out = h_mid + down(swiglu(gate(m), up(m))),  m = rmsnorm(h_mid)
    dact = project_backward(model, i, "down_proj", dh_out, saved, grads)
    dg, du = swiglu_backward(dact, saved.get("swiglu", "g"), saved.get("swiglu", "u"))
    saved.release("swiglu")
    del dact
    dm = project_backward(model, i, "gate_proj", dg, saved, grads)
    del dg
    dm += project_backward(model, i, "up_proj", du, saved, grads)
    del du
    wname = pre + "post_attention_layernorm.weight"
    dx, dw = rmsnorm_backward(dm, saved.get("mlp_norm", "x"), saved.get("mlp_norm", "rstd"),
                              p[wname], need_dw=wname in trainable)
    saved.release("mlp_norm")
    if dw is not None:
        grads[wname] += dw
    dh_mid = dh_out + dx
    del dm, dx

    # attention half: h_mid = h_in + o_proj(attn(rope(q(a)), rope(k(a)), v(a))),  a = rmsnorm(h_in)
    B, T, C = dh_mid.shape
    dout = project_backward(model, i, "o_proj", dh_mid, saved, grads)
    dout = dout.reshape(B, T, nh, cfg.head_dim)
    q, k, v = (saved.get("attention", n) for n in "qkv")
    if opts.attention == "plain":
        dq, dk, dv = attention_plain_backward(dout, q, k, v, saved.get("attention", "P"))
    else:
        dq, dk, dv = attention_tiled_backward(dout, q, k, v, saved.get("attention", "out"),
                                              saved.get("attention", "lse"), opts.tile)
    saved.release("attention")
    del dout, q, k, v
    dq = _merge_heads(rope_backward(dq, rope.cos, rope.sin))            # (B, T, nh*hd)
    dk = _merge_heads(rope_backward(dk, rope.cos, rope.sin))            # (B, T, nkv*hd)
    dv = _merge_heads(dv)
    wname = pre + "input_layernorm.weight"
    need_da = need_dx or wname in trainable      # the input norm's weight gradient needs da
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
                                  p[wname], need_dx=need_dx, need_dw=wname in trainable)
    saved.release("attn_norm")
    if dw is not None:
        grads[wname] += dw
    return dh_mid + dx if need_dx else None


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


def forward_backward(model: Model, tokens: np.ndarray, targets: np.ndarray,
                     grads: dict, opts: StepOptions = StepOptions(),
                     ledger: Ledger | None = None) -> float:
    """Mean next-token loss; gradients of every trainable tensor are ADDED into `grads`.
    tokens, targets (B, T) int; targets aligned with positions (see next_token_targets)."""
    cfg, p = model.cfg, model.params
    tokens = check_inputs(cfg, tokens, targets)
    targets = np.asarray(targets)
    ledger = ledger if ledger is not None else Ledger()
    B, T = tokens.shape
    C, L = cfg.hidden_size, cfg.num_hidden_layers
    lowest = lowest_trainable_layer(model)

    rope = Rope(*rope_tables(T, cfg.head_dim, cfg.rope_theta, model.dtype))
    ledger.keep(-1, "rope", "cos", rope.cos)
    ledger.keep(-1, "rope", "sin", rope.sin)

    # ---- forward
    h = embedding_forward(tokens, p["model.embed_tokens.weight"], model.dtype)   # (B, T, C)
    saveds: dict[int, Saved] = {}
    checkpoints: dict[int, np.ndarray] = {}
    for i in range(L):
        if i >= lowest and opts.policy == "none":
            saveds[i] = Saved(ledger, i)
            h = block_forward(model, i, h, rope, saveds[i], opts)
        else:
            if i >= lowest:                      # policy "layer": keep only the block input
                checkpoints[i] = ledger.keep(i, "checkpoint", "block_input", h)
            h = block_forward(model, i, h, rope, Saved(ledger, i, enabled=False), opts)

    final = Saved(ledger, -1)
    xf, rstd = rmsnorm_forward(h, p["model.norm.weight"], cfg.rms_norm_eps)
    final.keep("final_norm", "x", h)
    final.keep("final_norm", "rstd", rstd)
    del h
    head = lm_head_name(cfg)
    W_head = p[head]
    flat_targets = targets.reshape(-1)
    if opts.loss == "plain":
        loss, dxf, dW_head = cross_entropy_plain(xf.reshape(-1, C), W_head, flat_targets,
                                                 need_dW=head in model.trainable)
        if dW_head is not None:
            grads[head] += dW_head
        del dW_head
    else:
        loss, dxf = cross_entropy_chunked(
            xf.reshape(-1, C), W_head, flat_targets, need_dx=True,
            dW=grads[head] if head in model.trainable else None, chunk=opts.ce_chunk,
            matmul_xwT=_matmul_xwT, matmul_dyW=_matmul_dyW)
    del xf
    if not np.isfinite(loss):
        ledger.release_category("activations")      # nothing of this step stays registered
        raise FloatingPointError(f"loss is {loss}: the forward pass produced NaN or Inf")
    final.keep("loss", "dx", dxf)    # the loss gradient waits here for the backward

    # ---- backward
    wname = "model.norm.weight"
    dh, dw = rmsnorm_backward(dxf.reshape(B, T, C), final.get("final_norm", "x"),
                              final.get("final_norm", "rstd"), p[wname],
                              need_dw=wname in model.trainable)
    final.release("final_norm")
    final.release("loss")
    del dxf
    if dw is not None:
        grads[wname] += dw
    embedding_trains = "model.embed_tokens.weight" in model.trainable
    for i in reversed(range(lowest, L)):
        if opts.policy == "layer":
            saveds[i] = Saved(ledger, i)
            block_forward(model, i, checkpoints.pop(i), rope, saveds[i], opts)  # recompute
            ledger.release(i, "checkpoint", "block_input")
        need_dx = i > lowest or embedding_trains
        dh = block_backward(model, i, dh, rope, saveds.pop(i), grads, opts, need_dx)
    if embedding_trains:
        embedding_backward(dh, tokens, grads["model.embed_tokens.weight"])
    del dh
    ledger.release_op(-1, "rope")
    return loss


# ------------------------------------------------------------------------ inference

def forward_hidden(model: Model, tokens: np.ndarray, opts: StepOptions = StepOptions(),
                   training: bool = False):
    """Final normed hidden states (B, T, C), nothing kept for backward. training=True
    computes exactly what a training step's forward does (LoRA dropout on), for checks."""
    cfg, p = model.cfg, model.params
    tokens = check_inputs(cfg, tokens)
    ledger = Ledger()
    T = tokens.shape[1]
    rope = Rope(*rope_tables(T, cfg.head_dim, cfg.rope_theta, model.dtype))
    h = embedding_forward(tokens, p["model.embed_tokens.weight"], model.dtype)
    for i in range(cfg.num_hidden_layers):
        h = block_forward(model, i, h, rope, Saved(ledger, i, enabled=False, training=training), opts)
    return rmsnorm_forward(h, p["model.norm.weight"], cfg.rms_norm_eps)[0]


def forward_logits(model: Model, tokens: np.ndarray, opts: StepOptions = StepOptions(),
                   training: bool = False):
    """Logits (B, T, V). Materialises all of them: for tests and short prompts."""
    xf = forward_hidden(model, tokens, opts, training)
    return linear_forward(xf, model.params[lm_head_name(model.cfg)])


def forward_loss(model: Model, tokens: np.ndarray, targets: np.ndarray,
                 opts: StepOptions = StepOptions(), training: bool = False) -> tuple[float, int]:
    """(mean loss, number of scored tokens) without any backward state (evaluation)."""
    xf = forward_hidden(model, tokens, opts, training)
    C = model.cfg.hidden_size
    flat = np.asarray(targets).reshape(-1)
    loss, _ = cross_entropy_chunked(xf.reshape(-1, C), model.params[lm_head_name(model.cfg)],
                                    flat, need_dx=False, chunk=opts.ce_chunk,
                                    matmul_xwT=_matmul_xwT, matmul_dyW=_matmul_dyW)
    return loss, int((flat != IGNORE).sum())
