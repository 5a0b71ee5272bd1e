"""Tiny random causal LMs for tests: llama / gpt2 / gpt_neo, 2 layers, hidden 64, with a small real byte-level BPE
tokenizer trained offline on built-in weather text (`make_tiny_model`)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

from fusion_trainer.errors import ConfigError, ModelError
from fusion_trainer.model.base import BASE_MARKER, TinyArch, is_complete, progress_bars, staging_dir

__all__ = ["make_tiny_model"]

logger = logging.getLogger(__name__)


_CORPUS = """\
The weather today is mild with a light breeze from the west. Temperatures rise to 21 degrees in the afternoon and
fall to 12 degrees at night. Clouds build over the hills, and a few showers are possible after sunset.
A cold front moves across the plains, bringing strong winds, heavy rain and a sharp drop in temperature.
Surface pressure falls to 1002 hPa as the storm approaches; humidity stays high near the coast.
In the north the air is dry and clear. In the south a warm and humid air mass brings thunderstorms and hail.
Snow is likely in the mountains above 1500 metres. The wind speed reaches 15 metres per second near the ridge.
January is cold, February is grey, March is windy, April is wet, May is warm, June is bright, July is hot,
August is humid, September is calm, October is cool, November is dark and December is freezing.
The mean temperature over the region is 288.5 K, the minimum 271.2 K and the maximum 301.9 K.
Total precipitable water is 23.4 kg m-2; the specific humidity is 0.008 kg kg-1 at two metres.
"""


def _corpus_lines() -> list[str]:
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    lines += [" ".join(str(n) for n in range(start, start + 25)) for start in range(0, 1000, 25)]
    lines += [f"{v / 10:.1f} K, {v} hPa, {v % 37} m s-1" for v in range(2500, 3100, 7)]
    return lines


def _train_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<pad>"
    )


def _tiny_config(arch: str, vocab: int, special: dict[str, Any]) -> PretrainedConfig:
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, **special,
        )  # fmt: skip
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=512, **special)
    if arch == "gpt_neo":
        return GPTNeoConfig(
            vocab_size=vocab, hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=512,
            attention_types=[[["global", "local"], 1]], window_size=256, **special,
        )  # fmt: skip
    raise ConfigError(f"unknown tiny architecture {arch!r}; choose llama, gpt2 or gpt_neo")


def make_tiny_model(arch: TinyArch, out_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write a tiny random causal LM (2 layers, hidden 64) with a small real BPE tokenizer, for tests.

    The tokenizer is a byte-level BPE (512 tokens, any UTF-8 text encodes) trained offline on built-in English
    weather text and numbers, with `<|endoftext|>` as bos/eos and `<pad>` as pad. Same arch and seed, same weights.

    Args:
        arch: "llama", "gpt2" or "gpt_neo".
        out_dir: the folder to write (atomically); kept as is when it already holds the same arch and seed.
        seed: weight initialisation seed (the global RNG is left untouched).

    Returns:
        `out_dir` as a Path, loadable with `FusionModel.from_base(out_dir, ...)`.

    Raises:
        ConfigError: unknown arch.
        ModelError: `out_dir` holds something else.
    """
    out = Path(out_dir).expanduser().resolve()
    spec = {"tiny": arch, "seed": seed}
    if is_complete(out):
        found = json.loads((out / BASE_MARKER).read_text(encoding="utf-8"))
        if found == spec:
            return out
        raise ModelError(f"{out} already holds another base ({found}); delete it or choose another folder")
    tokenizer = _train_tokenizer()
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = _tiny_config(arch, len(tokenizer), special)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with progress_bars(False), staging_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / BASE_MARKER).write_text(json.dumps(spec) + "\n", encoding="utf-8")
    logger.info("tiny %s model (seed %d) written to %s", arch, seed, out)
    return out
