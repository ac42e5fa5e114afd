"""minilars: memory-lean LLM fine-tuning in NumPy, every saved byte counted."""
from minilars.config import ModelConfig, named_config
from minilars.io.tokenizer import Tokenizer  # tokenizers itself is imported on first use

__version__ = "0.1.0"
__all__ = ["ModelConfig", "named_config", "__version__"]
