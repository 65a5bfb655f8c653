"""The tokenizer of text-conditioned runs: captions -> fixed-length token ids (issue 30).

A word-level tokenizer of the Hugging Face ``tokenizers`` library, trained on a run's training captions and saved
in its run folder as ``tokenizer.json`` (written atomically), from where sampling loads it.

Why word-level and not BPE: the captions of a generated data set (``make-data shapes``) come from a closed
vocabulary of a few dozen words, every one of which carries meaning (a colour, a shape, a size, a position). A
word-level vocabulary gives each word exactly one token, so the text encoder sees ``blue`` and ``triangle`` as units
it can recombine ("a blue triangle" never seen in training still reads as the two known words); BPE would only
pay off on an open vocabulary, where it splits rare words into pieces. A word outside the vocabulary becomes
``[UNK]``, never an error.

Rules, stated:

- normalisation: Unicode NFKC, then lower case; words are split at white space and punctuation (each run of
  punctuation is its own token);
- ids: ``0`` = ``[PAD]``, ``1`` = ``[UNK]``, then the training words, most frequent first (at most
  ``vocab_size`` ids in all; less frequent words beyond that become ``[UNK]``);
- every prompt becomes exactly ``max_length`` ids: shorter ones are padded with ``[PAD]``; longer ones are
  truncated to their first ``max_length`` words, with a warning (:class:`PromptTruncatedWarning`) naming the prompt;
- the empty prompt (``""``, or only spaces) is all ``[PAD]``: the text encoder reads it as "no text", the
  unconditional half of classifier-free guidance (:mod:`torchdiffusion.nets.text`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from torchdiffusion._files import FileError, read_text, write_bytes

PAD, UNK = "[PAD]", "[UNK]"
PAD_ID, UNK_ID = 0, 1
FILE = "tokenizer.json"


class PromptTruncatedWarning(UserWarning):
    """A prompt longer than the tokenizer's ``max_length`` was cut to its first ``max_length`` tokens."""


class CaptionTokenizer:
    """A word-level ``tokenizers.Tokenizer`` with the module's fixed rules (``max_length`` ids per prompt)."""

    def __init__(self, tok: Tokenizer, max_length: int):
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"the tokenizer's max_length must be a whole number >= 1, got {max_length!r}")
        if tok.token_to_id(PAD) != PAD_ID or tok.token_to_id(UNK) != UNK_ID:
            raise ValueError(f"a caption tokenizer needs {PAD} = {PAD_ID} and {UNK} = {UNK_ID}")
        self.tok, self.max_length = tok, int(max_length)
        self.tok.no_padding()
        self.tok.no_truncation()

    @classmethod
    def train(cls, captions: Iterable[str], *, vocab_size: int, max_length: int) -> CaptionTokenizer:
        """Train on ``captions`` (None entries, uncaptioned images, are skipped): the at most ``vocab_size``
        ids of the module doc."""
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 3:
            raise ValueError(f"the tokenizer's vocab_size must be a whole number >= 3, got {vocab_size!r}")
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=[PAD, UNK],
                                            show_progress=False)
        # sorted: the ids of words with equal counts do not depend on the order of the captions
        tok.train_from_iterator(sorted(c for c in captions if c is not None), trainer=trainer)
        return cls(tok, max_length)

    @property
    def vocab_size(self) -> int:
        """The number of ids in use (``[PAD]`` and ``[UNK]`` included)."""
        return self.tok.get_vocab_size()

    def words(self, text: str) -> list[str]:
        """The tokens of ``text`` before truncation and padding (unknown words as ``[UNK]``)."""
        return self.tok.encode(text).tokens

    def encode(self, texts: str | Sequence[str], *, warn: bool = True) -> np.ndarray:
        """Token ids ``(len(texts), max_length)`` int64 (one row for a single string); a prompt longer than
        ``max_length`` tokens is truncated with a :class:`PromptTruncatedWarning` (unless ``warn=False``)."""
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"a prompt must be a string, got {type(t).__name__} {t!r}")
        out = np.full((len(texts), self.max_length), PAD_ID, dtype=np.int64)
        long: list[tuple[int, int]] = []
        for i, enc in enumerate(self.tok.encode_batch(texts) if texts else []):
            ids = enc.ids
            if len(ids) > self.max_length:
                long.append((i, len(ids)))
            ids = ids[:self.max_length]
            out[i, :len(ids)] = ids
        if long and warn:  # one warning, however many prompts
            i, k = long[0]
            more = f" ({len(long)} prompts in all)" if len(long) > 1 else ""
            warnings.warn(PromptTruncatedWarning(
                f"prompt {texts[i][:80]!r} has {k} tokens; truncated to the first {self.max_length} (the tokenizer's "
                f"max_length){more}"), stacklevel=2)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """The words of token ids (padding dropped)."""
        return self.tok.decode([int(i) for i in ids if int(i) != PAD_ID])

    # --- the run folder ------------------------------------------------------------------------------------
    def to_json(self) -> str:
        """The ``tokenizers`` JSON, with ``max_length`` recorded in its ``truncation`` entry."""
        d = json.loads(self.tok.to_str())
        d["truncation"] = {"direction": "Right", "max_length": self.max_length, "strategy": "LongestFirst",
                           "stride": 0}
        return json.dumps(d, ensure_ascii=False, indent=1)

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` atomically (a folder is given: ``FOLDER/tokenizer.json``); the run layer's file,
        so a run folder's own tokenizer may be written here (and only here: it is one of
        :data:`torchdiffusion._files.RUN_FOLDER_FILES`)."""
        path = Path(path)
        path = path / FILE if path.is_dir() else path
        return write_bytes(path, self.to_json().encode("utf-8"), run_file=True)

    @classmethod
    def load(cls, path: str | Path) -> CaptionTokenizer:
        """Read what :meth:`save` wrote (a folder is given: ``FOLDER/tokenizer.json``); a missing or damaged file
        is one line naming it."""
        path = Path(path)
        path = path / FILE if path.is_dir() else path
        text = read_text(path, "tokenizer")
        try:
            d = json.loads(text)
            max_length = int(d["truncation"]["max_length"])
            tok = Tokenizer.from_str(text)
        except (ValueError, KeyError, TypeError, Exception) as e:  # noqa: BLE001 -- tokenizers raises its own kinds
            raise FileError(f"{path}: not a caption tokenizer ({type(e).__name__}: {str(e)[:120]})") from None
        return cls(tok, max_length)
