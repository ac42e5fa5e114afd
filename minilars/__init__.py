"""minilars: memory-lean LLM fine-tuning in NumPy, every saved byte counted."""
import os

# OpenBLAS's idle threads spin for about 2^28 cycles after each product before they sleep;
# the tiled attention splits its query tiles over our own threads right after two-thread
# products, and a spinning BLAS thread holds the core one of them needs (minilars.threads).
# 2^4 cycles: they sleep at once. Read when OpenBLAS loads, so only when minilars is
# imported before NumPy (the `minilars` command, its worker processes); the user's own
# setting wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from minilars.config import ModelConfig, named_config  # noqa: E402  (after the setting)
from minilars.io.tokenizer import Tokenizer  # noqa: E402  (tokenizers: imported on first use)

__version__ = "0.1.0"
__all__ = ["ModelConfig", "named_config", "__version__"]
