"""Text-conditioned runs (issue 30): captions become token ids, the condition training batches carry.

A run whose network reads text (``model.net = "unet_text"``, :class:`torchdiffusion.nets.text.TextUNet`) trains
on a captioned image folder (the ``text`` column of its ``metadata.jsonl``; ``make-data shapes`` writes one), or
on the latents of one (a latent run: the autoencoder's folder's captions). Before training:

1. a word-level tokenizer (:class:`~torchdiffusion.data.tokenizer.CaptionTokenizer`, at most ``model.text_vocab``
   ids, ``model.text_length`` tokens per prompt) is trained on the captions of the training split only (the
   ``data.holdout`` examples and the ``data.exclude`` rows are never seen), or, when a run is resumed, loaded from
   the run folder's ``tokenizer.json``;
2. every caption becomes ``model.text_length`` token ids, which replace the labels as the data's ``y``: the
   trainer hands them to the loss as ``cond`` exactly as it hands class labels, the loss drops them to the null
   condition with probability ``loss.p_uncond`` (:func:`torchdiffusion.runs.train.drop_labels`), and the network
   reads the null condition as the empty prompt. An image without a caption trains the unconditional model.

The tokenizer is written atomically to ``RUN/tokenizer.json`` once the trainer holds the folder, and the run's
``config.json`` records it under ``run.text``; :func:`load_tokenizer` reads it back for sampling.
"""

from __future__ import annotations

from pathlib import Path

import torch

from torchdiffusion.data.datasets import Dataset, captions, split_dataset, with_targets
from torchdiffusion.data.folder import ImageFolder
from torchdiffusion.data.tokenizer import FILE, CaptionTokenizer

TEXT_NETS = ("unet_text",)


def is_text_run(cfg: dict) -> bool:
    """Whether the run's network is conditioned on text prompts."""
    return (cfg.get("model") or {}).get("net") in TEXT_NETS


def tokenize_data(cfg: dict, full: Dataset | ImageFolder, tokenizer: CaptionTokenizer | None = None
                  ) -> tuple[Dataset | ImageFolder, CaptionTokenizer]:
    """``full`` (the whole data set, before the train / held-out split) with the token ids of its captions as its
    ``y``, and the tokenizer (trained on the training split's captions unless given); module doc."""
    caps = captions(full)
    if caps is None or all(c is None for c in caps):
        raise ValueError(f"model.net={cfg['model']['net']!r} is conditioned on captions, but the data {full.name!r} "
                         "has none: use an image folder whose metadata.jsonl has a 'text' column (make-data shapes "
                         "writes one), or the latents of one")
    if tokenizer is None:
        train_part = split_dataset(full, float(cfg["data"].get("holdout") or 0.0))[0]
        m = cfg["model"]
        tokenizer = CaptionTokenizer.train(captions(train_part), vocab_size=int(m["text_vocab"]),
                                           max_length=int(m["text_length"]))
    ids = tokenizer.encode([c or "" for c in caps])
    return with_targets(full, torch.from_numpy(ids)), tokenizer


def text_info(tokenizer: CaptionTokenizer | None) -> dict:
    """The ``run.text`` entry of ``config.json`` (empty for a run without text)."""
    if tokenizer is None:
        return {}
    return {"text": {"tokenizer": FILE, "vocab_size": tokenizer.vocab_size, "max_length": tokenizer.max_length}}


def load_tokenizer(run: str | Path, cfg: dict) -> CaptionTokenizer | None:
    """The tokenizer of a run folder (``RUN/tokenizer.json``) if the run reads text, else None."""
    info = (cfg.get("run") or {}).get("text")
    if not info:
        return None
    return CaptionTokenizer.load(Path(run) / info.get("tokenizer", FILE))
