"""The `fusion-eval` and `fusion-generate` commands: score a finished run, and write its captions.

```
fusion-eval --run RUN_DIR --shards REF [--split test] [--loss-samples N] [--generations FILE] [--intervene T2M=+3]
fusion-generate --run RUN_DIR --shards REF [--split test] [--limit N] [--out FILE]
```
Every error exits non-zero with one message naming the value and the way out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .cli_support import one_line_errors, setup_logging

__all__ = ["eval_app", "generate_app"]

eval_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help="Evaluate a finished run.")
generate_app = typer.Typer(
    add_completion=False, pretty_exceptions_enable=False, help="Generate texts with a run."
)


@eval_app.command()
def eval_command(
    run: Annotated[Path, typer.Option(help="RUN_DIR of a finished fusion-train run")],
    shards: Annotated[str, typer.Option(help="dataset REF")],
    split: Annotated[str, typer.Option(help="train | val | test")] = "test",
    batch_size: Annotated[int, typer.Option(help="samples per batch of the losses and gains")] = 4,
    generate_batch_size: Annotated[
        int | None,
        typer.Option(
            help="windows per generate call (the captions made here, the interventions); default: --batch-size"
        ),
    ] = None,
    max_batches: Annotated[int | None, typer.Option(help="cap on batches")] = None,
    loss_samples: Annotated[
        int,
        typer.Option(
            help="score the losses and gains on N samples spread evenly over the split (0: every sample)"
        ),
    ] = 0,
    generations: Annotated[
        Path | None, typer.Option(help="score this fusion-generate JSONL instead of generating here")
    ] = None,
    generate_limit: Annotated[int, typer.Option(help="samples to generate for faithfulness (0: all)")] = 64,
    max_new_tokens: Annotated[int, typer.Option(help="tokens per generated caption")] = 96,
    intervene: Annotated[
        list[str] | None,
        typer.Option(
            help="shift one variable of the windows and report the slope of the generated number: "
            "T2M=+3 (K), SLP=-500 (Pa), WIND=+2 (m/s of mean wind); repeatable, several deltas per variable; "
            "a grid permutation runs with them"
        ),
    ] = None,
    intervene_limit: Annotated[
        int, typer.Option(help="windows (spread over the split) the interventions use")
    ] = 64,
    no_repeat_ngram: Annotated[
        int,
        typer.Option(help="n > 0: a caption made here never repeats an n-gram of its own tokens (0: off)"),
    ] = 0,
    base_loss_from: Annotated[
        Path | None,
        typer.Option(
            help="reuse the frozen base's loss from this earlier fusion-eval JSON (another seed's metrics.json or "
            "RUN/final/evaluation-test.json) when it was scored on the same base, samples, prompt and precision; "
            "else the base is scored here, with a warning naming what differs"
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="logging level")] = "WARNING",
) -> None:
    """Print JSON: losses of the fused model and the frozen base, grounding gains (against any other window and
    against the same location's other times), numeric faithfulness, the baseline ladder, interventions, and the
    science goals checked against them."""
    setup_logging(log_level)
    from .evaluation.evaluate import evaluate_run

    with one_line_errors():
        result = evaluate_run(
            run, shards, split, batch_size=batch_size, max_batches=max_batches, generations=generations,
            generate_limit=generate_limit or None, max_new_tokens=max_new_tokens, interventions=intervene or (),
            intervene_limit=intervene_limit, loss_samples=loss_samples or None,
            generate_batch_size=generate_batch_size, no_repeat_ngram=no_repeat_ngram,
            base_loss_from=base_loss_from,
        )  # fmt: skip
    typer.echo(json.dumps(result, indent=2))


@generate_app.command()
def generate_command(
    run: Annotated[Path, typer.Option(help="RUN_DIR of a finished fusion-train run")],
    shards: Annotated[str, typer.Option(help="dataset REF")],
    split: Annotated[str, typer.Option(help="train | val | test")] = "test",
    limit: Annotated[int | None, typer.Option(help="at most N samples")] = None,
    out: Annotated[Path | None, typer.Option(help="write JSONL here (default: stdout)")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate per sample")] = 96,
    batch_size: Annotated[int, typer.Option(help="samples per generate call")] = 4,
    no_repeat_ngram: Annotated[
        int, typer.Option(help="n > 0: a caption never repeats an n-gram of its own tokens (0: off)")
    ] = 0,
    log_level: Annotated[str, typer.Option(help="logging level")] = "WARNING",
) -> None:
    """Generate a text per sample: one JSON line with key, reference and generated text."""
    setup_logging(log_level)
    from .evaluation.generate import generate_run

    with one_line_errors():
        rows = generate_run(run, shards, split, limit, out, batch_size, max_new_tokens, no_repeat_ngram)
    if out is None:
        for row in rows:
            typer.echo(json.dumps(row, ensure_ascii=False))
