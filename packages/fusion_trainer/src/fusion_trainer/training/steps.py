"""The named steps of the training loop (`train._train` calls them in order): the run folder and its config, the run's
state on one rank, resuming from a checkpoint, the number-token weights, one micro-batch's forward and backward, and
one metrics record.

Each step is a few dozen lines and says what it checks; none of them owns the loop.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from fusion_trainer.config import TrainConfig
from fusion_trainer.data.stream import DataPosition
from fusion_trainer.errors import CheckpointError, ConfigError, DataError, TrainingError
from fusion_trainer.metrics import MetricsLog, Throughput, log_rank_zero, peak_memory_bytes, repair_jsonl_tail
from fusion_trainer.runs import PROMPT_FILE, local_run_dir

from .checkpoint import find_latest_checkpoint, load_checkpoint, save_checkpoint

__all__ = ["RunState", "all_reduce", "metrics_record", "micro_step", "number_weights", "prepare_run_dir", "resume_state",
           "save_state", "to_device", "write_config", "write_prompt"]  # fmt: skip

logger = logging.getLogger("fusion_trainer.training.train")  # the training log's lines, as before the split


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors of a collated batch that the model reads, on `device`."""
    keys = ("input_ids", "attention_mask", "labels", "climate_x", "stats")
    return {k: batch[k].to(device) for k in keys if k in batch}


def all_reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    """Sum (or max) floats over the ranks; the values themselves on a single process."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(
            t, op=torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM
        )
    return [float(x) for x in t.tolist()]


class RunState:
    """State of one run on one rank: its metrics log, the sample keys it logs, its last checkpoint."""

    def __init__(self, config: TrainConfig, run_dir: Path, rank: int, world: int) -> None:
        self.config, self.run_dir, self.rank, self.world = config, run_dir, rank, world
        self.metrics = MetricsLog(run_dir, enabled=rank == 0, tensorboard=config.tensorboard)
        self.keys_file = run_dir / "samples" / f"rank{rank}.jsonl" if config.log_keys else None
        self.last_checkpoint: Path | None = None
        self.dataset_version = ""

    def log_keys(self, step: int, keys: list[str]) -> None:
        if self.keys_file is None:
            return
        self.keys_file.parent.mkdir(parents=True, exist_ok=True)
        with self.keys_file.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, "keys": keys}) + "\n")


def resume_state(engine: Any, resume_from: Path, config: TrainConfig, dataset_version: str, run: RunState,
                 rank: int) -> tuple[int, DataPosition]:  # fmt: skip
    """Load a checkpoint into `engine` and return its (step, data position), after checking that it was trained with
    this run's seed, dataset version, sample order (`data_lanes`, `length_groups`, `shuffle_buffer`,
    `skip_bad_samples`) and batch (`micro_batch`, `grad_accum`; the last four not checked in checkpoints written before
    they were recorded).

    Raises:
        CheckpointError: another seed or dataset version.
        ConfigError: another `data_lanes`, `length_groups`, `shuffle_buffer`, `skip_bad_samples`, `micro_batch` or
            `grad_accum` (the sample order and what a step is depend on them).
    """
    client = load_checkpoint(engine, resume_from, rank)
    if client.get("seed") != config.seed or client.get("dataset", dataset_version) != dataset_version:
        raise CheckpointError(
            f"{resume_from} was trained with seed {client.get('seed')} on dataset version "
            f"{client.get('dataset')}, this run has seed {config.seed} and version {dataset_version}: resume with "
            "the same --seed and --shards, or start a new --out"
        )
    step, position = int(client["step"]), DataPosition.from_dict(client["position"])
    if position.lanes != config.data_lanes:
        raise ConfigError(
            f"{resume_from} was trained with data_lanes {position.lanes}, this run has data_lanes "
            f"{config.data_lanes}; the sample order depends on it: resume with --set data_lanes={position.lanes}, "
            "or start a new --out"
        )
    if position.length_groups != config.length_groups:
        raise ConfigError(
            f"{resume_from} was trained with length_groups {position.length_groups}, this run has length_groups "
            f"{config.length_groups}; the sample order depends on it: resume with --set "
            f"length_groups={position.length_groups}, or start a new --out"
        )
    saved = (client.get("micro_batch", config.micro_batch), client.get("grad_accum", config.grad_accum))
    if saved != (config.micro_batch, config.grad_accum):
        raise ConfigError(
            f"{resume_from} was trained with micro_batch {saved[0]} x grad_accum {saved[1]}, this run has "
            f"micro_batch {config.micro_batch} x grad_accum {config.grad_accum}; a step's samples and the learning "
            f"rate schedule depend on them: resume with --micro-batch {saved[0]} --grad-accum {saved[1]}, "
            "or start a new --out"
        )
    _check_sample_order(client, config, resume_from)
    run.last_checkpoint = resume_from
    run.metrics.truncate_after(step)  # a killed run may have logged later steps (redone now) or a torn line
    if run.keys_file is not None:
        repair_jsonl_tail(run.keys_file)
    return step, position


def save_state(engine: Any, run: RunState, step: int, position: DataPosition) -> Path:
    """A checkpoint at `step` with what `resume_state` checks: the data position, seed, world, dataset version, batch,
    shuffle buffer and bad-sample skipping."""
    client = {"step": step, "position": position.to_dict(), "seed": run.config.seed, "world": run.world,
              "dataset": run.dataset_version, "micro_batch": run.config.micro_batch,
              "grad_accum": run.config.grad_accum, "shuffle_buffer": run.config.shuffle_buffer,
              "skip_bad_samples": run.config.skip_bad_samples}  # fmt: skip
    return save_checkpoint(engine, run.run_dir, step, client, run.rank)


def _check_sample_order(client: dict[str, Any], config: TrainConfig, resume_from: Path) -> None:
    """Refuse another `shuffle_buffer` or `skip_bad_samples` than the checkpoint's: an epoch's order depends on both,
    and the resumed epoch's replay would skip another set of samples than the one consumed (not checked in
    checkpoints written before they were recorded)."""
    buffer = client.get("shuffle_buffer", config.shuffle_buffer)
    if buffer != config.shuffle_buffer:
        raise ConfigError(
            f"{resume_from} was trained with shuffle_buffer {buffer}, this run has shuffle_buffer "
            f"{config.shuffle_buffer}; the sample order depends on it: resume with --set shuffle_buffer={buffer}, "
            "or start a new --out"
        )
    skip = client.get("skip_bad_samples", config.skip_bad_samples)
    if skip != config.skip_bad_samples:
        flag = "--skip-bad-samples" if skip else "--set skip_bad_samples=false"
        raise ConfigError(
            f"{resume_from} was trained with skip_bad_samples {str(skip).lower()}, this run has skip_bad_samples "
            f"{str(config.skip_bad_samples).lower()}; the sample order depends on it (bad samples are left out "
            f"before the epoch is cut): resume with {flag}, or start a new --out"
        )


def prepare_run_dir(config: TrainConfig, rank: int) -> Path:
    """The run folder (local), created on rank 0; a folder with checkpoints needs `resume`. A new run's `config.yaml`
    is written here; a resumed run's after `resume_state` accepts the checkpoint (`write_config`).

    Raises:
        ConfigError: `out` is not a local folder, or it holds checkpoints and `resume` is not set.
    """
    run_dir = local_run_dir(config.out)
    if rank == 0:
        has_ckpt = find_latest_checkpoint(run_dir) is not None
        if has_ckpt and not config.resume:
            raise ConfigError(
                f"out: {run_dir} already holds checkpoints; pass --resume to continue it or choose a new --out"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        if not config.resume:  # a resume writes it once its checks pass: a refused one leaves the run's as it was
            write_config(config, run_dir)
    return run_dir


def write_config(config: TrainConfig, run_dir: Path) -> None:
    """The run's `config.yaml` (what `load_run` reads), written atomically, passwords in URLs never kept."""
    from climate_text_schema import redact_credentials

    tmp = run_dir / ".config.yaml.tmp"
    tmp.write_text(redact_credentials(config.to_yaml()), encoding="utf-8")
    tmp.replace(run_dir / "config.yaml")


def write_prompt(run_dir: Path, prompt: str) -> None:
    """Keep the rendered prompt in the run folder (atomically), so the run can describe raw windows later."""
    tmp = run_dir / f".{PROMPT_FILE}.tmp"
    tmp.write_text(prompt, encoding="utf-8")
    tmp.replace(run_dir / PROMPT_FILE)


def number_weights(config: TrainConfig, tokenizer: Any, device: torch.device) -> torch.Tensor | None:
    """Per-token-id loss weights `(vocab,)`: `number_loss_weight` for number tokens, 1 for the rest; None when 1."""
    if config.number_loss_weight == 1.0:
        return None
    from fusion_trainer.grounding import number_token_mask

    mask = torch.from_numpy(number_token_mask(tokenizer))
    log_rank_zero(logger, "number tokens (%d in the vocabulary) weigh %.3g in the loss", int(mask.sum()),
                  config.number_loss_weight)  # fmt: skip
    return (1.0 + (config.number_loss_weight - 1.0) * mask.float()).to(device)


def micro_step(engine: Any, batch: dict[str, Any], config: TrainConfig, weights: torch.Tensor | None, rank: int,
               step: int, run: RunState) -> tuple[float, float]:  # fmt: skip
    """Forward and backward of one micro-batch (the caption loss, plus the stats head's Huber loss when it trains);
    returns (caption loss, stats loss).

    Raises:
        DataError: the stats loss trains but a sample has no `.json` stats.
        TrainingError: the loss is not finite on any rank (every rank raises, naming the batch and the last good
            checkpoint).
    """
    inputs = to_device(batch, engine.device)
    out = engine(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], climate=inputs["climate_x"],
                 labels=inputs["labels"], token_weights=weights, logits="none",
                 readout_stats=inputs.get("stats") if config.readout_truth else None)  # fmt: skip
    loss = out.loss
    caption_loss, stats_value = float(loss.detach()), 0.0
    if config.stats_loss_weight > 0:
        if "stats" not in inputs:
            raise DataError(
                f"stats_loss_weight={config.stats_loss_weight} needs every sample's .json stats, but a batch "
                f"on rank {rank} has samples without a .json ({', '.join(batch['keys'])}); set "
                "stats_loss_weight: 0"
            )
        stats_loss = torch.nn.functional.huber_loss(out.climate_stats.float(), inputs["stats"], delta=1.0)
        stats_value = float(stats_loss.detach())
        loss = loss + config.stats_loss_weight * stats_loss
    (bad,) = all_reduce([0.0 if torch.isfinite(loss.detach()).item() else 1.0], engine.device, op="max")
    if bad:
        raise TrainingError(
            f"loss is {loss.item()} at step {step + 1} (batch keys on rank {rank}: {', '.join(batch['keys'])}); "
            f"last good checkpoint: {run.last_checkpoint or 'none'}; lower lr, check the data, or resume"
        )
    engine.backward(loss)
    engine.step()
    return caption_loss, stats_value


def metrics_record(config: TrainConfig, step: int, loss: float, stats_loss: float, lr: float, throughput: Throughput,
                   device: torch.device, flops_per_token: float, peak_flops: float | None, world: int, epoch: int,
                   skipped: int) -> dict[str, Any]:  # fmt: skip
    """One line of metrics.jsonl: the window's mean losses, the learning rate, throughput, peak memory, MFU."""
    sps, tps = throughput.rate()
    record: dict[str, Any] = {
        "step": step, "loss": loss, "lr": lr, "samples_per_s": sps, "tokens_per_s": tps,
        "peak_memory_mb": peak_memory_bytes(device) / 2**20,
        "mfu": (tps * flops_per_token / (peak_flops * world)) if peak_flops else None, "epoch": epoch,
        "time": time.time(),
    }  # fmt: skip
    if config.skip_bad_samples:
        record["skipped_samples"] = skipped
    if config.stats_loss_weight > 0:
        record["stats_loss"] = stats_loss
    return record
