"""Text generation with a KV cache: greedy, temperature and top-p sampling, stop at EOS.

The prompt goes through the model once (prefill); every later step feeds one token and
reuses the keys and values of all earlier positions from the cache:
    k[layer], v[layer]   (B, nkv, max_len, hd)
so a step costs O(current length) instead of re-running the whole sequence. The blocks
are the training blocks (model.block_forward): the cache only changes where attention
gets its keys and values.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minilars.model import Model, check_inputs, forward_hidden
from minilars.ops.attention import attention_decode
from minilars.ops.linear import linear_forward
from minilars.params import lm_head_name


@dataclass
class KVCache:
    k: list        # per layer (B, nkv, max_len, hd)
    v: list
    length: int = 0

    @classmethod
    def empty(cls, model: Model, batch: int, max_len: int) -> "KVCache":
        cfg = model.cfg
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        L = cfg.num_hidden_layers
        return cls([np.zeros(shape, model.dtype) for _ in range(L)],
                   [np.zeros(shape, model.dtype) for _ in range(L)])

    def attend(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Write k, v (B, nkv, t, hd) of positions length .. length+t-1 into the cache and
        attend q (B, nh, t, hd) to every position so far: out (B, t, nh, hd). The caller
        (forward_hidden) advances `length` once every layer has written."""
        start, t = self.length, q.shape[2]
        if start + t > self.k[layer].shape[2]:
            raise ValueError(f"the KV cache holds {self.k[layer].shape[2]} positions; "
                             f"{start + t} were asked for")
        self.k[layer][:, :, start:start + t] = k
        self.v[layer][:, :, start:start + t] = v
        return attention_decode(q, self.k[layer][:, :, :start + t],
                                self.v[layer][:, :, :start + t], start)


def repeat_cache(cache: KVCache, n: int, extra: int) -> KVCache:
    """A batch-1 cache copied n times, with room for `extra` more positions."""
    L = cache.length
    grow = lambda a: np.repeat(np.pad(a[:, :, :L], ((0, 0), (0, 0), (0, extra), (0, 0))), n, axis=0)
    return KVCache([grow(k) for k in cache.k], [grow(v) for v in cache.v], L)


def forward_cached(model: Model, tokens: np.ndarray, cache: KVCache,
                   return_hidden: bool = False) -> np.ndarray:
    """tokens (B, t) at positions cache.length ... -> logits of the last position (B, V),
    or with return_hidden the final normed hidden states of every position (B, t, C)."""
    hidden = forward_hidden(model, tokens, cache=cache)                 # (B, t, C)
    if return_hidden:
        return hidden
    return linear_forward(np.ascontiguousarray(hidden[:, -1]), model.params[lm_head_name(model.cfg)])


def sample_next(logits: np.ndarray, temperature: float, top_p: float,
                rng: np.random.Generator) -> int:
    """Greedy when temperature == 0; else sample from the smallest set of tokens whose
    probability adds up to top_p."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    cumulative = np.cumsum(probs[order])
    keep = order[: int(np.searchsorted(cumulative, top_p) + 1)]
    kept = probs[keep] / probs[keep].sum()
    return int(rng.choice(keep, p=kept))


def generate(model: Model, prompt_ids: list[int], max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             eos_ids: tuple = ()):
    """Yields new token ids one at a time (stops at an id in eos_ids or the length limit)."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    total = len(prompt_ids) + max_new_tokens
    limit = model.cfg.max_position_embeddings
    if len(prompt_ids) > limit:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model allows {limit}")
    total = min(total, limit)
    check_inputs(model.cfg, np.array([prompt_ids]))
    rng = np.random.default_rng(seed)
    cache = KVCache.empty(model, 1, total)
    logits = forward_cached(model, np.array([prompt_ids]), cache)[0]
    for _ in range(total - len(prompt_ids)):
        token = sample_next(logits, temperature, top_p, rng)
        yield token
        if token in eos_ids or cache.length >= total:
            return
        logits = forward_cached(model, np.array([[token]]), cache)[0]
