"""Tutorial 4: fine-tune a real model on a laptop CPU.

Run: `minilars fetch smollm2-135m && python tutorials/04_finetune_smollm2.py` (without the
weights, or with `MINILARS_FAST=1`, it uses a tiny random model instead)

Load SmolLM2-135M from its Hugging Face folder, ask it a question, fine-tune LARS for a few
steps on prompt/completion pairs (loss on the completions only), save the adapter in the
PEFT layout and load it back.
"""
import json
import os
import shutil
import sys
import tempfile

import numpy as np

from minilars.generate import generate
from minilars.io.peft import load_adapter
from minilars.runs import latest_checkpoint
from minilars.train import TrainOptions, load_base, train

HERE = os.path.dirname(os.path.abspath(__file__))
FOLDER = os.path.join(HERE, "..", "weights", "smollm2-135m")
FAST = os.environ.get("MINILARS_FAST") == "1" or not os.path.exists(os.path.join(FOLDER, "model.safetensors"))
work = tempfile.mkdtemp(prefix="minilars-tutorial-")
if FAST:
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    from tiny_folder import make_tiny_folder
    FOLDER = make_tiny_folder(os.path.join(work, "tiny"))
    print("(weights/smollm2-135m not found or MINILARS_FAST=1: using a tiny random model)")

# %% 1. Load and ask ------------------------------------------------------------------------
model, tok = load_base(FOLDER)
print(f"loaded {model.cfg.num_hidden_layers} layers, {model.base_param_count():,} parameters")
question = "What is the capital of France?"
prompt = tok.apply_chat_template([{"role": "user", "content": question}]) if tok.chat_template else question
ids = tok.encode(prompt)
answer = tok.decode(list(generate(model, ids, max_new_tokens=12, eos_ids=(tok.eos_id,))))
print(f"Q: {question}\nA: {answer.strip()}")

# %% 2. A few steps of LARS -------------------------------------------------------------------
data = os.path.join(work, "facts.jsonl")
facts = [("The capital of Botchan's home town is", " Tokyo."),
         ("Botchan teaches", " mathematics."),
         ("Botchan was born in", " Tokyo."),
         ("Botchan's nickname for the head teacher is", " Badger.")]
with open(data, "w") as f:
    for p, c in facts:
        f.write(json.dumps({"prompt": p, "completion": c}) + "\n")
opts = TrainOptions(model=FOLDER, method="lars", data=data, seq=64, steps=4 if FAST else 20,
                    batch=2, lr=1e-2, warmup=2, policy="layer", out=os.path.join(work, "run"),
                    save_every=100)


def log(line):
    """train's lines, without its per-step lines: those carry tok/s and RSS, which vary."""
    if not line.startswith("step "):
        print(line)


summary = train(opts, log=log)
for step, loss in enumerate(summary["losses"], 1):     # 4 significant digits, even near 0
    print(f"step {step:>2} | loss {loss:#.4g}")
print(f"loss {summary['losses'][0]:#.4g} -> {summary['losses'][-1]:#.4g}; "
      f"ledger peak {summary['ledger_peak_mib']:.0f} MiB")

# %% 3. The adapter file, loaded back -------------------------------------------------------
ckpt = latest_checkpoint(os.path.join(work, "run"))      # run/checkpoints/step-N, the newest
print("adapter files:", sorted(os.listdir(ckpt)))
tuned, _ = load_base(FOLDER)
load_adapter(ckpt, tuned)
print("adapter loaded:", len(tuned.adapted), "LARS linears")
shutil.rmtree(work)                     # the run folder was a temporary one
