"""Command lines: `fusion-train`, `fusion-eval`, `fusion-generate` (and the entry points of `fusion-base`/`fusion-model`).

Each command parses its flags into a config or arguments, then calls one library function. Every error exits
non-zero with one clear message. `python -m fusion_trainer.cli train|eval|generate ...` runs the same commands (the
DeepSpeed launcher starts the ranks of `fusion-train --nproc N` that way).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .cli_support import one_line_errors, setup_logging

__all__ = ["base_main", "eval_main", "generate_main", "model_main", "train_main"]

train_app = typer.Typer(
    add_completion=False, pretty_exceptions_enable=False, help="Train a climate fusion adapter."
)


@train_app.command()
def train_command(
    shards: Annotated[
        str | None, typer.Option(help="dataset REF: version folder, manifest URL or ROOT/NAME@TAG")
    ] = None,
    model: Annotated[str | None, typer.Option(help="base model folder (save_pretrained) or hub id")] = None,
    out: Annotated[str | None, typer.Option(help="RUN_DIR (local folder)")] = None,
    fusion: Annotated[str | None, typer.Option(help="add | xattn | prefix | gated-xattn")] = None,
    zero: Annotated[int | None, typer.Option(help="ZeRO stage 0-3")] = None,
    steps: Annotated[int | None, typer.Option(help="optimizer steps")] = None,
    micro_batch: Annotated[int | None, typer.Option(help="samples per rank per forward")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="micro-batches per optimizer step")] = None,
    lr: Annotated[float | None, typer.Option(help="peak learning rate")] = None,
    nproc: Annotated[int | None, typer.Option(help="local ranks (DeepSpeed launcher)")] = None,
    nnodes: Annotated[
        int, typer.Option(help="nodes of the job: run this command on each with its --node-rank (no ssh)")
    ] = 1,
    node_rank: Annotated[int | None, typer.Option(help="this node's rank, 0..nnodes-1")] = None,
    master_addr: Annotated[
        str | None, typer.Option(help="address of node 0, reachable from every node")
    ] = None,
    master_port: Annotated[
        int | None, typer.Option(help="rendezvous port on node 0 (default 29500 for several nodes)")
    ] = None,
    hostfile: Annotated[
        str | None,
        typer.Option(
            help="DeepSpeed hostfile (HOST slots=K): without --node-rank the launcher starts every node (pdsh)"
        ),
    ] = None,
    bf16: Annotated[
        bool | None,
        typer.Option(
            "--bf16/--no-bf16",
            help="bf16 mixed precision (default: the config's bf16, auto: bf16 where the hardware runs it fast, else fp32)",
        ),
    ] = None,
    eval_every: Annotated[int | None, typer.Option(help="evaluate val every N steps")] = None,
    save_every: Annotated[int | None, typer.Option(help="checkpoint every N steps")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue from the newest checkpoint in RUN_DIR")
    ] = False,
    seed: Annotated[int | None, typer.Option(help="seed")] = None,
    deepspeed: Annotated[
        str | None, typer.Option(help="ds_config.json overriding the generated config")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="training YAML (pipelines/train-*.yaml)")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a key: a.b=v (repeatable)")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the resolved config and sizes, train nothing")
    ] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="progress bar on rank 0")] = True,
    skip_bad_samples: Annotated[
        bool,
        typer.Option(
            "--skip-bad-samples",
            help="leave out (log and count) samples that break the contract instead of stopping",
        ),
    ] = False,
    log_level: Annotated[str, typer.Option(help="logging level")] = "INFO",
) -> None:
    """Train the fusion part of a frozen LM on a climate-text dataset with DeepSpeed ZeRO."""
    setup_logging(log_level)
    from .config import TrainConfig
    from .training.launch import NodeLayout, under_launcher

    overrides = list(set_ or []) + ([f"fusion.fusion={fusion}"] if fusion else [])
    flags: dict[str, Any] = dict(
        shards=shards, model=model, out=out, zero=zero, steps=steps, micro_batch=micro_batch, grad_accum=grad_accum,
        lr=lr, nproc=nproc, bf16=bf16, eval_every=eval_every, save_every=save_every, seed=seed, deepspeed=deepspeed,
        resume=True if resume else None, show_progress=progress and sys.stderr.isatty() or None,
        skip_bad_samples=True if skip_bad_samples else None,
    )  # fmt: skip
    layout = NodeLayout(nnodes=nnodes, node_rank=node_rank, master_addr=master_addr, master_port=master_port,
                        hostfile=hostfile)  # fmt: skip
    with one_line_errors():
        layout.check()
        cfg = TrainConfig.from_yaml(config, overrides, **flags)
        if dry_run:
            typer.echo(_dry_run(cfg, layout.nnodes))
            return
        # explicit node flags make this process a node's launcher even where an outer layout (a PyTorchJob's
        # RANK/WORLD_SIZE of pods) is in the environment
        if layout.multi_node or (cfg.nproc > 1 and not under_launcher()):
            raise typer.Exit(_launch(cfg, layout, log_level))
        from .training.train import train

        result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(
            json.dumps(
                {
                    "run": str(result.run_dir),
                    "step": result.step,
                    "loss": result.final_loss,
                    "val_loss": result.val_loss,
                    "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                    "adapter": str(result.adapter_dir) if result.adapter_dir else None,
                    "frozen_base_unchanged": result.frozen_digest_start == result.frozen_digest_end,
                    "skipped_samples": result.skipped_samples,
                }
            )
        )


def _launch(cfg: Any, layout: Any, log_level: str) -> int:
    """Start this node's ranks (`launch_local`) on the resolved config; return the launcher's exit code."""
    from .runs import local_run_dir
    from .training.launch import launch_local

    run_dir = local_run_dir(cfg.out)  # before anything is written: file:// stripped, s3:// refused
    run_dir.mkdir(parents=True, exist_ok=True)
    # one file per node: with a RUN_DIR shared between nodes, two launchers must not write the same file
    name = f".launch-config-node{layout.node_rank}.yaml" if layout.no_ssh else ".launch-config.yaml"
    launch_cfg = run_dir / name
    tmp = run_dir / f"{name}.tmp"
    tmp.write_text(cfg.to_yaml(), encoding="utf-8")  # the ranks need the URLs as given, credentials included
    tmp.replace(launch_cfg)
    try:
        code = launch_local(
            cfg.nproc, ["train", "--config", str(launch_cfg), "--log-level", log_level], layout=layout
        )
    finally:
        launch_cfg.unlink(missing_ok=True)  # RUN_DIR keeps only config.yaml, whose URLs carry no password
    if code != 0:
        what = (
            f"the {cfg.nproc} rank(s) of node {layout.node_rank} (of {layout.nnodes})"
            if layout.no_ssh
            else (f"{cfg.nproc} ranks")
        )
        typer.echo(f"error: {what} failed (exit {code}); see the rank errors above", err=True)
    return code


def _dry_run(cfg: Any, nnodes: int = 1) -> str:
    """The resolved config, the trainable parameter count and the per-rank memory, without loading weights."""
    from transformers import AutoConfig

    from .data.stream import open_shards
    from .errors import ModelError
    from .model.fusion_model import FusionModel

    data = open_shards(cfg.shards)
    manifest = data.manifest
    norm = {v: s.model_dump() for v, s in manifest.normalization.items()}
    fusion = cfg.fusion_config(manifest.variable_names, norm, manifest.window)
    try:
        hf_config = AutoConfig.from_pretrained(cfg.model)
    except (OSError, ValueError) as exc:
        raise ModelError(f"--model {cfg.model}: cannot read its config ({exc})") from exc
    from .precision import resolve_precision

    model = FusionModel.from_config(
        hf_config, fusion, dtype=resolve_precision(cfg.bf16).dtype
    )  # meta device: shapes only
    counts = model.num_parameters()
    world = max(cfg.nproc, 1) * nnodes
    estimate = model.memory_estimate(world_size=world, zero_stage=cfg.zero)
    return "\n".join(
        [
            cfg.to_yaml().rstrip(),
            "---",
            f"dataset: {data.version_url} ({manifest.splits})",
            f"trainable parameters: {counts['trainable']:,}; frozen: {counts['frozen']:,}",
            f"global batch: {cfg.check_batch(world)}",
            f"memory estimate per rank ({world} rank(s), ZeRO {cfg.zero}; activations excluded): "
            f"{estimate.total_bytes / 2**30:.3f} GiB {json.dumps(estimate.as_dict())}",
        ]
    )


def _train_command() -> Any:
    """`fusion-train` as a click command whose `--help` shows the TrainConfig default of every flag left unset.

    The flags default to None so that a `--config` YAML is not overridden; their effective defaults come from
    `TrainConfig` (and `FusionConfig` for `--fusion`), read here so that `--help` cannot drift from them.
    """
    from .config import FusionConfig, TrainConfig

    command = typer.main.get_command(train_app)
    for param in command.params:
        if not hasattr(param, "show_default") or param.default is not None or param.name is None:
            continue  # arguments have no show_default; typer's options are its own (vendored click) classes
        owner = FusionConfig if param.name == "fusion" else TrainConfig
        field = owner.model_fields.get(param.name)
        if field is None or field.is_required():
            continue
        default = field.get_default(call_default_factory=True)
        if default is None:
            continue
        if isinstance(default, bool) and getattr(param, "secondary_opts", None):
            default = (param.opts if default else param.secondary_opts)[0]
        param.show_default = str(default)
    return command


def train_main() -> None:
    """Entry point of `fusion-train`."""
    _train_command()()


def eval_main() -> None:
    """Entry point of `fusion-eval` (cli_eval.py)."""
    import importlib

    importlib.import_module("fusion_trainer.cli_eval").eval_app()


def generate_main() -> None:
    """Entry point of `fusion-generate` (cli_eval.py)."""
    import importlib

    importlib.import_module("fusion_trainer.cli_eval").generate_app()


def base_main() -> None:
    """Entry point of `fusion-base` (the model engineer's CLI in cli_model.py)."""
    import importlib

    importlib.import_module("fusion_trainer.cli_model").base_main()


def model_main() -> None:
    """Entry point of `fusion-model` (the model engineer's CLI in cli_model.py)."""
    import importlib

    importlib.import_module("fusion_trainer.cli_model").model_main()


_COMMANDS = ("train", "eval", "generate")

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in _COMMANDS:
        sys.exit(f"usage: python -m fusion_trainer.cli {{{'|'.join(_COMMANDS)}}} [OPTIONS]")
    if sys.argv[1] == "train":
        _train_command()(args=sys.argv[2:], prog_name="fusion-train")
    else:
        import importlib

        app = getattr(importlib.import_module("fusion_trainer.cli_eval"), f"{sys.argv[1]}_app")
        app(args=sys.argv[2:], prog_name=f"fusion-{sys.argv[1]}")
