"""The model's config in two layers, validated with messages that name the key; `FusionKind` names the variants once.

`FusionSettings` is the architecture a training config chooses (encoder sizes, fusion variant, prefix, readout, LoRA):
`TrainConfig.fusion`. `FusionConfig` is those settings plus what the dataset gives (variables, normalization, window)
and the base: the complete config a FusionModel is built from and saves as `fusion_config.json`.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from climate_text_schema import NormStats
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError

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


class FusionSettings(BaseModel):
    """The architecture of a FusionModel's trainable part, without the dataset's metadata: `TrainConfig.fusion`.

    `TrainConfig.fusion_config` adds the dataset's variables, normalization and window, giving the `FusionConfig`.
    Validated inside `TrainConfig`, whose `ConfigError` lists every problem under `fusion.`.
    """

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    fusion: FusionKind = "xattn"
    """add: pooled climate added to every text embedding (tanh gate); xattn: one gated cross-attention at the input;
    prefix: soft climate tokens prepended (LLaVA); gated-xattn: gated cross-attention + FFN before every k-th layer
    (Flamingo)."""
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
    (`fusion_trainer.model.readout`). Turns on `stats_head` with its direct features (the window's own per-variable mean,
    minimum and maximum). Needs `stats_loss_weight` > 0 to train the head."""
    gradient_checkpointing: bool = False
    """Recompute the frozen decoder layers in the backward pass (less activation memory, ~30% more compute)."""

    @model_validator(mode="after")
    def _check(self) -> FusionSettings:
        problems = self._settings_problems()
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _settings_problems(self) -> list[str]:
        """The architecture's problems, one line each naming its key; sets `stats_head` where `readout` needs it."""
        problems: list[str] = []
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
        return problems


class FusionConfig(FusionSettings):
    """The trainable part of a FusionModel: the climate encoder and how its tokens reach the frozen LM, with the
    dataset's metadata.

    `FusionConfig(fusion="xattn", n_variables=V)` is complete; every other field has a default. All problems are
    collected and raised once as `ConfigError`, each line naming the key.

    Examples:
        >>> FusionConfig(fusion="prefix", n_variables=4).n_prefix_tokens
        32
    """

    n_variables: int | None = Field(default=None, ge=1)
    """Number of climate variables (the `variable` axis of the climate array). Taken from `variables` if omitted."""
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
    def _check(self) -> FusionConfig:  # replaces FusionSettings._check: every problem in one message
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
        problems.extend(self._settings_problems())
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
