"""Configs of fusion_trainer: one pydantic model per concern, with field docstrings.

FusionConfig describes the model (encoder + fusion); TrainConfig the training run. Validation messages name the key.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from climate_text_schema import NormStats
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError

# --- FusionConfig (model) ---

FusionKind = Literal["add", "xattn", "prefix", "gated-xattn"]
"""The four ways climate tokens enter the language model (see docs/model.md)."""

FUSION_KINDS: tuple[str, ...] = get_args(FusionKind)
"""`FusionKind`'s names, for messages and command-line choices."""


def _format_validation_error(model: str, exc: ValidationError) -> str:
    lines: list[str] = []
    for err in exc.errors():
        if not err["loc"]:  # a model-level check: one line per problem, each already naming its key
            msg = str(err["msg"]).removeprefix("Value error, ")
            lines.extend(f"  {model}.{line}" for line in msg.splitlines())
            continue
        key = ".".join(str(part) for part in err["loc"])
        given = f" (got {err['input']!r})" if "input" in err and err["type"] != "missing" else ""
        lines.append(f"  {model}.{key}: {err['msg']}{given}")
    return f"invalid {model}, {len(lines)} problem(s):\n" + "\n".join(lines)


class FusionConfig(BaseModel):
    """The trainable part of a FusionModel: the climate encoder and how its tokens reach the frozen LM.

    `FusionConfig(fusion="xattn", n_variables=V)` is complete; every other field has a default. All problems are
    collected and raised once as `ConfigError`, each line naming the key.

    Examples:
        >>> FusionConfig(fusion="prefix", n_variables=4).n_prefix_tokens
        32
    """

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    fusion: FusionKind = "xattn"
    """add: pooled climate added to every text embedding (tanh gate); xattn: one gated cross-attention at the input;
    prefix: soft climate tokens prepended (LLaVA); gated-xattn: gated cross-attention + FFN before every k-th layer
    (Flamingo)."""
    n_variables: int | None = Field(default=None, ge=1)
    """Number of climate variables (the `variable` axis of the climate array). Taken from `variables` if omitted."""
    d_encoder: int = Field(default=256, ge=8)
    """Width of the climate encoder and of the climate tokens."""
    encoder_depth: int = Field(default=2, ge=0)
    """Transformer layers over the climate tokens."""
    encoder_heads: int = Field(default=8, ge=1)
    """Attention heads in the encoder (variable aggregation, pooling and transformer); divides d_encoder."""
    encoder_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout inside the encoder (the frozen LM never uses dropout)."""
    patch_size: int = Field(default=4, ge=1)
    """Spatial patch edge in grid cells; grids of any size are padded to a multiple (padding is masked)."""
    per_patch_tokens: bool = False
    """False: one climate token per time step (spatial attention pooling); True: one per time step and patch."""
    n_prefix_tokens: int = Field(default=32, ge=1)
    """prefix: soft tokens produced by the attention pooler and inserted into the text."""
    prefix_position: Literal["after_prompt", "start"] = "after_prompt"
    """prefix: where the soft tokens go: after the prompt, right before the caption (the first labelled token; in
    generation, after the prompt), or before the first token. "start" puts them where the LM's first position
    collects attention regardless of content; docs/results.md measures the difference."""
    n_heads: int = Field(default=8, ge=1)
    """xattn / gated-xattn: cross-attention heads; divides the LM hidden size."""
    every_n_layers: int = Field(default=4, ge=1)
    """gated-xattn: a gated block before decoder layers 0, k, 2k, ..."""
    xattn_ffn_mult: int = Field(default=2, ge=1)
    """gated-xattn: hidden width of the gated FFN as a multiple of the LM hidden size."""
    gate_init: float = 0.0
    """Initial value of the tanh gates; 0 makes the fused model start exactly as the frozen LM."""
    train_lm_head: bool = False
    """Also train the LM head (untied from the input embeddings first when the base ties them)."""
    lora: dict[str, Any] | None = None
    """peft LoraConfig keyword arguments (e.g. {"r": 8, "target_modules": ["q_proj", "v_proj"]}); None: no LoRA."""
    stats_head: bool = False
    """Add `encoder.stats_head`, a linear probe predicting every variable's window mean/min/max from the climate
    tokens; `fusion-train` turns it on when `stats_loss_weight` > 0. Not used in generation."""
    readout: bool = False
    """prefix: write the stats head's reading of the window (the caption's quantities: temperatures, wind, pressure,
    precipitation) as a text line after the prompt, before the soft tokens, for the LM to copy from
    (`fusion_trainer.readout`). Turns on `stats_head` with its direct features (the window's own per-variable mean,
    minimum and maximum). Needs `stats_loss_weight` > 0 to train the head."""
    gradient_checkpointing: bool = False
    """Recompute the frozen decoder layers in the backward pass (less activation memory, ~30% more compute)."""
    variables: list[str] | None = None
    """Metadata: the variable names in climate-array order (from the dataset manifest)."""
    normalization: dict[str, NormStats] | None = None
    """Metadata: {variable: {mean, std}} the data was normalised with, so generation can normalise the same way."""
    window: str | None = None
    """Metadata: the dataset's sample span (the manifest's `window`, e.g. `1h`): the readout's precipitation total."""
    base: str | None = None
    """The base model (local path or hub id); set by FusionModel.from_base."""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(_format_validation_error("FusionConfig", exc)) from exc

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> FusionConfig:
        """Validate a mapping (e.g. a parsed `fusion_config.json`); problems raise ConfigError."""
        try:
            return super().model_validate(obj, *args, **kwargs)
        except ValidationError as exc:
            raise ConfigError(_format_validation_error("FusionConfig", exc)) from exc

    @model_validator(mode="after")
    def _check_together(self) -> FusionConfig:
        problems: list[str] = []
        if self.n_variables is None:
            if self.variables is None:
                problems.append("n_variables: required (the size of the climate array's variable axis)")
            else:
                object.__setattr__(self, "n_variables", len(self.variables))
        elif self.variables is not None and len(self.variables) != self.n_variables:
            problems.append(
                f"variables: {len(self.variables)} names {self.variables} but n_variables={self.n_variables}; "
                "give one name per variable"
            )
        if self.variables is not None and len(set(self.variables)) != len(self.variables):
            problems.append(f"variables: duplicate names in {self.variables}")
        if self.normalization is not None and self.variables is not None:
            missing = [v for v in self.variables if v not in self.normalization]
            if missing:
                problems.append(f"normalization: no mean/std for {missing}; give one entry per variable")
        if self.d_encoder % self.encoder_heads:
            problems.append(
                f"encoder_heads: {self.encoder_heads} does not divide d_encoder={self.d_encoder}; "
                "pick heads that divide it (e.g. 4 or 8 for 256)"
            )
        if self.lora is not None:
            problems.extend(_lora_problems(self.lora))
        if self.readout and self.fusion != "prefix":
            problems.append(f"readout: true needs fusion: prefix (got {self.fusion!r}); the line goes before the "
                            "soft tokens")  # fmt: skip
        if self.readout and not self.stats_head:
            object.__setattr__(self, "stats_head", True)
        if problems:
            raise ValueError("\n".join(problems))
        return self


def _lora_problems(lora: dict[str, Any]) -> list[str]:
    try:
        from peft import LoraConfig
    except ImportError:
        return ["lora: needs the peft package: pip install 'fusion-trainer[lora]'"]
    try:
        LoraConfig(**lora)
    except (TypeError, ValueError) as exc:
        return [f"lora: {lora!r} is not a valid peft LoraConfig ({exc})"]
    return []


# --- TrainConfig (training) ---
# (owned by the training engineer; imports are local to this section so the two sections can be edited apart)

import json as _json  # noqa: E402
from collections.abc import Sequence as _Sequence  # noqa: E402
from pathlib import Path as _Path  # noqa: E402
from typing import Any as _Any  # noqa: E402
from typing import Literal as _Literal  # noqa: E402

import yaml as _yaml  # noqa: E402
from pydantic import BaseModel as _BaseModel  # noqa: E402
from pydantic import ConfigDict as _ConfigDict  # noqa: E402
from pydantic import Field as _Field  # noqa: E402
from pydantic import ValidationError as _ValidationError  # noqa: E402
from pydantic import field_validator as _field_validator  # noqa: E402
from pydantic import model_validator as _model_validator  # noqa: E402

from .errors import ConfigError as _ConfigError  # noqa: E402

DEFAULT_PROMPT_TEMPLATE = "Example: {example}\nDescribe this climate window ({variables}):\n"
"""`{example}`: a one-shot caption whose numbers are the train means; `{variables}`: the variable names."""

_BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


class TrainConfig(_BaseModel):
    """One training run (`fusion-train`): data, model, DeepSpeed/ZeRO layout, optimisation, logging.

    Every field is a YAML key of `pipelines/train-*.yaml`; `--set a.b=v` overrides any of them.
    """

    model_config = _ConfigDict(extra="forbid", validate_assignment=True)

    shards: str = _Field(description="dataset reference: version folder, manifest.json URL or ROOT/NAME@TAG")
    model: str = _Field(description="base causal LM: a local folder (save_pretrained layout) or a hub id")
    out: str = _Field(description="RUN_DIR (local path): config.yaml, metrics.jsonl, checkpoints/, final/")
    fusion: dict[str, _Any] = _Field(
        default_factory=dict,
        description="FusionConfig fields (fusion, encoder sizes, ...); n_variables, variables and normalization "
        "come from the dataset",
    )
    zero: int = _Field(default=2, ge=0, le=3, description="ZeRO stage 0, 1, 2 or 3")
    steps: int = _Field(
        default=1000, gt=0, description="optimizer steps of the whole run (the schedule's length)"
    )
    stop_at_step: int | None = _Field(
        default=None,
        gt=0,
        description="stop (after a checkpoint) at this step although the schedule runs to `steps`",
    )
    micro_batch: int = _Field(default=4, gt=0, description="samples per rank per forward pass")
    grad_accum: int = _Field(default=1, gt=0, description="micro-batches accumulated per optimizer step")
    global_batch: int | None = _Field(
        default=None, gt=0, description="if set, must equal micro_batch x grad_accum x world size"
    )
    lr: float = _Field(default=1e-4, gt=0, description="peak learning rate of AdamW")
    min_lr_ratio: float = _Field(
        default=0.1, ge=0, le=1, description="final lr of the cosine as a fraction of lr"
    )
    weight_decay: float = _Field(
        default=0.0, ge=0, description="AdamW weight decay (not on biases and norms)"
    )
    betas: tuple[float, float] = _Field(default=(0.9, 0.95), description="AdamW betas")
    warmup_steps: int = _Field(default=0, ge=0, description="linear warm-up steps before the cosine decay")
    schedule: _Literal["cosine", "constant"] = _Field(
        default="cosine", description="lr schedule after warm-up"
    )
    grad_clip: float = _Field(default=1.0, ge=0, description="gradient clipping norm (0: off)")
    bf16: bool | _Literal["auto"] = _Field(
        default="auto",
        description="bf16 mixed precision (DeepSpeed `bf16.enabled`): true, false, or auto (bf16 on a GPU that "
        "supports it and on a CPU that runs it fast, else fp32; fusion_trainer.precision)",
    )
    seed: int = _Field(default=0, ge=0, description="seed of the model init, data order and RNGs")
    eval_every: int = _Field(
        default=0, ge=0, description="evaluate the val split every N steps (0: only at the end)"
    )
    eval_batches: int | None = _Field(
        default=None, gt=0, description="cap on val batches per evaluation per rank"
    )
    save_every: int = _Field(default=0, ge=0, description="checkpoint every N steps (0: only at the end)")
    log_every: int = _Field(
        default=10, gt=0, description="write a metrics record and a log line every N steps"
    )
    resume: bool = _Field(default=False, description="continue from the newest complete checkpoint in `out`")
    nproc: int = _Field(default=1, gt=0, description="local ranks started through the DeepSpeed launcher")
    dist_timeout_s: float = _Field(
        default=600.0,
        gt=0,
        description="seconds a rank waits for the others in one collective or at the rendezvous before it fails "
        "(bounds the wait when a node is lost without closing its connections; DeepSpeed's default)",
    )
    deepspeed: str | None = _Field(
        default=None, description="a ds_config.json whose keys override the generated DeepSpeed config"
    )
    prompt_template: str = _Field(default=DEFAULT_PROMPT_TEMPLATE, description="prompt before each caption")
    number_loss_weight: float = _Field(
        default=1.0,
        gt=0,
        description="weight of the caption's number tokens (tokens holding a digit) in the training loss; 1: plain "
        "token-mean loss",
    )
    stats_loss_weight: float = _Field(
        default=0.0,
        ge=0,
        description="weight of an auxiliary loss: a linear probe on the climate tokens predicts every variable's "
        "window mean/min/max (the samples' stats, normalised; Huber loss, so heavy-tailed maxima such as precipitation "
        "cannot dominate); it teaches the encoder the numbers captions "
        "state. 0: off. Adds fusion.stats_head",
    )
    caption: _Literal["full", "numbers", "temperature"] = _Field(
        default="full",
        description="train on the full caption, on its number sentences only (numbers: temperature, wind, pressure, "
        "precipitation), or on its temperature sentence only; verbatim, several-fold shorter "
        "(grounding.caption_target)",
    )
    max_length: int = _Field(
        default=256, gt=8, description="max tokens of prompt + caption (caption truncated)"
    )
    num_workers: int = _Field(default=0, ge=0, description="DataLoader worker processes per rank")
    data_lanes: int = _Field(
        default=1,
        ge=1,
        description="DataLoader workers read disjoint parts of the rank's shards; changes the sample order vs 1, so "
        "a run must resume with the same value; set it to num_workers for the fastest loading",
    )
    shuffle_buffer: int = _Field(default=256, ge=0, description="samples in the seeded shuffle buffer")
    token_cache_dir: str | None = _Field(
        default=None,
        description="folder where caption token ids are kept between runs, one file per dataset version, split, "
        "caption form and tokenizer (null: off; ids are then kept in memory only)",
    )
    length_groups: int = _Field(
        default=1,
        ge=1,
        description="pools of this many micro-batches are sorted by caption length before batching, so a batch pads "
        "little (1: off); changes the sample order, so a run must resume with the same value; needs data_lanes 1",
    )
    verify_shards: bool = _Field(
        default=True, description="check each shard's sha256 (before any of its samples is used)"
    )
    verify_frozen: bool = _Field(
        default=True,
        description="hash the frozen base before and after training (seconds per GB); false skips it",
    )
    log_keys: bool = _Field(
        default=True, description="write the sample keys of every step to samples/rank<R>.jsonl"
    )
    tensorboard: bool = _Field(default=False, description="also write TensorBoard events to out/tensorboard")
    show_progress: bool = _Field(default=False, description="progress bar on rank 0 (the CLI turns it on)")
    skip_bad_samples: bool = _Field(
        default=False,
        description="leave out (log and count) samples that break the contract instead of stopping; a shard that is "
        "truncated or fails its checksum still stops the run",
    )

    # Field checks run together (one error lists them all); relations between fields run once every field is valid.
    @_field_validator("shards", "model", "out")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is empty")
        return value

    @_field_validator("bf16", mode="before")
    @classmethod
    def _bf16_setting(cls, value: _Any) -> _Any:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower() if isinstance(value, str) else None
        if text in ("auto", "true", "false"):
            return {"auto": "auto", "true": True, "false": False}[text]
        raise ValueError(
            "must be true, false or auto (auto: bf16 where the hardware runs it fast, else fp32)"
        )

    @_field_validator("deepspeed")
    @classmethod
    def _deepspeed_not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("is empty: give a ds_config.json path or leave it out")
        return value

    @_field_validator("prompt_template")
    @classmethod
    def _template_ok(cls, value: str) -> str:
        try:
            value.format(
                example="",
                variables="",
                caption_example="",
                readout_example="",
                cold_caption_example="",
                cold_readout_example="",
            )
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"{exc!r}; use only {{example}}, {{caption_example}}, {{readout_example}}, {{cold_caption_example}}, "
                "{cold_readout_example} and {variables}"
            ) from None
        return value

    @_field_validator("fusion")
    @classmethod
    def _fusion_ok(cls, value: dict[str, _Any]) -> dict[str, _Any]:
        if value:
            try:
                FusionConfig(**{"n_variables": 1, **value})
            except (ValueError, TypeError) as exc:
                raise ValueError(str(exc)) from None
        return value

    @_model_validator(mode="after")
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
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @classmethod
    def load(cls, raw: dict[str, _Any]) -> TrainConfig:
        """Validate a dict, collecting every problem into one ConfigError that names the keys."""
        try:
            return cls.model_validate(raw)
        except _ValidationError as exc:
            lines: list[str] = []
            for e in exc.errors():
                msg = str(e["msg"]).removeprefix("Value error, ")
                if not e["loc"]:  # relations: one line per problem, each naming its key
                    lines.extend(f"  - {line}" for line in msg.splitlines())
                    continue
                given = f" (got {e['input']!r})" if e["type"] != "missing" else ""
                msg = "\n    ".join(line.strip() for line in msg.splitlines())  # a nested config's problems
                lines.append(f"  - {'.'.join(str(p) for p in e['loc'])}: {msg}{given}")
            raise _ConfigError(
                f"invalid training config ({len(lines)} problem(s)):\n" + "\n".join(lines)
            ) from exc

    @classmethod
    def from_yaml(
        cls, path: str | _Path | None, overrides: _Sequence[str] = (), **values: _Any
    ) -> TrainConfig:
        """Read a YAML file (optional), apply `key=value` and `a.b=value` overrides, then keyword values.

        Args:
            path: a `pipelines/train-*.yaml` file, or None.
            overrides: `--set` items; values are parsed as YAML scalars (`lr=3e-4`, `fusion.fusion=xattn`).
            **values: explicit values (CLI flags); None values are ignored.

        Raises:
            ConfigError: unreadable file, malformed override, unknown key or invalid value (all listed).
        """
        raw: dict[str, _Any] = {}
        if path is not None:
            try:
                loaded = _yaml.safe_load(_Path(path).read_text(encoding="utf-8"))
            except (OSError, _yaml.YAMLError) as exc:
                raise _ConfigError(f"--config {path}: cannot read it as YAML ({exc})") from exc
            if not isinstance(loaded, dict):
                raise _ConfigError(
                    f"--config {path}: expected a mapping of keys, got {type(loaded).__name__}"
                )
            raw = loaded
        for item in overrides:
            key, sep, text = item.partition("=")
            if not sep or not key.strip():
                raise _ConfigError(
                    f"--set {item!r}: write KEY=VALUE, e.g. --set lr=3e-4 or --set fusion.fusion=xattn"
                )
            node = raw
            *parents, leaf = key.strip().split(".")
            for part in parents:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise _ConfigError(f"--set {item!r}: {part!r} is not a mapping")
            node[leaf] = _yaml.safe_load(text)
        for key, value in values.items():
            if value is not None:
                raw[key] = value
        return cls.load(raw)

    def fusion_config(
        self, variables: _Sequence[str], normalization: dict[str, _Any], window: str | None
    ) -> FusionConfig:
        """The model's FusionConfig for a dataset: `fusion` with the dataset's variables, normalization and sample
        window, and the stats head when `stats_loss_weight` > 0. The one place it is built: training, `--dry-run`
        and evaluation size the same model.

        Raises:
            ConfigError: `fusion` does not fit the dataset.
        """
        stats = {"stats_head": True} if self.stats_loss_weight > 0 else {}
        return FusionConfig(**{**self.fusion, **stats, "variables": list(variables), "normalization": normalization,
                               "window": window})  # fmt: skip

    def to_yaml(self) -> str:
        """The resolved config as YAML (what RUN_DIR/config.yaml holds)."""
        return _yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def check_batch(self, world: int) -> int:
        """Return the global batch micro_batch x grad_accum x world, checked against `global_batch`.

        Raises:
            ConfigError: `global_batch` is set and differs.
        """
        total = self.micro_batch * self.grad_accum * world
        if self.global_batch is not None and self.global_batch != total:
            raise _ConfigError(
                f"global_batch {self.global_batch} != micro_batch {self.micro_batch} x grad_accum {self.grad_accum} "
                f"x world {world} = {total}: change one of them (e.g. grad_accum "
                f"{max(1, self.global_batch // (self.micro_batch * world))})"
            )
        return total

    def deepspeed_config(self, world: int, bf16: bool | None = None) -> dict[str, _Any]:
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
        generated: dict[str, _Any] = {
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
            user = _json.loads(_Path(self.deepspeed).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise _ConfigError(f"deepspeed: cannot read {self.deepspeed} as JSON ({exc})") from exc
        if not isinstance(user, dict):
            raise _ConfigError(f"deepspeed: {self.deepspeed} must hold a JSON object")
        merged = _merge(generated, user)
        clashes = [k for k in _BATCH_KEYS if merged[k] != generated[k]]
        if clashes:
            detail = ", ".join(f"{k}={merged[k]} (config: {generated[k]})" for k in clashes)
            raise _ConfigError(
                f"deepspeed: {self.deepspeed} sets {detail}; set micro_batch/grad_accum in the training config "
                'instead, or write "auto"'
            )
        return merged


def _merge(base: dict[str, _Any], over: dict[str, _Any]) -> dict[str, _Any]:
    out = dict(base)
    for key, value in over.items():
        if value == "auto" and key in base:
            continue
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = _merge(base[key], value)
        else:
            out[key] = value
    return out
