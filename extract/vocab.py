"""Small tokenizers trained on the run's own text, for experiments that must not reach a hub.

The embedded default run needs a teacher and a student that cut text differently (so alignment is real), and both
need tiny vocabularies so a CPU trains them in minutes. A byte-level BPE (GPT-2's scheme) trained on the
teacher-training text gives that: exact decoding, character offsets for alignment, and a vocabulary size we choose.
Digits are always single tokens (``Digits(individual_digits=True)``): arithmetic is learned digit by digit, and
neither model gets numbers merged in ways the other cannot see.

Specials: ``<pad>``, ``<s>`` (BOS), ``</s>`` (EOS) and ``<unk>``. The tokenizer adds none of them itself (encoding a
text gives only its bytes' tokens, so a prompt encoded for generation never ends in EOS); the student grid
(``extract/grid.py``) appends ``</s>`` after every whole sample, so a model trained on it learns to stop and
``kava eval`` stops on it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from kava.core.errors import ConfigError

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
"""Ids 0..3 of every trained tokenizer, in this order."""


def train_bpe_tokenizer(texts: Iterable[str], out: str | Path, *, vocab_size: int, min_frequency: int = 2) -> Path:
    """Train a byte-level BPE of ``vocab_size`` entries on ``texts`` and save it as a transformers tokenizer dir.

    Deterministic for the same texts and size (the trainer breaks ties by order). Returns ``out``; loading it back
    with ``AutoTokenizer.from_pretrained(out)`` gives a fast tokenizer whose ``bos_token``, ``eos_token``, ``pad_token``
    and ``unk_token`` are ``<s>``, ``</s>``, ``<pad>`` and ``<unk>`` (see the module docstring for who appends EOS).
    """
    if vocab_size < 256 + len(SPECIALS):
        raise ConfigError(f"Expected tokenizer vocab_size >= {256 + len(SPECIALS)} (the 256 bytes and "
                          f"{len(SPECIALS)} specials). Got {vocab_size} instead.")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK)
    out = Path(out)
    fast.save_pretrained(out)
    return out
