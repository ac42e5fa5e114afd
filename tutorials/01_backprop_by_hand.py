"""Tutorial 1: backprop by hand, one op at a time.

Run: `python tutorials/01_backprop_by_hand.py`

The whole model fits in fifty lines of NumPy: `minilars/reference.py`, the specification
everything else is tested against. Training needs more than a forward, though. Every op
in minilars is a pair: a forward that computes its output and keeps what the backward
will need, and a backward that turns the gradient of the output into gradients of the
inputs. There is no autograd: you can read every line. This tutorial starts from the
reference, then derives the backward of RMSNorm, checks it against finite differences,
and checks the whole model's gradient the same way.
"""
import inspect

import numpy as np

from minilars.config import named_config
from minilars.model import (Model, forward_backward, forward_logits, forward_loss,
                            next_token_targets, zero_grads)
from minilars.ops.rmsnorm import rmsnorm_backward, rmsnorm_forward
from minilars.reference import reference_logits

rng = np.random.default_rng(0)

# %% 0. The model, whole -------------------------------------------------------------------
# A Llama block: rmsnorm, q/k/v projections, rotary embeddings, causal attention with
# grouped kv heads, a residual; rmsnorm, a SwiGLU MLP, a residual. Read it once:
print(inspect.getsource(reference_logits))
# The training model (minilars.model) computes the same logits with tiled attention, a
# chunked loss and everything it keeps for the backward declared; on a tiny random model:
cfg = named_config("tiny")
model = Model.random(cfg, seed=0, dtype=np.float64)
tokens = rng.integers(0, cfg.vocab_size, size=(1, 12))
diff = np.abs(forward_logits(model, tokens) - reference_logits(cfg, model.params, tokens)).max()
print(f"max |training model - reference| < 1e-12: {diff < 1e-12}")  # roundoff only
assert diff < 1e-12

# %% 1. The forward, and what it keeps -----------------------------------------------------
# y = x * rstd * w with rstd = 1/sqrt(mean(x^2) + eps). The forward returns rstd too:
# one number per row, which the backward would otherwise have to recompute.
x = rng.standard_normal((3, 8))          # 3 rows (tokens) of 8 features, float64
w = rng.standard_normal(8)
y, rstd = rmsnorm_forward(x, w, eps=1e-5)
print("rmsnorm output", y.shape, "kept for backward: x", x.shape, "and rstd", rstd.shape)

# %% 2. The backward ------------------------------------------------------------------------
# Take a scalar loss L = sum(y * R) for a random R, so dL/dy = R. With xhat = x * rstd and
# g = dy * w, calculus gives dx = rstd * (g - xhat * mean(g * xhat)) and dw = sum(dy * xhat).
R = rng.standard_normal(y.shape)
dx, dw = rmsnorm_backward(R, x, rstd, w)

# %% 3. Check it: central finite differences ------------------------------------------------
# Nudge each input by +-h and watch the loss move. In float64 with h = 1e-6 the two
# estimates agree to about 1e-9: the check every op in tests/ops runs on random shapes.
def loss_of(x_, w_):
    return float(np.sum(rmsnorm_forward(x_, w_, 1e-5)[0] * R))

h = 1e-6
fd = np.zeros_like(x)
for idx in np.ndindex(x.shape):
    xp, xm = x.copy(), x.copy()
    xp[idx] += h
    xm[idx] -= h
    fd[idx] = (loss_of(xp, w) - loss_of(xm, w)) / (2 * h)
err = np.abs(fd - dx).max() / np.abs(fd).max()
print(f"rmsnorm dx vs finite differences: relative error {err:.1e}")
assert err < 1e-6

# %% 4. The whole model ---------------------------------------------------------------------
# The same check on a whole (tiny) Llama: embedding, 2 blocks of attention + MLP, the loss.
cfg = named_config("tiny")
model = Model.random(cfg, seed=0, dtype=np.float64).train_all()
tokens = rng.integers(0, cfg.vocab_size, size=(1, 12))
targets = next_token_targets(tokens)
grads = zero_grads(model)
loss = forward_backward(model, tokens, targets, grads)
print(f"tiny model loss {loss:.4f} (log V = {np.log(cfg.vocab_size):.4f} for a random model)")

name = "model.layers.0.self_attn.q_proj.weight"
W = model.params[name]
worst = 0.0
for idx in [(0, 0), (5, 7), (31, 63)]:
    old = W[idx]
    W[idx] = old + h
    lp = forward_loss(model, tokens, targets)[0]
    W[idx] = old - h
    lm = forward_loss(model, tokens, targets)[0]
    W[idx] = old
    fd = (lp - lm) / (2 * h)
    # measured against the tensor's gradient scale: a tiny entry's finite difference is noisy
    worst = max(worst, abs(fd - grads[name][idx]) / np.abs(grads[name]).max())
    print(f"  d loss / d {name}{list(idx)}: backward {grads[name][idx]: .3e}, finite diff {fd: .3e}")
assert worst < 1e-6
print("the hand-written backward agrees with finite differences")
