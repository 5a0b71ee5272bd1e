"""`train(config)`: DeepSpeed ZeRO training of a FusionModel on streamed WebDataset shards.

One function wires the run: distributed set-up, dataset, model (frozen base + trainable fusion), DeepSpeed engine
with AdamW over the trainable parameters and a warm-up + cosine schedule, the step loop with gradient accumulation,
periodic evaluation and checkpoints, NaN guard, and the final adapter. It runs the same on one process, under
`fusion-train --nproc N`, and under `deepspeed`/`torchrun`. The loop's steps (resume, one micro-batch, one metrics
record, a checkpoint) are named functions in `train_steps`.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusion_trainer.config import TrainConfig
from fusion_trainer.data.prompt import render_prompt
from fusion_trainer.data.stream import ClimateTextStream, DataPosition, as_built, open_shards
from fusion_trainer.errors import CheckpointError, ConfigError, TrainingError
from fusion_trainer.evaluation.evaluate import evaluate_loss
from fusion_trainer.evaluation.model_card import write_model_card
from fusion_trainer.metrics import RunClock, Throughput, device_peak_flops, flops_per_token, log_rank_zero
from fusion_trainer.precision import Precision, resolve_precision

from .checkpoint import (
    export_adapter,
    find_latest_checkpoint,
    frozen_digest,
)
from .launch import clear_self_env, ensure_dist_env, remove_shm_buffers, stale_build_locks
from .ranks import check_shared_run_dir, lost_ranks_error, raised_by_a_collective, set_collective_timeout
from .steps import (
    RunState,
    all_reduce,
    metrics_record,
    micro_step,
    number_weights,
    prepare_run_dir,
    resume_state,
    save_state,
    write_config,
    write_prompt,
)

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


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _load_model(
    config: TrainConfig, variables: list[str], normalization: dict[str, Any], dtype: torch.dtype, window: str
) -> Any:
    from fusion_trainer.model.fusion_model import FusionModel

    return FusionModel.from_base(config.model, config.fusion_config(variables, normalization, window), dtype=dtype)


def _run_precision(config: TrainConfig) -> Precision:
    """Resolve `bf16` on this rank's device; every rank then takes fp32 if any rank chose it (one precision per job)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    choice = resolve_precision(config.bf16, device)
    (any_fp32,) = all_reduce([0.0 if choice.bf16 else 1.0], device, op="max")
    if choice.bf16 and any_fp32:
        return Precision(False, f"{choice.reason}; another rank chose fp32, so every rank runs fp32")
    return choice


def train(config: TrainConfig) -> RunResult:
    """Train the fusion part of a FusionModel with DeepSpeed; checkpoint, evaluate and export the adapter.

    Args:
        config: the resolved training config (see `TrainConfig`).

    Returns:
        The run's result (last step, losses, val loss, paths, frozen-base digests before and after).

    Raises:
        ConfigError: inconsistent batch layout, a micro-batch that does not fit the data, an existing run without
            `resume`, a resume with another `data_lanes`, `length_groups`, `micro_batch` or `grad_accum` than the
            checkpoint's (the run's config.yaml is left as it was).
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
    # DeepSpeed's CPU backend leaves a shared-memory buffer per rank; every rank is past the barrier, so none is in use
    remove_shm_buffers(os.environ.get("MASTER_ADDR", ""), int(os.environ.get("MASTER_PORT") or 0))


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
    run_dir = prepare_run_dir(config, rank)
    torch.distributed.barrier()
    check_shared_run_dir(run_dir, rank, world)
    resume_from = find_latest_checkpoint(run_dir) if config.resume else None
    if config.resume and resume_from is None:
        raise CheckpointError(
            f"--resume: {run_dir} holds no complete checkpoint (a run interrupted during its first save leaves "
            "checkpoints/ without one, with nothing to resume); start without --resume"
        )
    run = RunState(config, run_dir, rank, world)
    run.dataset_version = data.version

    _seed_all(config.seed)
    norm = {v: s.model_dump() for v, s in manifest.normalization.items()}
    model = _load_model(config, manifest.variable_names, norm, precision.dtype, manifest.window)
    tokenizer = model.tokenizer
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    digest_start = frozen_digest(model) if config.verify_frozen else None
    if config.compile_base:
        from fusion_trainer.model.fusion import compile_base_layers

        compiled = compile_base_layers(model.arch.decoder_layers(model.lm))
        log_rank_zero(logger, "compile_base: %d decoder layers of the base compiled", compiled)
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
        step, position = resume_state(engine, resume_from, config, data.version, run, rank)
        if rank == 0:
            write_config(config, run_dir)
    prompt = render_prompt(config.prompt_template, data, config.caption)
    if rank == 0:  # kept so the run can describe raw windows later (runs.load_run)
        write_prompt(run_dir, prompt)
    stream = ClimateTextStream(
        data, "train", tokenizer, prompt=prompt, micro_batch=config.micro_batch, max_length=config.max_length,
        rank=rank, world=world, seed=config.seed, start=position, train=True,
        shuffle_buffer=config.shuffle_buffer, verify=config.verify_shards, caption=config.caption,
        skip_bad_samples=config.skip_bad_samples, lanes=config.data_lanes, stats=config.stats_loss_weight > 0,
        length_groups=config.length_groups, token_cache_dir=config.token_cache_dir, rehash=config.rehash_shards,
    )  # fmt: skip
    # its own generator: iter() draws a base seed, which from the global one shifted a resumed run's random numbers
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=config.num_workers, collate_fn=as_built,
                                         generator=torch.Generator().manual_seed(config.seed))  # fmt: skip
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
    digit_weights = number_weights(config, tokenizer, device)
    throughput, losses, clock = Throughput(), [], RunClock(step, last_step)
    window_loss, window_stats, window_steps, val_loss = 0.0, 0.0, 0, None
    rank_skipped, skipped = 0, 0  # bad samples left out: by this rank's stream, over every rank
    engine.train()
    while step < last_step:
        step_loss, step_stats, step_tokens, step_samples, step_keys = 0.0, 0.0, 0, 0, []
        for _ in range(config.grad_accum):
            batch = next(batches)
            caption_loss, stats_loss = micro_step(engine, batch, config, digit_weights, rank, step, run)
            step_stats += stats_loss / config.grad_accum
            step_loss += float(caption_loss) / config.grad_accum
            step_tokens += int(batch["attention_mask"].sum())
            step_samples += len(batch["keys"])
            step_keys += batch["keys"]
            position = DataPosition.from_dict(batch["position"])
            rank_skipped = int(batch.get("skipped", 0))
        step += 1
        run.log_keys(step, step_keys)
        mean_loss, mean_stats, tokens, samples, total_skipped = all_reduce(
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
            lr = float(scheduler.get_last_lr()[0]) if scheduler is not None else config.lr
            record = metrics_record(config, step, window_loss / window_steps, window_stats / window_steps, lr,
                                    throughput, device, fpt, peak, world, position.epoch, skipped)  # fmt: skip
            record["eta_s"], record["precision"] = clock.eta(step), precision.name
            run.metrics.write(record)
            log_rank_zero(logger, "step %d/%d loss %.4f lr %.3g %.1f tok/s mem %.0f MiB", step, config.steps,
                          record["loss"], lr, record["tokens_per_s"], record["peak_memory_mb"])  # fmt: skip
            if clock.first_report(step):
                log_rank_zero(logger, "%.2f s/step (%s): about %s to step %d", clock.seconds_per_step(step),
                              precision.name, _minutes(record["eta_s"]), last_step)  # fmt: skip
            window_loss, window_stats, window_steps = 0.0, 0.0, 0
        if config.eval_every and step % config.eval_every == 0 and step != last_step:
            val_loss = _evaluate(engine, data, tokenizer, prompt, config, rank, world, step, run)
        if config.save_every and step % config.save_every == 0 and step != last_step:
            run.last_checkpoint = save_state(engine, run, step, position)
    if progress is not None:
        progress.close()

    if resume_from is None or step > int(resume_from.name.removeprefix("step")):
        run.last_checkpoint = save_state(engine, run, step, position)
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


def _evaluate(
    engine: Any,
    data: Any,
    tokenizer: Any,
    prompt: str,
    config: TrainConfig,
    rank: int,
    world: int,
    step: int,
    run: RunState,
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
