"""TrainConfig: one training run (`fusion-train`), with field docstrings; validation messages name the key.

The model's own config lives in `fusion_config` (`FusionSettings`, the architecture a run chooses, is
`TrainConfig.fusion`; `FusionConfig` adds the dataset's metadata) and is re-exported here with `FusionKind` and
`FUSION_KINDS`, so `from fusion_trainer.config import FusionConfig, TrainConfig` keeps working.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .fusion_config import FUSION_KINDS, FusionConfig, FusionKind, FusionSettings

__all__ = [
    "DEFAULT_PROMPT_TEMPLATE", "FUSION_KINDS", "PROMPT_FIELDS", "FusionConfig", "FusionKind", "FusionSettings",
    "TrainConfig", "prompt_fields_hint",
]  # fmt: skip

DEFAULT_PROMPT_TEMPLATE = "Example: {example}\nDescribe this climate window ({variables}):\n"
"""`{example}`: a one-shot caption whose numbers are the train means; `{variables}`: the variable names."""
PROMPT_FIELDS = (
    "example", "variables", "caption_example", "readout_example", "cold_caption_example", "cold_readout_example",
    "thaw_caption_example", "thaw_readout_example",
)  # fmt: skip
"""The fields a `prompt_template` may name (`data.prompt.render_prompt` fills them)."""


def prompt_fields_hint() -> str:
    """The way out of a bad template: the fields it may use."""
    return "use only " + ", ".join("{" + f + "}" for f in PROMPT_FIELDS)


_BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
_Beta = Annotated[float, Field(ge=0, lt=1)]  # AdamW refuses others, after config.yaml was written


class TrainConfig(BaseModel):
    """One training run (`fusion-train`): data, model, DeepSpeed/ZeRO layout, optimisation, logging.

    Every field is a YAML key of `pipelines/train-*.yaml`; `--set a.b=v` overrides any of them.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    shards: str = Field(description="dataset reference: version folder, manifest.json URL or ROOT/NAME@TAG")
    model: str = Field(description="base causal LM: a local folder (save_pretrained layout) or a hub id")
    out: str = Field(description="RUN_DIR (local path): config.yaml, metrics.jsonl, checkpoints/, final/")
    fusion: FusionSettings = Field(
        default_factory=FusionSettings,
        description="the model's architecture (fusion variant, encoder sizes, ...: FusionSettings); the variables, "
        "normalization and window come from the dataset (`fusion_config`)",
    )
    zero: int = Field(default=2, ge=0, le=3, description="ZeRO stage 0, 1, 2 or 3")
    steps: int = Field(default=1000, gt=0, description="optimizer steps of the whole run (the schedule's length)")
    stop_at_step: int | None = Field(
        default=None,
        gt=0,
        description="stop (after a checkpoint) at this step although the schedule runs to `steps`",
    )
    micro_batch: int = Field(default=4, gt=0, description="samples per rank per forward pass")
    grad_accum: int = Field(default=1, gt=0, description="micro-batches accumulated per optimizer step")
    global_batch: int | None = Field(
        default=None, gt=0, description="if set, must equal micro_batch x grad_accum x world size"
    )
    lr: float = Field(default=1e-4, gt=0, description="peak learning rate of AdamW")
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="final lr of the cosine as a fraction of lr")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay (not on biases and norms)")
    betas: tuple[_Beta, _Beta] = Field(default=(0.9, 0.95), description="AdamW betas, each in [0, 1)")
    warmup_steps: int = Field(default=0, ge=0, description="linear warm-up steps before the cosine decay")
    schedule: Literal["cosine", "constant"] = Field(default="cosine", description="lr schedule after warm-up")
    grad_clip: float = Field(default=1.0, ge=0, description="gradient clipping norm (0: off)")
    bf16: bool | Literal["auto"] = Field(
        default="auto",
        description="bf16 mixed precision (DeepSpeed `bf16.enabled`): true, false, or auto (bf16 on a GPU that "
        "supports it and on a CPU that runs it fast, else fp32; fusion_trainer.precision)",
    )
    compile_base: bool = Field(
        default=False,
        description="torch.compile each decoder layer of the frozen base (fuses its norms, activations and rotary "
        "kernels: 1.27x on an H200 with an 8B base; exact to rounding); the first steps wait for the compiler",
    )
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="seed of the model init, data order and RNGs")
    eval_every: int = Field(
        default=0, ge=0, description="evaluate the val split every N steps (0: only at the end)"
    )
    eval_batches: int | None = Field(
        default=None, gt=0, description="cap on val batches per evaluation per rank"
    )
    save_every: int = Field(default=0, ge=0, description="checkpoint every N steps (0: only at the end)")
    log_every: int = Field(
        default=10, gt=0, description="write a metrics record and a log line every N steps"
    )
    resume: bool = Field(default=False, description="continue from the newest complete checkpoint in `out`")
    nproc: int = Field(default=1, gt=0, description="local ranks started through the DeepSpeed launcher")
    dist_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="seconds a rank waits for the others in one collective or at the rendezvous before it fails "
        "(bounds the wait when a node is lost without closing its connections; DeepSpeed's default)",
    )
    deepspeed: str | None = Field(
        default=None, description="a ds_config.json whose keys override the generated DeepSpeed config"
    )
    prompt_template: str = Field(default=DEFAULT_PROMPT_TEMPLATE, description="prompt before each caption")
    number_loss_weight: float = Field(
        default=1.0,
        gt=0,
        description="weight of the caption's number tokens (tokens holding a digit) in the training loss; 1: plain "
        "token-mean loss",
    )
    stats_loss_weight: float = Field(
        default=0.0,
        ge=0,
        description="weight of an auxiliary loss: a linear probe on the climate tokens predicts every variable's "
        "window mean/min/max (the samples' stats, normalised; Huber loss, so heavy-tailed maxima such as precipitation "
        "cannot dominate); it teaches the encoder the numbers captions "
        "state. 0: off. Adds fusion.stats_head",
    )
    readout_truth: bool = Field(default=False, description="with fusion.readout: training writes the readout line "
                                "from the window's true statistics (the samples' stats), so the caption learns to copy "
                                "it exactly; the stats head still learns from the stats loss, and validation and "
                                "generation write its predictions. Needs stats_loss_weight > 0")
    caption: Literal["full", "numbers", "temperature"] = Field(
        default="full",
        description="train on the full caption, on its number sentences only (numbers: temperature, wind, pressure, "
        "precipitation), or on its temperature sentence only; verbatim, several-fold shorter "
        "(grounding.caption_target)",
    )
    max_length: int = Field(
        default=256, gt=8, description="max tokens of prompt + caption (caption truncated)"
    )
    num_workers: int = Field(default=0, ge=0, description="DataLoader worker processes per rank")
    data_lanes: int = Field(
        default=1,
        ge=1,
        description="DataLoader workers read disjoint parts of the rank's shards; changes the sample order vs 1, so "
        "a run must resume with the same value; set it to num_workers for the fastest loading",
    )
    shuffle_buffer: int = Field(default=256, ge=0, description="samples in the seeded shuffle buffer")
    token_cache_dir: str | None = Field(
        default=None,
        description="folder where caption token ids are kept between runs, one file per dataset version, split, "
        "caption form and tokenizer (null: off; ids are then kept in memory only)",
    )
    length_groups: int = Field(
        default=1,
        ge=1,
        description="pools of this many micro-batches are sorted by caption length before batching, so a batch pads "
        "little (1: off); changes the sample order, so a run must resume with the same value; needs data_lanes 1",
    )
    verify_shards: bool = Field(default=True, description="check each shard's sha256 (before any of its samples is "
                                "used; a local file once per run while it is unchanged, see rehash_shards)")
    rehash_shards: bool = Field(default=False, description="hash a local shard on every read, not once per run while "
                                "its device, inode, size, mtime and ctime are unchanged (for network or FUSE mounts)")
    verify_frozen: bool = Field(
        default=True,
        description="hash the frozen base before and after training (seconds per GB); false skips it",
    )
    log_keys: bool = Field(
        default=True, description="write the sample keys of every step to samples/rank<R>.jsonl"
    )
    tensorboard: bool = Field(default=False, description="also write TensorBoard events to out/tensorboard")
    show_progress: bool = Field(default=False, description="progress bar on rank 0 (the CLI turns it on)")
    skip_bad_samples: bool = Field(
        default=False,
        description="leave out (log and count) samples that break the contract instead of stopping; a shard that is "
        "truncated or fails its checksum still stops the run",
    )

    # Field checks run together (one error lists them all); relations between fields run once every field is valid.
    @field_validator("shards", "model", "out")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is empty")
        return value

    @field_validator("bf16", mode="before")
    @classmethod
    def _bf16_setting(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower() if isinstance(value, str) else None
        if text in ("auto", "true", "false"):
            return {"auto": "auto", "true": True, "false": False}[text]
        raise ValueError(
            "must be true, false or auto (auto: bf16 where the hardware runs it fast, else fp32)"
        )

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed_not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("is empty: give a ds_config.json path or leave it out")
        return value

    @field_validator("prompt_template")
    @classmethod
    def _template_ok(cls, value: str) -> str:
        try:
            value.format(**dict.fromkeys(PROMPT_FIELDS, ""))
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"{exc!r}; {prompt_fields_hint()}") from None
        return value

    @model_validator(mode="after")
    def _check_relations(self) -> TrainConfig:
        problems = []
        if self.stop_at_step is not None and self.stop_at_step > self.steps:
            problems.append(f"stop_at_step: {self.stop_at_step} is beyond steps {self.steps}")
        if self.warmup_steps > self.steps:
            problems.append(f"warmup_steps: {self.warmup_steps} exceeds steps {self.steps}")
        if self.data_lanes > 1 and self.skip_bad_samples:
            problems.append(
                f"data_lanes: {self.data_lanes} cannot be combined with skip_bad_samples: true (each DataLoader "
                "worker would count only the bad samples of its own lanes); set data_lanes: 1 or skip_bad_samples: "
                "false"
            )
        if self.length_groups > 1 and self.data_lanes > 1:
            problems.append(
                f"length_groups: {self.length_groups} cannot be combined with data_lanes: {self.data_lanes}; set one "
                "of them to 1"
            )
        if self.readout_truth and not (self.fusion.readout and self.stats_loss_weight > 0):
            problems.append(f"readout_truth: true needs fusion.readout: true (got {self.fusion.readout}) and "
                            f"stats_loss_weight > 0 (got {self.stats_loss_weight}): set readout_truth: false, or "
                            "turn both on (the head that writes the line at generation learns from the stats loss)")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @classmethod
    def load(cls, raw: dict[str, Any]) -> TrainConfig:
        """Validate a dict, collecting every problem into one ConfigError that names the keys."""
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            lines: list[str] = []
            for e in exc.errors():
                msg = str(e["msg"]).removeprefix("Value error, ")
                if not e["loc"]:  # relations: one line per problem, each naming its key
                    lines.extend(f"  - {line}" for line in msg.splitlines())
                    continue
                given = f" (got {e['input']!r})" if e["type"] != "missing" else ""
                msg = "\n    ".join(line.strip() for line in msg.splitlines())  # a nested config's problems
                lines.append(f"  - {'.'.join(str(p) for p in e['loc'])}: {msg}{given}")
            raise ConfigError(
                f"invalid training config ({len(lines)} problem(s)):\n" + "\n".join(lines)
            ) from exc

    @classmethod
    def from_yaml(
        cls, path: str | Path | None, overrides: Sequence[str] = (), **values: Any
    ) -> TrainConfig:
        """Read a YAML file (optional), apply `key=value` and `a.b=value` overrides, then keyword values.

        Args:
            path: a `pipelines/train-*.yaml` file, or None.
            overrides: `--set` items; values are parsed as YAML scalars (`lr=3e-4`, `fusion.fusion=xattn`).
            **values: explicit values (CLI flags); None values are ignored.

        Raises:
            ConfigError: unreadable file, malformed override, unknown key or invalid value (all listed).
        """
        raw: dict[str, Any] = {}
        if path is not None:
            try:
                loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError) as exc:
                raise ConfigError(f"--config {path}: cannot read it as YAML ({exc})") from exc
            if not isinstance(loaded, dict):
                raise ConfigError(
                    f"--config {path}: expected a mapping of keys, got {type(loaded).__name__}"
                )
            raw = loaded
        for item in overrides:
            key, sep, text = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(
                    f"--set {item!r}: write KEY=VALUE, e.g. --set lr=3e-4 or --set fusion.fusion=xattn"
                )
            node = raw
            *parents, leaf = key.strip().split(".")
            for part in parents:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"--set {item!r}: {part!r} is not a mapping")
            node[leaf] = yaml.safe_load(text)
        for key, value in values.items():
            if value is not None:
                raw[key] = value
        return cls.load(raw)

    def fusion_config(
        self, variables: Sequence[str], normalization: dict[str, Any], window: str | None
    ) -> FusionConfig:
        """The model's FusionConfig for a dataset: `fusion` with the dataset's variables, normalization and sample
        window, and the stats head when `stats_loss_weight` > 0. The one place it is built: training, `--dry-run`
        and evaluation size the same model.

        Raises:
            ConfigError: `fusion` does not fit the dataset.
        """
        stats = {"stats_head": True} if self.stats_loss_weight > 0 else {}
        return FusionConfig(**{**self.fusion.model_dump(), **stats, "variables": list(variables),
                               "normalization": normalization, "window": window})  # fmt: skip

    def to_yaml(self) -> str:
        """The resolved config as YAML (what RUN_DIR/config.yaml holds)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def check_batch(self, world: int) -> int:
        """Return the global batch micro_batch x grad_accum x world, checked against `global_batch`.

        Raises:
            ConfigError: `global_batch` is set and differs.
        """
        total = self.micro_batch * self.grad_accum * world
        if self.global_batch is not None and self.global_batch != total:
            raise ConfigError(
                f"global_batch {self.global_batch} != micro_batch {self.micro_batch} x grad_accum {self.grad_accum} "
                f"x world {world} = {total}: change one of them (e.g. grad_accum "
                f"{max(1, self.global_batch // (self.micro_batch * world))})"
            )
        return total

    def deepspeed_config(self, world: int, bf16: bool | None = None) -> dict[str, Any]:
        """The DeepSpeed config dict, with the user's `deepspeed` JSON file merged over it.

        The optimizer is AdamW over the trainable parameters with `torch_adam` (no compiled CPU Adam); batch keys are
        checked once here. Keys the user file sets to "auto" keep the generated value.

        Args:
            world: the number of ranks.
            bf16: the precision the run resolved (`precision.resolve_precision`); None: resolve `self.bf16` here.

        Raises:
            ConfigError: the file is unreadable, or sets batch sizes that contradict this config.
        """
        total = self.check_batch(world)
        if bf16 is None:
            from .precision import resolve_precision

            bf16 = resolve_precision(self.bf16).bf16
        generated: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": self.micro_batch,
            "gradient_accumulation_steps": self.grad_accum,
            "train_batch_size": total,
            "gradient_clipping": self.grad_clip,
            "zero_optimization": {"stage": self.zero},
            "bf16": {"enabled": bf16},
            "optimizer": {
                "type": "AdamW",
                "params": {
                    "lr": self.lr,
                    "betas": list(self.betas),
                    "eps": 1e-8,
                    "weight_decay": self.weight_decay,
                    "torch_adam": True,
                },
            },  # fmt: skip
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if self.deepspeed is None:
            return generated
        try:
            user = json.loads(Path(self.deepspeed).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"deepspeed: cannot read {self.deepspeed} as JSON ({exc})") from exc
        if not isinstance(user, dict):
            raise ConfigError(f"deepspeed: {self.deepspeed} must hold a JSON object")
        merged = _merge(generated, user)
        clashes = [k for k in _BATCH_KEYS if merged[k] != generated[k]]
        if clashes:
            detail = ", ".join(f"{k}={merged[k]} (config: {generated[k]})" for k in clashes)
            raise ConfigError(
                f"deepspeed: {self.deepspeed} sets {detail}; set micro_batch/grad_accum in the training config "
                'instead, or write "auto"'
            )
        return merged


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if value == "auto" and key in base:
            continue
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = _merge(base[key], value)
        else:
            out[key] = value
    return out
