"""A byte-level BPE tokenizer for the checkpoints `moe-serve init-model` writes, made with `tokenizers`."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: Mixtral's unk, bos, eos

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
    if vocab_size < len(SPECIAL) + 256:
        return  # too small a vocabulary for byte-level text; token ids still work
    train_tokenizer(vocab_size).save(str(Path(out_dir) / "tokenizer.json"))


def load_tokenizer(model_dir: str | Path) -> Tokenizer | None:
    path = Path(model_dir) / "tokenizer.json"
    return Tokenizer.from_file(str(path)) if path.is_file() else None
