"""Tokenizer: a thin wrapper over a Hugging Face `tokenizers.Tokenizer` (tokenizer.json).

    tok = Tokenizer.from_folder("weights/smollm2-135m")
    ids = tok.encode("Hello world")                  # [19556, 905]
    tok.decode(ids)                                  # "Hello world"
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])

Special tokens written in the text ("<|im_start|>") encode to their single id; that is
how the chat prompt below becomes ids.

Chat template. We do not run Jinja: apply_chat_template is a small built-in ChatML
renderer, which is what SmolLM2's template (tokenizer.chat_template in its GGUF) does:

    {% for message in messages %}
      {% if loop.first and messages[0]['role'] != 'system' %}
        <|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n
      {% endif %}
      <|im_start|>{role}\\n{content}<|im_end|>\\n
    {% endfor %}
    {% if add_generation_prompt %}<|im_start|>assistant\\n{% endif %}

i.e. each message is `<|im_start|>{role}\\n{content}<|im_end|>\\n`; when the first message
is not a system message, a default system message is put first; the generation prompt
is `<|im_start|>assistant\\n`. The default system prompt is read from the folder's
template text (tokenizer_config.json "chat_template") when it has that shape; a folder
without a template gets no default system message.
"""
from __future__ import annotations

import os
import re

from tokenizers import Tokenizer as Backend

from minilars.config import read_json_file

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# the default system message inside a ChatML template such as SmolLM2's
_DEFAULT_SYSTEM_RE = re.compile(
    r"messages\[0\]\[['\"]role['\"]\]\s*!=\s*['\"]system['\"].*?"
    r"<\|im_start\|>system(?:\\n|\n)(.*?)<\|im_end\|>", re.DOTALL)


class TokenizerError(ValueError):
    """A tokenizer folder or chat input that cannot be used; the message names it."""


def default_system_prompt(chat_template: str | None) -> str | None:
    """The system prompt a ChatML template inserts when the chat has none, else None."""
    if not chat_template:
        return None
    m = _DEFAULT_SYSTEM_RE.search(chat_template)
    return m.group(1) if m else None


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as "text" or {"content": "text", ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """encode/decode text with a tokenizer.json; bos/eos ids; a ChatML chat renderer."""

    def __init__(self, backend, bos_id: int | None = None, eos_id: int | None = None,
                 chat_template: str | None = None, source: str = "tokenizer"):
        self.backend = backend          # tokenizers.Tokenizer
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.chat_template = chat_template
        self.default_system_prompt = default_system_prompt(chat_template)
        self.source = source

    @classmethod
    def from_folder(cls, folder: str) -> "Tokenizer":
        """Reads FOLDER/tokenizer.json and, when present, tokenizer_config.json (special
        tokens, chat template), generation_config.json and config.json (bos/eos ids)."""
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.exists(path):
            raise TokenizerError(f"{folder}: no tokenizer.json found")
        try:
            backend = Backend.from_file(path)
        except Exception as e:
            raise TokenizerError(f"{path}: cannot be read by the tokenizers library ({e})") from None

        def read_json(name):
            p = os.path.join(folder, name)
            if not os.path.exists(p):
                return {}
            found = read_json_file(p, TokenizerError)
            if not isinstance(found, dict):
                raise TokenizerError(f"{p}: expected a JSON object, found {type(found).__name__}")
            return found

        tok_cfg, gen_cfg, model_cfg = (read_json("tokenizer_config.json"),
                                       read_json("generation_config.json"), read_json("config.json"))

        def special_id(key):
            text = _token_text(tok_cfg.get(f"{key}_token"))
            if text is not None and backend.token_to_id(text) is not None:
                return backend.token_to_id(text)
            for d, name in ((gen_cfg, "generation_config.json"), (model_cfg, "config.json")):
                value = d.get(f"{key}_token_id")
                if isinstance(value, list):
                    value = value[0] if value else None
                if value is None:
                    continue
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise TokenizerError(f"{os.path.join(folder, name)}: {key}_token_id is "
                                         f"{value!r}; expected a token id (a whole number >= 0)")
                return value
            return None

        template = tok_cfg.get("chat_template")
        if isinstance(template, list):   # [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template
                             if isinstance(t, dict) and t.get("name") == "default"), None)
        if template is not None and not isinstance(template, str):
            raise TokenizerError(f"{os.path.join(folder, 'tokenizer_config.json')}: chat_template "
                                 f"is {type(template).__name__}; expected a string")
        return cls(backend, special_id("bos"), special_id("eos"), template, source=folder)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (may be below the model's vocab_size)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in it map to their ids."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode: text must be a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise TokenizerError(f"{self.source}: add_bos=True but the tokenizer has no bos token")
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list or 1-D array of ints)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"decode: ids {bad[:5]} are outside 0..{self.vocab_size - 1}")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """ChatML text of a chat (see the module docstring for the exact rules)."""
        if not isinstance(messages, (list, tuple)):
            raise TokenizerError("apply_chat_template: messages must be a list of "
                                 "{'role': ..., 'content': ...} dicts")
        parts = []
        for k, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                    or not isinstance(message.get("content"), str):
                raise TokenizerError(f"apply_chat_template: messages[{k}] must be a dict with "
                                     f"str 'role' and 'content', got {message!r}")
            if k == 0 and message["role"] != "system" and self.default_system_prompt is not None:
                parts.append(f"{IM_START}system\n{self.default_system_prompt}{IM_END}\n")
            parts.append(f"{IM_START}{message['role']}\n{message['content']}{IM_END}\n")
        if add_generation_prompt:
            parts.append(f"{IM_START}assistant\n")
        return "".join(parts)
