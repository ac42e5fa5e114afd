"""Files in and out: safetensors and PEFT folders, GGUF conversion, the tokenizer, model fetch, atomic writes."""
