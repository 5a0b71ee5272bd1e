"""`train(config)`: DeepSpeed ZeRO training of a FusionModel on streamed WebDataset shards.

One function wires the run: distributed set-up, dataset, model (frozen base + trainable fusion), DeepSpeed engine
with AdamW over the trainable parameters and a warm-up + cosine schedule, the step loop with gradient accumulation,
periodic evaluation and checkpoints, NaN guard, and the final adapter. It runs the same on one process, under
`fusion-train --nproc N`, and under `deepspeed`/`torchrun`.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import (
    export_adapter,
    find_latest_checkpoint,
    frozen_digest,
    load_checkpoint,
    save_checkpoint,
)
from .config import TrainConfig
from .data import ClimateTextStream, DataPosition, open_shards, render_prompt
from .errors import CheckpointError, ConfigError, DataError, TrainingError
from .evaluate import evaluate_loss
from .launch import clear_self_env, ensure_dist_env, stale_build_locks
from .metrics import (
    MetricsLog,
    RunClock,
    Throughput,
    device_peak_flops,
    flops_per_token,
    log_rank_zero,
    peak_memory_bytes,
    repair_jsonl_tail,
)
from .model_card import write_model_card
from .precision import Precision, resolve_precision
from .ranks import check_shared_run_dir, lost_ranks_error, raised_by_a_collective, set_collective_timeout
from .runs import PROMPT_FILE

__all__ = ["RunResult", "lr_lambda", "train"]

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a finished (or stopped) run produced."""

    run_dir: Path
    step: int
    final_loss: float | None
    val_loss: float | None
    adapter_dir: Path | None
    checkpoint: Path | None
    frozen_digest_start: str | None = None
    frozen_digest_end: str | None = None
    losses: list[float] = field(default_factory=list)
    skipped_samples: int = 0
    """Bad samples left out (`skip_bad_samples`), over every rank."""


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """Multiplier of the peak lr at scheduler step s: linear warm-up, then cosine to `min_lr_ratio` (or constant)."""

    def fn(s: int) -> float:
        if config.warmup_steps and s < config.warmup_steps:
            return (s + 1) / config.warmup_steps
        if config.schedule == "constant":
            return 1.0
        span = max(1, config.steps - config.warmup_steps)
        progress = min(1.0, (s - config.warmup_steps) / span)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    if not decay and not no_decay:
        raise ConfigError("the model has no trainable parameters: check the fusion settings")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _promote_scalar_params(model: torch.nn.Module) -> dict[str, torch.Size]:
    """View 0-dim parameters (tanh gates) as shape (1,): DeepSpeed's model broadcast views every parameter as bytes,
    which a 0-dim tensor cannot do. Returns the logical shapes of the trainable parameters, to write the adapter with.
    """
    shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    for param in model.parameters():
        if param.dim() == 0:
            param.data = param.data.view(1)
    return shapes


def _prepare_run_dir(config: TrainConfig, rank: int) -> Path:
    run_dir = Path(config.out)
    if "://" in config.out and not config.out.startswith("file://"):
        raise ConfigError(
            f"out: {config.out!r} must be a local folder (DeepSpeed checkpoints are written locally)"
        )
    run_dir = Path(config.out.removeprefix("file://"))
    if rank == 0:
        has_ckpt = find_latest_checkpoint(run_dir) is not None
        if has_ckpt and not config.resume:
            raise ConfigError(
                f"out: {run_dir} already holds checkpoints; pass --resume to continue it or choose a new --out"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / ".config.yaml.tmp"
        from climate_text_schema import redact_credentials

        tmp.write_text(redact_credentials(config.to_yaml()), encoding="utf-8")  # passwords in URLs never kept
        tmp.replace(run_dir / "config.yaml")
    return run_dir


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _load_model(
    config: TrainConfig, variables: list[str], normalization: dict[str, Any], dtype: torch.dtype, window: str
) -> Any:
    from .model import FusionModel

    return FusionModel.from_base(config.model, config.fusion_config(variables, normalization, window), dtype=dtype)


def _run_precision(config: TrainConfig) -> Precision:
    """Resolve `bf16` on this rank's device; every rank then takes fp32 if any rank chose it (one precision per job)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    choice = resolve_precision(config.bf16, device)
    (any_fp32,) = _all_reduce([0.0 if choice.bf16 else 1.0], device, op="max")
    if choice.bf16 and any_fp32:
        return Precision(False, f"{choice.reason}; another rank chose fp32, so every rank runs fp32")
    return choice


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    keys = ("input_ids", "attention_mask", "labels", "climate_x", "stats")
    return {k: batch[k].to(device) for k in keys if k in batch}


def _all_reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(
            t, op=torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM
        )
    return [float(x) for x in t.tolist()]


class _Run:
    """State of one run on one rank (the step loop lives in `train`)."""

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


def train(config: TrainConfig) -> RunResult:
    """Train the fusion part of a FusionModel with DeepSpeed; checkpoint, evaluate and export the adapter.

    Args:
        config: the resolved training config (see `TrainConfig`).

    Returns:
        The run's result (last step, losses, val loss, paths, frozen-base digests before and after).

    Raises:
        ConfigError: inconsistent batch layout, a micro-batch that does not fit the data, an existing run without
            `resume`, a resume with another `data_lanes` or `length_groups` than the checkpoint's.
        DataError: the dataset cannot be read (unknown reference, schema version, corrupt shard).
        ModelError: the base model cannot be loaded.
        CheckpointError: `resume` without a usable checkpoint.
        TrainingError: NaN/inf loss, or the frozen base changed.
    """
    import deepspeed

    env = ensure_dist_env()
    stale_build_locks()  # a killed earlier run can leave one, and init_distributed would then wait forever
    rank, world = env.rank, env.world
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(
            dist_backend="nccl" if torch.cuda.is_available() else "gloo",
            timeout=set_collective_timeout(config.dist_timeout_s),
        )
        if not env.launched:
            # one process without a launcher keeps its one-rank group for later runs (DeepSpeed caches its groups)
            # and ends it at exit
            atexit.register(_end_process_group)
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    # On failure, never wait on the other ranks: they may be blocked in a collective; the launcher stops them.
    try:
        result = _train(config, rank, world)
    except RuntimeError as exc:
        if world > 1 and raised_by_a_collective(exc):
            raise lost_ranks_error(exc, Path(config.out.removeprefix("file://")), rank, world) from exc
        raise
    finally:
        if not env.launched:
            clear_self_env()
    torch.distributed.barrier()
    if env.launched:
        _end_process_group()
    return result


def _end_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _train(config: TrainConfig, rank: int, world: int) -> RunResult:
    import deepspeed

    precision = _run_precision(config)
    log_rank_zero(logger, "precision: %s (%s)", precision.name, precision.reason)
    ds_config = config.deepspeed_config(world, bf16=precision.bf16)  # checks micro x accum x world once
    if world % config.nproc and world > 1:
        log_rank_zero(
            logger, "nproc=%d but the launcher started %d ranks; using %d", config.nproc, world, world
        )
    data = open_shards(config.shards)
    manifest = data.manifest
    run_dir = _prepare_run_dir(config, rank)
    torch.distributed.barrier()
    check_shared_run_dir(run_dir, rank, world)
    resume_from = find_latest_checkpoint(run_dir) if config.resume else None
    if config.resume and resume_from is None:
        raise CheckpointError(f"--resume: {run_dir} holds no complete checkpoint; start without --resume")
    run = _Run(config, run_dir, rank, world)
    run.dataset_version = data.version

    _seed_all(config.seed)
    norm = {v: s.model_dump() for v, s in manifest.normalization.items()}
    model = _load_model(config, manifest.variable_names, norm, precision.dtype, manifest.window)
    tokenizer = model.tokenizer
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    digest_start = frozen_digest(model) if config.verify_frozen else None
    log_rank_zero(logger, "model: %d trainable, %d frozen parameters; world %d; ZeRO %d", n_trainable, n_frozen, world,
                  config.zero)  # fmt: skip

    shapes = _promote_scalar_params(model)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=_param_groups(model, config.weight_decay),
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(config)),
    )
    device = engine.device
    step, position = (
        0,
        DataPosition(seed=config.seed, lanes=config.data_lanes, length_groups=config.length_groups),
    )
    if resume_from is not None:
        client = load_checkpoint(engine, resume_from, rank)
        if client.get("seed") != config.seed or client.get("dataset", data.version) != data.version:
            raise CheckpointError(
                f"{resume_from} was trained with seed {client.get('seed')} on dataset version "
                f"{client.get('dataset')}, this run has seed {config.seed} and version {data.version}: resume with "
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
        run.last_checkpoint = resume_from
        run.metrics.truncate_after(
            step
        )  # a killed run may have logged later steps (redone now) or a torn line
        if run.keys_file is not None:
            repair_jsonl_tail(run.keys_file)
    prompt = render_prompt(config.prompt_template, data, config.caption)
    if rank == 0:  # kept so the run can describe raw windows later (runs.load_run)
        tmp = run_dir / f".{PROMPT_FILE}.tmp"
        tmp.write_text(prompt, encoding="utf-8")
        tmp.replace(run_dir / PROMPT_FILE)
    stream = ClimateTextStream(
        data, "train", tokenizer, prompt=prompt, micro_batch=config.micro_batch, max_length=config.max_length,
        rank=rank, world=world, seed=config.seed, start=position, train=True,
        shuffle_buffer=config.shuffle_buffer, verify=config.verify_shards, caption=config.caption,
        skip_bad_samples=config.skip_bad_samples, lanes=config.data_lanes, stats=config.stats_loss_weight > 0,
        length_groups=config.length_groups, token_cache_dir=config.token_cache_dir,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=config.num_workers)
    batches: Iterator[dict[str, Any]] = iter(loader)
    peak = device_peak_flops(device)
    fpt = flops_per_token(n_trainable, n_frozen)
    last_step = min(config.steps, config.stop_at_step or config.steps)
    log_rank_zero(logger, "training steps %d..%d of %d (%d batches per epoch per rank)", step + 1, last_step,
                  config.steps, stream.batches_per_epoch)  # fmt: skip

    progress: Any = None
    if config.show_progress and rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=last_step, initial=step, desc="fusion-train", unit="step")
    digit_weights = None
    if config.number_loss_weight != 1.0:
        from .grounding import number_token_mask

        mask = torch.from_numpy(number_token_mask(tokenizer))
        digit_weights = (1.0 + (config.number_loss_weight - 1.0) * mask.float()).to(device)
        log_rank_zero(logger, "number tokens (%d in the vocabulary) weigh %.3g in the loss", int(mask.sum()),
                      config.number_loss_weight)  # fmt: skip
    throughput, losses, clock = Throughput(), [], RunClock(step, last_step)
    window_loss, window_stats, window_steps, val_loss = 0.0, 0.0, 0, None
    rank_skipped, skipped = 0, 0  # bad samples left out: by this rank's stream, over every rank
    engine.train()
    while step < last_step:
        step_loss, step_stats, step_tokens, step_samples, step_keys = 0.0, 0.0, 0, 0, []
        for _ in range(config.grad_accum):
            batch = next(batches)
            inputs = _to_device(batch, device)
            out = engine(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         climate=inputs["climate_x"], labels=inputs["labels"], token_weights=digit_weights,
                         logits="none")  # fmt: skip
            loss = out.loss
            caption_loss = loss.detach()
            if config.stats_loss_weight > 0:
                if "stats" not in inputs:
                    raise DataError(
                        f"stats_loss_weight={config.stats_loss_weight} needs every sample's .json stats, but a batch "
                        f"on rank {rank} has samples without a .json ({', '.join(batch['keys'])}); set "
                        "stats_loss_weight: 0"
                    )
                stats_loss = torch.nn.functional.huber_loss(
                    out.climate_stats.float(), inputs["stats"], delta=1.0
                )
                step_stats += float(stats_loss.detach()) / config.grad_accum
                loss = loss + config.stats_loss_weight * stats_loss
            (bad,) = _all_reduce([0.0 if torch.isfinite(loss.detach()).item() else 1.0], device, op="max")
            if bad:
                raise TrainingError(
                    f"loss is {loss.item()} at step {step + 1} (batch keys on rank {rank}: {', '.join(batch['keys'])}); "
                    f"last good checkpoint: {run.last_checkpoint or 'none'}; lower lr, check the data, or resume"
                )
            engine.backward(loss)
            engine.step()
            step_loss += float(caption_loss) / config.grad_accum
            step_tokens += int(batch["attention_mask"].sum())
            step_samples += len(batch["keys"])
            step_keys += batch["keys"]
            position = DataPosition.from_dict(batch["position"])
            rank_skipped = int(batch.get("skipped", 0))
        step += 1
        run.log_keys(step, step_keys)
        mean_loss, mean_stats, tokens, samples, total_skipped = _all_reduce(
            [step_loss, step_stats, step_tokens, step_samples, rank_skipped], device
        )
        skipped = int(total_skipped)
        mean_loss, mean_stats = mean_loss / world, mean_stats / world
        losses.append(mean_loss)
        throughput.add(int(samples), int(tokens))
        window_loss, window_stats, window_steps = (
            window_loss + mean_loss,
            window_stats + mean_stats,
            window_steps + 1,
        )
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{mean_loss:.4f}")
        if step % config.log_every == 0 or step == last_step:
            sps, tps = throughput.rate()
            lr = float(scheduler.get_last_lr()[0]) if scheduler is not None else config.lr
            mem = peak_memory_bytes(device)
            record: dict[str, Any] = {
                "step": step, "loss": window_loss / window_steps, "lr": lr, "samples_per_s": sps, "tokens_per_s": tps,
                "peak_memory_mb": mem / 2**20, "mfu": (tps * fpt / (peak * world)) if peak else None,
                "epoch": position.epoch, "time": time.time(),
            }  # fmt: skip
            if config.skip_bad_samples:
                record["skipped_samples"] = skipped
            if config.stats_loss_weight > 0:
                record["stats_loss"] = window_stats / window_steps
            record["eta_s"], record["precision"] = clock.eta(step), precision.name
            run.metrics.write(record)
            log_rank_zero(logger, "step %d/%d loss %.4f lr %.3g %.1f tok/s mem %.0f MiB", step, config.steps,
                          record["loss"], lr, tps, record["peak_memory_mb"])  # fmt: skip
            if clock.first_report(step):
                log_rank_zero(logger, "%.2f s/step (%s): about %s to step %d", clock.seconds_per_step(step),
                              precision.name, _minutes(record["eta_s"]), last_step)  # fmt: skip
            window_loss, window_stats, window_steps = 0.0, 0.0, 0
        if config.eval_every and step % config.eval_every == 0 and step != last_step:
            val_loss = _evaluate(engine, data, tokenizer, prompt, config, rank, world, step, run)
        if config.save_every and step % config.save_every == 0 and step != last_step:
            run.last_checkpoint = _save(engine, run, step, position)
    if progress is not None:
        progress.close()

    if resume_from is None or step > int(resume_from.name.removeprefix("step")):
        run.last_checkpoint = _save(engine, run, step, position)
    if data.shards("val"):
        val_loss = _evaluate(engine, data, tokenizer, prompt, config, rank, world, step, run)
    digest_end = frozen_digest(engine.module) if config.verify_frozen else None
    if digest_end != digest_start:
        raise TrainingError(
            f"the frozen base changed during training (digest {digest_start} -> {digest_end})"
        )
    adapter = export_adapter(engine.module, run_dir, rank, shapes) if step >= config.steps else None
    run.metrics.close()
    if adapter is not None and rank == 0:
        write_model_card(adapter, run_dir, data.manifest, config.shards)
    log_rank_zero(logger, "done at step %d; checkpoint %s; adapter %s", step, run.last_checkpoint, adapter)
    if skipped:
        log_rank_zero(logger, "%d bad sample(s) were left out (skip_bad_samples); each is named in the log above",
                      skipped, level=logging.WARNING)  # fmt: skip
    return RunResult(run_dir=run_dir, step=step, final_loss=losses[-1] if losses else None, val_loss=val_loss,
                     adapter_dir=adapter, checkpoint=run.last_checkpoint, frozen_digest_start=digest_start,
                     frozen_digest_end=digest_end, losses=losses, skipped_samples=skipped)  # fmt: skip


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "unknown time"
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _save(engine: Any, run: _Run, step: int, position: DataPosition) -> Path:
    client = {
        "step": step,
        "position": position.to_dict(),
        "seed": run.config.seed,
        "world": run.world,
        "dataset": run.dataset_version,
    }
    return save_checkpoint(engine, run.run_dir, step, client, run.rank)


def _evaluate(
    engine: Any,
    data: Any,
    tokenizer: Any,
    prompt: str,
    config: TrainConfig,
    rank: int,
    world: int,
    step: int,
    run: _Run,
) -> float | None:
    stream = ClimateTextStream(
        data, "val", tokenizer, prompt=prompt, micro_batch=config.micro_batch, max_length=config.max_length,
        rank=rank, world=world, seed=config.seed, train=False, verify=config.verify_shards, caption=config.caption,
        skip_bad_samples=config.skip_bad_samples,
    )  # fmt: skip
    if stream.per_rank == 0:
        return None
    engine.eval()
    try:
        result = evaluate_loss(engine, stream, engine.device, max_batches=config.eval_batches, all_ranks=True)
    finally:
        engine.train()
    run.metrics.write({"step": step, "split": "val", "val_loss": result.loss, "val_perplexity": result.perplexity,
                       "val_tokens": result.tokens})  # fmt: skip
    log_rank_zero(logger, "step %d val loss %.4f (ppl %.2f)", step, result.loss, result.perplexity)
    return result.loss
