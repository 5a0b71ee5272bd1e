"""asyncio's "Task exception was never retrieved ... attached to a different loop" (s3fs closing an S3 client session
at garbage collection, on another event loop than the one that made it) is teardown noise: every command line keeps
it off stderr at its default verbosity, so a failing command's stderr is still its one `error:` line (this message
once came before the error line of test_store_faults' failing manifest commit). Other asyncio errors still show, and
the teardown report shows at DEBUG."""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging

import pytest


def _unretrieved_task_error(message: str) -> None:
    """A real asyncio Task that fails and is collected without anyone retrieving its exception."""

    async def fail() -> None:
        raise RuntimeError(message)

    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(fail())
        loop.run_until_complete(asyncio.sleep(0.01))
        del task
        gc.collect()
    finally:
        loop.close()


TEARDOWN = "Task <Task pending name='Task-7'> got Future <Future pending> attached to a different loop"


@pytest.mark.parametrize(
    ("module", "quiet", "loud"),
    [("merra2_text_data.cli", 0, 2), ("fusion_trainer.cli_support", "WARNING", "DEBUG"), ("fusion_trainer.cli_model", False, None)],
)  # fmt: skip
def test_session_teardown_on_another_loop_is_not_an_error_line(
    module: str, quiet: object, loud: object, capsys: pytest.CaptureFixture[str], root_logging: logging.Logger
) -> None:
    cli = importlib.import_module(module)
    for handler in list(root_logging.handlers):  # a fresh process's root logger: cli_model's basicConfig has no force
        root_logging.removeHandler(handler)
    cli.setup_logging(quiet)
    capsys.readouterr()
    _unretrieved_task_error(TEARDOWN)
    assert capsys.readouterr().err == ""
    _unretrieved_task_error("a real failure in a task")  # not teardown: still reported
    err = capsys.readouterr().err
    assert "Task exception was never retrieved" in err and "a real failure in a task" in err, err
    if loud is not None:
        cli.setup_logging(loud)
        _unretrieved_task_error(TEARDOWN)
        err = capsys.readouterr().err
        assert "DEBUG" in err and "attached to a different loop" in err, err
