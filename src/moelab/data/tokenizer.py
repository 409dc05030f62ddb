"""A byte-level BPE tokenizer trained with the ``tokenizers`` library, saved for ``transformers``.

Byte-level BPE (GPT-2 style) maps every byte to a symbol before merging, so any text round-trips
exactly: there is no normaliser, no unknown token, no added prefix space. The folder written holds a
``tokenizer.json`` plus a ``tokenizer_config.json`` naming ``PreTrainedTokenizerFast``, so that
``transformers.AutoTokenizer.from_pretrained(folder)`` loads it without any moelab code.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moelab.data.atomic import atomic_write_text
from moelab.errors import MoelabError

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
    """Train a byte-level BPE of ``vocab_size`` tokens (256 byte symbols + merges + ``<|endoftext|>``)."""
    if vocab_size < 512:
        raise MoelabError(f"vocab_size: expected at least 512 (256 byte symbols + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, folder: Path, model_max_length: int = 1024) -> None:
    """Write ``tokenizer.json`` and a ``tokenizer_config.json`` that transformers reads, atomically."""
    folder = Path(folder)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    # NOTE: tokenizers writes JSON with sorted-insertion order that is stable, so the file is deterministic.
    atomic_write_text(folder / "tokenizer.json", tok.to_str(pretty=False))
    atomic_write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")


def load_tokenizer(folder: str | Path, hint: str = "") -> Tokenizer:
    """The ``tokenizers.Tokenizer`` in ``folder/tokenizer.json``: moelab's one tokenizer loader.

    Raises MoelabError naming the folder when the file is missing (``hint`` says what to do
    instead) and naming the file when it does not load.
    """
    path = Path(folder) / TOKENIZER_FILE
    if not path.is_file():
        raise MoelabError(f"{folder} has no tokenizer ({TOKENIZER_FILE} expected)" + (f"; {hint}" if hint else ""))
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust library raises plain Exception
        raise MoelabError(f"{path}: cannot load the tokenizer ({err})") from None


def eos_id(tok: Tokenizer) -> int:
    """Id of the end-of-text token that separates documents."""
    idx = tok.token_to_id(EOS_TOKEN)
    if idx is None:
        raise MoelabError(f"tokenizer: no {EOS_TOKEN} token in its vocabulary")
    return idx
