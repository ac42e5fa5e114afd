"""The whole model, in float64 on the tiny configs (Llama with tied embeddings, and Qwen2
with q/k/v biases and an untied lm_head):

- the forward against minilars.reference (DESIGN.md's formulas in plain NumPy), and
  generation's cached forward (the same blocks with a KV cache) against it too;
- what every block keeps is exactly what block_saved declares, byte for byte;
- every parameter's gradient vs central finite differences of `forward_loss`, on a few
  entries per tensor (the largest-gradient entry and random ones), for each policy;
- identical gradients whatever the recompute policy, attention form and loss form;
- partial training (only upper layers train) gives the same gradients for what trains;
- 50 AdamW steps overfit one batch (float32);
- bad input raises errors that name the problem.
"""
import numpy as np
import pytest

from minilars.adapters import LARS, adapter_for, attach
from minilars.config import named_config
from minilars.frozen import Packed, to_float
from minilars.memory import Ledger, owning_buffer
from minilars.checkpoints import checkpoint_keep
from minilars.model import (IGNORE, Model, StepOptions, block_saved, forward_backward,
                            forward_logits, forward_loss, mlp_rows_saved, next_token_targets,
                            step_saved, zero_grads)
from minilars.optim import AdamW, clip_grad_norm
from minilars.params import param_shapes
from minilars.reference import reference_logits
from minilars.saved import declared_bytes
from tests.gradcheck import numeric_grad, rel_err

CONFIGS = ("tiny", "tiny-qwen2")


def _batch(cfg, B=2, T=7, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, size=(B, T))
    targets = next_token_targets(tokens)
    targets[0, 2] = IGNORE                  # an ignored row inside the sequence
    return tokens, targets


def _grads(model, tokens, targets, opts):
    grads = zero_grads(model)
    loss = forward_backward(model, tokens, targets, grads, opts)
    return loss, grads


# ------------------------------------------------------------------ forward vs the reference

@pytest.mark.parametrize("name", CONFIGS)
def test_forward_matches_the_reference(name):
    """minilars.reference is the specification: every forward form agrees with it."""
    cfg = named_config(name)
    model = Model.random(cfg, 1, np.float64)
    tokens, targets = _batch(cfg, B=2, T=9)
    ref = reference_logits(cfg, model.params, tokens)
    for opts in (StepOptions(attention="plain"), StepOptions(attention="tiled", tile=4)):
        assert rel_err(forward_logits(model, tokens, opts), ref) < 1e-12
    # the loss the training step reports is the mean over kept rows of -log softmax
    logp = ref - ref.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    kept = targets != IGNORE
    expected = -logp[kept, targets[kept]].mean()
    loss, n = forward_loss(model, tokens, targets)
    assert n == int(kept.sum())
    assert abs(loss - expected) < 1e-12
    assert abs(forward_backward(model.train_all(), tokens, targets, zero_grads(model),
                                StepOptions(tile=3, ce_chunk=4)) - expected) < 1e-12


def test_qwen2_params_have_biases_and_lm_head():
    shapes = param_shapes(named_config("tiny-qwen2"))
    assert "lm_head.weight" in shapes and "model.layers.1.self_attn.v_proj.bias" in shapes
    assert "model.layers.0.self_attn.o_proj.bias" not in shapes
    assert "lm_head.weight" not in param_shapes(named_config("tiny"))


# ------------------------------------------------------------------ gradients vs finite differences

@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("opts", [StepOptions(policy="none", attention="tiled", loss="chunked", tile=3, ce_chunk=5),
                                  StepOptions(policy="layer", attention="plain", loss="plain")],
                         ids=["none-tiled-chunked", "layer-plain-plain"])
def test_every_parameter_gradient_matches_finite_differences(name, opts):
    cfg = named_config(name)
    model = Model.random(cfg, 0, np.float64).train_all()
    tokens, targets = _batch(cfg)
    _, grads = _grads(model, tokens, targets, opts)
    assert set(grads) == set(param_shapes(cfg)), "every parameter gets a gradient"
    rng = np.random.default_rng(1)
    f = lambda: forward_loss(model, tokens, targets)[0]
    for pname, g in grads.items():
        assert np.all(np.isfinite(g))
        assert np.any(g != 0), f"{pname}: gradient is all zeros"
        # the largest-gradient entry (so the tensor's scale is always sampled) + random ones
        idx = [np.unravel_index(int(np.argmax(np.abs(g))), g.shape)]
        idx += [tuple(int(rng.integers(0, s)) for s in g.shape) for _ in range(3)]
        num = numeric_grad(f, model.params[pname], eps=1e-5, indices=idx)
        ana = np.array([g[i] for i in idx])
        err = rel_err(ana, num)
        assert err < 1e-6, f"{pname}: relative error {err:.2e} at {idx}"


# ------------------------------------------------------------------ gradients agree across options

@pytest.mark.parametrize("name", CONFIGS)
def test_gradients_identical_across_policy_attention_and_loss(name):
    cfg = named_config(name)
    model = Model.random(cfg, 2, np.float64).train_all()
    tokens, targets = _batch(cfg, B=2, T=11, seed=3)
    variants = {
        "none/plain/plain": StepOptions(policy="none", attention="plain", loss="plain"),
        "layer/plain/plain": StepOptions(policy="layer", attention="plain", loss="plain"),
        "none/tiled/chunked": StepOptions(policy="none", attention="tiled", loss="chunked", tile=3, ce_chunk=4),
        "layer/tiled/chunked": StepOptions(policy="layer", attention="tiled", loss="chunked", tile=5, ce_chunk=1),
        "layer/tiled/plain": StepOptions(policy="layer", attention="tiled", loss="plain", tile=2),
        "layer/rows": StepOptions(policy="layer", tile=5, mlp_rows=3),
        "layer/disk/rows": StepOptions(policy="layer", checkpoints="disk", mlp_rows=8),
    }
    ref_loss, ref = _grads(model, tokens, targets, variants["none/plain/plain"])
    for label, opts in variants.items():
        loss, grads = _grads(model, tokens, targets, opts)
        assert abs(loss - ref_loss) < 1e-12, label
        for pname in ref:
            assert rel_err(grads[pname], ref[pname]) < 1e-12, f"{label}: {pname}"
    # recomputing a block with the same code is bit-for-bit the same
    _, a = _grads(model, tokens, targets, variants["none/tiled/chunked"])
    _, b = _grads(model, tokens, targets, StepOptions(policy="layer", tile=3, ce_chunk=4))
    for pname in a:
        np.testing.assert_array_equal(a[pname], b[pname], err_msg=pname)


def test_gradients_accumulate_into_the_buffers():
    cfg = named_config("tiny")
    model = Model.random(cfg, 0, np.float64).train_all()
    tokens, targets = _batch(cfg)
    grads = zero_grads(model)
    forward_backward(model, tokens, targets, grads, StepOptions(tile=4))
    once = {k: v.copy() for k, v in grads.items()}
    forward_backward(model, tokens, targets, grads, StepOptions(tile=4))
    for k in grads:
        assert rel_err(grads[k], 2 * once[k]) < 1e-14, k


def _partial(policy, trainable):
    cfg = named_config("tiny-qwen2")
    model = Model.random(cfg, 4, np.float64).train_all()
    tokens, targets = _batch(cfg, seed=5)
    opts = StepOptions(policy=policy, tile=3, ce_chunk=5)
    _, full = _grads(model, tokens, targets, opts)
    model.trainable = {n for n in model.params if trainable(n)}
    _, part = _grads(model, tokens, targets, opts)
    assert set(part) == model.trainable
    for n in part:
        assert rel_err(part[n], full[n]) < 1e-12, n


@pytest.mark.parametrize("policy", ["none", "layer"])
def test_partial_training_gives_the_same_gradients(policy):
    """Only layer 1's linears and the final norm train: the backward stops above layer 0,
    and what does train gets exactly the gradient full training gives it."""
    _partial(policy, lambda n: (n.startswith("model.layers.1.") and "layernorm" not in n)
             or n in ("model.norm.weight", "lm_head.weight"))


@pytest.mark.parametrize("policy", ["none", "layer"])
def test_partial_training_with_the_lowest_blocks_input_norm_training(policy):
    """Full fine-tuning with frozen input embeddings: layer 0 is the lowest trainable block
    and its input_layernorm.weight trains."""
    _partial(policy, lambda n: n != "model.embed_tokens.weight")


# ------------------------------------------------------------------ training reduces the loss

@pytest.mark.parametrize("name", CONFIGS)
def test_adamw_overfits_one_batch(name):
    cfg = named_config(name)
    model = Model.random(cfg, 0, np.float32).train_all()
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, cfg.vocab_size, size=(2, 16))
    targets = next_token_targets(tokens)
    grads = zero_grads(model)
    opt = AdamW(lr=1e-2)
    losses = []
    for _ in range(50):
        for g in grads.values():
            g.fill(0)
        losses.append(forward_backward(model, tokens, targets, grads,
                                       StepOptions(policy="layer", tile=5, ce_chunk=7)))
        clip_grad_norm(grads, 1.0)
        opt.step(model.params, grads)
    # a random model starts near the uniform loss log(V) (measured: 4.56 vs log 96 = 4.56)
    assert abs(losses[0] - np.log(cfg.vocab_size)) < 0.1
    # measured: the final loss is ~1e-3 of the initial one; require a 10x drop
    assert losses[-1] < 0.1 * losses[0], losses[::10]
    assert forward_loss(model, tokens, targets)[0] < 0.1 * losses[0]
    assert all(np.all(np.isfinite(p)) for p in model.params.values())


# ------------------------------------------------------------------ bad input

@pytest.fixture(scope="module")
def tiny_model():
    return Model.random(named_config("tiny"), 0, np.float32).train_all()


@pytest.mark.parametrize("bad", [-1, 96, 1000])
def test_token_id_out_of_range(tiny_model, bad):
    tokens = np.array([[1, 2, bad, 3]])
    with pytest.raises(ValueError, match=f"token id {bad} is out of range for a vocabulary of 96"):
        forward_backward(tiny_model, tokens, next_token_targets(np.abs(tokens) % 96),
                         zero_grads(tiny_model))
    with pytest.raises(ValueError, match="out of range"):
        forward_logits(tiny_model, tokens)


def test_sequence_longer_than_max_positions(tiny_model):
    tokens = np.zeros((1, 257), dtype=np.int64)
    with pytest.raises(ValueError, match=r"sequence length 257 exceeds the model's "
                                         r"max_position_embeddings \(256\)"):
        forward_backward(tiny_model, tokens, next_token_targets(tokens), zero_grads(tiny_model))


def test_targets_of_the_wrong_shape(tiny_model):
    tokens = np.zeros((2, 8), dtype=np.int64)
    with pytest.raises(ValueError, match=r"targets shape \(2, 7\) must equal tokens shape \(2, 8\)"):
        forward_backward(tiny_model, tokens, np.zeros((2, 7), dtype=np.int64), zero_grads(tiny_model))


def test_all_targets_ignored(tiny_model):
    tokens = np.zeros((1, 8), dtype=np.int64)
    for opts in (StepOptions(loss="chunked"), StepOptions(loss="plain")):
        with pytest.raises(ValueError, match="every target is ignored"):
            forward_backward(tiny_model, tokens, np.full((1, 8), IGNORE), zero_grads(tiny_model), opts)


def test_tokens_must_be_2d_and_nonempty(tiny_model):
    with pytest.raises(ValueError, match=r"\(batch, seq\) array"):
        forward_logits(tiny_model, np.zeros(5, dtype=np.int64))
    with pytest.raises(ValueError, match="must not be empty"):
        forward_logits(tiny_model, np.zeros((1, 0), dtype=np.int64))


@pytest.mark.parametrize("kw, msg", [(dict(policy="all"), "unknown recompute policy 'all'"),
                                     (dict(attention="flash"), "unknown attention form 'flash'"),
                                     (dict(loss="fused"), "unknown loss form 'fused'"),
                                     (dict(tile=0), "tile and ce_chunk must be positive")])
def test_bad_step_options(kw, msg):
    with pytest.raises(ValueError, match=msg):
        StepOptions(**kw)


# ------------------------------------------------------------------ the saved set is the declared set

class RecordingLedger(Ledger):
    """A ledger that remembers every keep: (layer, op, name) -> id of the owning buffer.
    It holds the buffers too, so no id is reused by a later allocation."""

    def __init__(self):
        super().__init__()
        self.kept, self.held = {}, []

    def keep(self, layer, op, name, array, category="activations", why=""):
        if category == "activations":
            self.kept[(layer, op, name)] = id(owning_buffer(array))
            self.held.append(owning_buffer(array))
        return super().keep(layer, op, name, array, category, why)

    def keep_on_disk(self, layer, op, name, *args, **kwargs):
        self.held.append(object())                  # in the file: a buffer of its own
        self.kept[(layer, op, name)] = id(self.held[-1])
        return super().keep_on_disk(layer, op, name, *args, **kwargs)


SAVED_SET_CASES = [("tiny", "full", None), ("tiny-qwen2", "full", None),
                   ("tiny", "lora", dict(rank=3)), ("tiny-qwen2", "ia3", {}),
                   ("tiny", "lars", dict(block=16)), ("tiny-qwen2", "lars", dict(block=8, save="keep")),
                   ("tiny", "ia3", dict(targets="all-linear", feedforward="gate_proj,down_proj"))]


@pytest.mark.parametrize("name, method, settings", SAVED_SET_CASES,
                         ids=[f"{n}-{m}-{i}" for i, (n, m, _) in enumerate(SAVED_SET_CASES)])
@pytest.mark.parametrize("opts", [StepOptions(policy="none", tile=4),
                                  StepOptions(policy="layer", attention="plain"),
                                  StepOptions(policy="layer", checkpoints="bf16"),
                                  StepOptions(policy="layer", checkpoints="disk"),
                                  StepOptions(policy="layer", mlp_rows=4)],
                         ids=["none-tiled", "layer-plain", "layer-bf16", "layer-disk", "layer-rows"])
def test_every_block_keeps_exactly_what_it_declares(name, method, settings, opts):
    """Per layer, the tensors a real step keeps are the declared ones (no more, no fewer);
    tensors declared with one buffer name share one buffer, different names never do; and
    the ledger's bytes are the declaration's bytes."""
    cfg = named_config(name)
    model = Model.random(cfg, 0, np.float32)
    if method == "full":
        model.train_all()
    else:
        attach(model, adapter_for(method, **settings))
    tokens, targets = _batch(cfg, B=2, T=9)
    B, T = tokens.shape
    ledger = RecordingLedger()
    forward_backward(model, tokens, targets, zero_grads(model), opts, ledger)
    layer_sets = [(-1, step_saved(model, B, T, opts))]
    for i in range(cfg.num_hidden_layers):
        declared = dict(block_saved(model, i, B, T, opts))
        if opts.policy == "layer":
            keep = checkpoint_keep(opts.checkpoints, (B, T, cfg.hidden_size), model.dtype)
            declared[(keep.op, keep.name)] = keep
        if opts.mlp_rows:
            declared.update(mlp_rows_saved(model, i, opts.mlp_rows))
        layer_sets.append((i, declared))
    for layer, declared in layer_sets:
        kept = {(op, n): bid for (l, op, n), bid in ledger.kept.items() if l == layer}
        assert set(kept) == set(declared), (layer, set(kept) ^ set(declared))
        by_name = {}
        for key, spec in declared.items():
            by_name.setdefault(spec.buffer, set()).add(kept[key])
        assert all(len(ids) == 1 for ids in by_name.values()), (layer, by_name)
        assert len({next(iter(ids)) for ids in by_name.values()}) == len(by_name), layer
    if opts.policy == "none":     # at the end of the forward every block's set is alive
        assert ledger.max_by_category["activations"] == sum(
            declared_bytes(d.values()) for _, d in layer_sets)


@pytest.mark.parametrize("form", ["q8_0", "q4_0", "q4_1", "bfloat16"])
def test_gradients_on_frozen_blocks_equal_the_dequantized_models(form):
    """A LARS step on frozen weights held as blocks gives the gradients of the same model
    with those weights expanded to float32 (the kernels only reorder float32 sums)."""
    cfg = named_config("tiny")
    packed = attach(Model.random(cfg, 0, frozen_dtype=form), LARS(rank=2, block=16), seed=1)
    expanded = Model(cfg, {k: to_float(v) if isinstance(v, Packed) else v.copy()
                           for k, v in packed.params.items()})
    expanded = attach(expanded, LARS(rank=2, block=16), seed=1)
    for name in packed.trainable:
        expanded.params[name][...] = packed.params[name]
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, size=(2, 24))
    grads = []
    for model in (packed, expanded):
        g = zero_grads(model)
        forward_backward(model, tokens, next_token_targets(tokens), g, StepOptions(policy="layer"))
        grads.append(g)
    assert any(isinstance(v, Packed) for v in packed.params.values())
    for name in grads[1]:
        np.testing.assert_allclose(grads[0][name], grads[1][name], rtol=1e-4,
                                   atol=1e-6 * np.abs(grads[1][name]).max(), err_msg=name)
