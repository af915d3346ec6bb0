"""A byte-level BPE tokenizer for the checkpoints `moe-serve init-model` writes, made with `tokenizers`,
and chat templates: the `chat_template` of a checkpoint's tokenizer_config.json (or its
chat_template.jinja), rendered with jinja2 the way transformers' `apply_chat_template` renders it."""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: Mixtral's unk, bos, eos

# What init-model writes: one block per message, the role between <| |>, each ended by eos.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('a message role must be system, user or assistant') }}{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

_CORPUS = """
The quick brown fox jumps over the lazy dog. A mixture of experts sends every token to a
few of its feed-forward networks, chosen by a learned gate. Each expert is a service of its
own; the router gathers what they return, weighted by the gate. Hello, world! Numbers 0 1 2
3 4 5 6 7 8 9 and punctuation: ; , . ? ! ( ) [ ] { } " ' - + * / = < > are all bytes too.
""".split("\n")


def train_tokenizer(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


def write_tokenizer(out_dir: str | Path, vocab_size: int) -> None:
    """tokenizer.json, and a tokenizer_config.json with CHAT_TEMPLATE (transformers' AutoTokenizer
    loads both)."""
    if vocab_size < len(SPECIAL) + 256:
        return  # too small a vocabulary for byte-level text; token ids still work
    train_tokenizer(vocab_size).save(str(Path(out_dir) / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": SPECIAL[0], "bos_token": SPECIAL[1],
              "eos_token": SPECIAL[2], "chat_template": CHAT_TEMPLATE}
    (Path(out_dir) / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_tokenizer(model_dir: str | Path) -> Tokenizer | None:
    path = Path(model_dir) / "tokenizer.json"
    return Tokenizer.from_file(str(path)) if path.is_file() else None


class ChatTemplate:
    """A checkpoint's chat template, compiled as transformers compiles it (sandboxed, trim_blocks,
    lstrip_blocks, `raise_exception`), with its special tokens as template variables."""

    def __init__(self, source: str, special_tokens: dict[str, str]):
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        self.template = env.from_string(source)
        self.special_tokens = special_tokens

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Raises jinja2.TemplateError (raise_exception included) on what the template refuses."""
        return self.template.render(messages=messages, tools=None, documents=None,
                                    add_generation_prompt=add_generation_prompt, **self.special_tokens)


def load_chat_template(model_dir: str | Path) -> ChatTemplate | None:
    """chat_template.jinja, else tokenizer_config.json's `chat_template` (a string, or a list of
    named templates: the one named "default"); None when the checkpoint has neither."""
    d = Path(model_dir)
    try:
        config = json.loads((d / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        config = {}
    source = config.get("chat_template")
    if isinstance(source, list):
        source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
    if (d / "chat_template.jinja").is_file():
        source = (d / "chat_template.jinja").read_text()
    if not isinstance(source, str) or not source:
        return None
    special = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            special[name] = value
    return ChatTemplate(source, special)
