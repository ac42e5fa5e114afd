"""Tokenizer wrapper and its built-in ChatML renderer, on a small byte-level BPE built here
with the tokenizers library (no download), plus the real SmolLM2 folder when present."""
import json
import os

import pytest
from hypothesis import given, strategies as st

import minilars
from minilars.io.tokenizer import Tokenizer, TokenizerError, default_system_prompt

SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                 "Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
                 "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|im_start|>assistant\n' }}{% endif %}")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOL = os.path.join(ROOT, "weights", "smollm2-135m")


def make_folder(path, template=SMOL_TEMPLATE, bos_as_dict=False):
    """tokenizer.json trained on a few sentences + tokenizer_config.json, as HF writes them."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20
                                + ["hello world, hello there"] * 20, trainer)
    os.makedirs(path, exist_ok=True)
    backend.save(os.path.join(path, "tokenizer.json"))
    config = {"bos_token": {"content": "<|im_start|>"} if bos_as_dict else "<|im_start|>",
              "eos_token": "<|im_end|>"}
    if template is not None:
        config["chat_template"] = template
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return str(path)


@pytest.fixture
def tok(tmp_path):
    return Tokenizer.from_folder(make_folder(tmp_path / "tok"))


def test_exported_at_package_level():
    assert minilars.Tokenizer is Tokenizer


def test_ids_and_special_tokens(tmp_path):
    t = Tokenizer.from_folder(make_folder(tmp_path / "a", bos_as_dict=True))
    assert (t.bos_id, t.eos_id) == (1, 2)
    assert t.vocab_size == 300
    ids = t.encode("hello world")
    assert t.encode("hello world", add_bos=True) == [1] + ids
    assert t.encode("<|im_start|>hello<|im_end|>") == [1] + t.encode("hello") + [2]
    assert t.decode([1] + ids + [2]) == "<|im_start|>hello world<|im_end|>"
    assert t.decode([1] + ids + [2], skip_special_tokens=True) == "hello world"


@given(st.text(max_size=60))
def test_any_text_round_trips(tmp_path_factory, text):
    folder = tmp_path_factory.getbasetemp() / "rt"
    if not (folder / "tokenizer.json").exists():
        make_folder(folder)
    t = Tokenizer.from_folder(str(folder))
    assert t.decode(t.encode(text)) == text


def test_bad_input_is_named(tok, tmp_path):
    with pytest.raises(TokenizerError, match="text must be a str"):
        tok.encode(b"bytes")
    with pytest.raises(TokenizerError, match=r"ids \[300\] are outside 0..299"):
        tok.decode([0, 300])
    with pytest.raises(TokenizerError, match=r"messages\[1\] must be a dict with str 'role' and 'content'"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "user"}])
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_folder(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="tokenizer.json: cannot be read"):
        Tokenizer.from_folder(str(tmp_path))


def test_chat_template_with_default_system_prompt(tok):
    assert tok.default_system_prompt == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    assert tok.apply_chat_template(chat) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>assistant\n")
    own_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(own_system, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")
    assert tok.apply_chat_template([]) == "<|im_start|>assistant\n"


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
    [{"role": "user", "content": "a\nb"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "c"}],
    [],
])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_builtin_renderer_matches_jinja(tok, messages, add_generation_prompt):
    jinja2 = pytest.importorskip("jinja2")
    expected = jinja2.Template(SMOL_TEMPLATE).render(messages=messages,
                                                     add_generation_prompt=add_generation_prompt)
    assert tok.apply_chat_template(messages, add_generation_prompt) == expected


def test_no_template_means_no_default_system_message(tmp_path):
    t = Tokenizer.from_folder(make_folder(tmp_path / "b", template=None))
    assert t.default_system_prompt is None
    assert t.apply_chat_template([{"role": "user", "content": "Hi"}]) == \
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert default_system_prompt("{{ messages }}") is None


def test_default_system_prompt_from_json_escaped_template():
    """tokenizer_config.json from HF keeps the newline as the two characters backslash-n."""
    escaped = SMOL_TEMPLATE.replace("\n", "\\n")
    assert default_system_prompt(escaped) == \
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.mark.skipif(not os.path.exists(os.path.join(SMOL, "tokenizer.json")),
                    reason="weights/smollm2-135m not fetched (minilars fetch smollm2-135m)")
def test_real_smollm2_tokenizer():
    t = Tokenizer.from_folder(SMOL)
    assert (t.bos_id, t.eos_id, t.vocab_size) == (1, 2, 49152)
    assert t.encode("Hello world! 2024") == [19556, 905, 17, 216, 34, 32, 34, 36]
    text = "Tabs\tand  spaces, ünïcödé, emoji 🙂, code: x**2 // 3"
    assert t.decode(t.encode(text)) == text
    prompt = t.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert t.encode(prompt)[:3] == [1, 9690, 198]       # <|im_start|> system \n
