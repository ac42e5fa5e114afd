"""The whole model's forward in plain NumPy, as DESIGN.md writes it: the specification.

One function, picoGPT-style: no saved tensors, no tiles, no chunks, no adapters, kv heads
simply repeated. Everything else in minilars (the hand-written backward, the recompute
policies, the tiled attention, the chunked loss, the KV cache, the C kernels) is tested
against these lines. Shapes: B batch, T positions, C hidden, nh query heads, nkv key/value
heads, hd head width, F MLP width, V vocabulary.
"""
from __future__ import annotations

import numpy as np


def reference_logits(cfg, params: dict, tokens: np.ndarray) -> np.ndarray:
    """Logits (B, T, V) of a Llama-family model (cfg: a ModelConfig) for tokens (B, T)."""
    p = params
    nh, nkv, hd, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
    B, T = tokens.shape

    def rmsnorm(x, w):                                           # (..., C)
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w

    def linear(x, name):                                         # (..., in) -> (..., out)
        y = x @ p[name + ".weight"].T
        return y + p[name + ".bias"] if name + ".bias" in p else y

    inv_freq = cfg.rope_theta ** (-np.arange(0, hd, 2) / hd)      # (hd/2,)
    angle = np.arange(T)[:, None] * inv_freq[None, :]             # (T, hd/2)
    cos = np.cos(np.concatenate([angle, angle], axis=-1))         # (T, hd)
    sin = np.sin(np.concatenate([angle, angle], axis=-1))         # (T, hd)

    def rope(x):                                                 # (B, n, T, hd), pairs (i, i + hd/2)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + np.concatenate([-x2, x1], axis=-1) * sin

    def heads(x, n):                                             # (B, T, n*hd) -> (B, n, T, hd)
        return x.reshape(B, T, n, hd).transpose(0, 2, 1, 3)

    causal = np.triu(np.full((T, T), -np.inf), k=1)               # (T, T), -inf above the diagonal
    h = p["model.embed_tokens.weight"][tokens]                   # (B, T, C)
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        a = rmsnorm(h, p[pre + "input_layernorm.weight"])         # (B, T, C)
        q = rope(heads(linear(a, pre + "self_attn.q_proj"), nh))  # (B, nh, T, hd)
        k = rope(heads(linear(a, pre + "self_attn.k_proj"), nkv)) # (B, nkv, T, hd)
        v = heads(linear(a, pre + "self_attn.v_proj"), nkv)       # (B, nkv, T, hd)
        k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)  # (B, nh, T, hd)
        S = q @ k.swapaxes(-1, -2) / np.sqrt(hd) + causal         # (B, nh, T, T)
        P = np.exp(S - S.max(axis=-1, keepdims=True))
        P /= P.sum(axis=-1, keepdims=True)                        # softmax over keys
        o = (P @ v).transpose(0, 2, 1, 3).reshape(B, T, nh * hd)  # (B, T, nh*hd)
        h = h + linear(o, pre + "self_attn.o_proj")               # (B, T, C)
        m = rmsnorm(h, p[pre + "post_attention_layernorm.weight"])
        g, u = linear(m, pre + "mlp.gate_proj"), linear(m, pre + "mlp.up_proj")   # (B, T, F)
        h = h + linear(g / (1 + np.exp(-g)) * u, pre + "mlp.down_proj")          # silu(g) * u
    head = p["model.embed_tokens.weight"] if cfg.tie_word_embeddings else p["lm_head.weight"]
    return rmsnorm(h, p["model.norm.weight"]) @ head.T            # (B, T, V)
