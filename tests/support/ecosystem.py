"""Shared helpers for the ecosystem tests (transformers, PEFT, lm-eval, eval and convert commands)."""

from __future__ import annotations

from pathlib import Path

import torch

import blackmamba

TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "All that glitters is not gold. Actions speak louder than words. Où est la bibliothèque? "
    "Beware of the dog. The early bird catches the worm. Fortune favours the bold. "
) * 8
EOS = "<|endoftext|>"


def tiny_model(seed: int = 0, **overrides) -> blackmamba.BlackMambaLM:
    """A few-thousand-parameter model (preset ``tiny``: Mamba / 4-expert MoE × 2), random weights."""
    torch.manual_seed(seed)
    return blackmamba.BlackMambaLM(blackmamba.preset("tiny", vocab_size=320, **overrides)).eval()


def train_tokenizer(path: Path, vocab_size: int = 300) -> Path:
    """A byte-level BPE with an end-of-text token, trained on ``TEXT``; written to ``path`` (tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    tok.save(str(path))
    return path


def model_folder(tmp: Path, seed: int = 0, **overrides) -> Path:
    """A native folder (config.json + model.safetensors + tokenizer.json) holding a tiny model."""
    tmp.mkdir(parents=True, exist_ok=True)
    tiny_model(seed, **overrides).save_pretrained(tmp)
    train_tokenizer(tmp / "tokenizer.json")
    return tmp
