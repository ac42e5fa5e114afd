"""A tiny but complete HF model folder built on the spot: random weights of the `tiny`
config with a byte-level BPE tokenizer trained on a few lines of Botchan (no download)."""
import json
import os

import numpy as np

from minilars.config import named_config
from minilars.io.safetensors_io import save_model
from minilars.params import init_params

TEXT = ("I inherited from my parents a reckless spirit that has caused me trouble ever since "
        "I was a child. During my elementary school days, I once jumped from the second story "
        "of the school building and lay helpless for a week.")


def make_tiny_folder(path: str, seed: int = 0, vocab: int = 320) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator([TEXT] * 10 + ["Question: yes or no?\nAnswer: yes no maybe"] * 10, trainer)
    n_vocab = backend.get_vocab_size()
    cfg = named_config("tiny").replace(vocab_size=n_vocab, eos_token_id=2, bos_token_id=1)
    os.makedirs(path, exist_ok=True)
    save_model(path, cfg, init_params(cfg, seed, np.float32))
    backend.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}, f)
    return path
