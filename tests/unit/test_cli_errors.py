"""The exit-code map and the one-line reports of distrib_face/cli/errors.py."""

from __future__ import annotations

import errno

import pytest

from distrib_face.atomic import OutputError, explain_os_error
from distrib_face.cli.errors import EXIT_BAD_INPUT, EXIT_FAILED, classify, describe, ray_failure, report
from distrib_face.config import ConfigError


class DataQualityAbort(RuntimeError):
    """Stands for an error class another module defines: it only declares its exit code."""

    exit_code = 3


def _errors():
    from mlflow.exceptions import MlflowException

    from distrib_face.tracking.mlflow_tracker import TrackingError
    from distrib_face.train import NonFiniteLossError
    from distrib_face.train.checkpoint import CheckpointError

    return [
        (ConfigError("optim.lr must be > 0, got -1.0"), EXIT_BAD_INPUT, True),
        (FileNotFoundError("data.shards does not exist: /x"), EXIT_BAD_INPUT, True),
        (CheckpointError("/c/latest points to 'step_2', which is not a complete checkpoint"), EXIT_BAD_INPUT, True),
        (TrackingError("MLflow tracking store sqlite:////x: cannot write /x"), EXIT_BAD_INPUT, True),
        (MlflowException("RESOURCE_DOES_NOT_EXIST"), EXIT_BAD_INPUT, True),
        (explain_os_error(OSError(errno.ENOSPC, "No space left on device"), "/out/ckpt"), EXIT_BAD_INPUT, True),
        (PermissionError(errno.EACCES, "Permission denied", "/out"), EXIT_BAD_INPUT, True),
        (NonFiniteLossError("aborting at step 3: the loss was non-finite"), EXIT_FAILED, True),
        (DataQualityAbort("12% of the samples of shard-00003.tar were skipped"), 3, True),
        (ValueError("a bug"), EXIT_FAILED, False),
        (OSError(errno.ECONNRESET, "Connection reset by peer"), EXIT_FAILED, False),
    ]


def test_exit_codes():
    for err, code, known in _errors():
        assert classify(err) == (code, known), err


def test_descriptions_are_one_line_naming_the_path_without_secrets():
    assert describe(explain_os_error(OSError(errno.ENOSPC, "No space left on device"), "/out/x.pt")) == \
        "no space left on /out/x.pt"
    assert describe(PermissionError(errno.EACCES, "Permission denied", "/out")) == "permission denied writing /out"
    assert describe(FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/m.json")) == \
        "no such file or folder: /data/m.json"
    assert describe(ConfigError("bad\n  tracking.tracking_uri='http://u:Pw-9981@h'")) == \
        "bad tracking.tracking_uri='http://u:[REDACTED]@h'"


def test_report_prints_one_line_and_a_traceback_only_for_bugs_or_debug(capsys):
    assert report("prog", ConfigError("optim.lr must be > 0"), debug=False) == EXIT_BAD_INPUT
    assert capsys.readouterr().err == "prog: error: optim.lr must be > 0\n"
    assert report("prog", ConfigError("optim.lr must be > 0"), debug=True) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.endswith("prog: error: optim.lr must be > 0\n") and "ConfigError" in err
    try:
        raise ValueError("unexpected")
    except ValueError as bug:
        assert report("prog", bug, debug=False) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("prog: error: unexpected\n")


@pytest.mark.parametrize("cause, code, words", [
    (OutputError(errno.ENOSPC, "no space left on /node/out"), EXIT_BAD_INPUT, "rank 1: no space left on /node/out"),
    (ValueError("shape mismatch"), EXIT_FAILED, "rank 1: ValueError: shape mismatch"),
])
def test_ray_worker_failure_keeps_the_worker_error_and_its_code(cause, code, words):
    """Ray Train's own exception types, as the driver receives them (the user error inside Ray's wrapper)."""
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    failed = WorkerGroupError("Training failed due to worker errors", {
        3: UserExceptionWithTraceback(RuntimeError("later rank"), "Traceback ..."),
        1: UserExceptionWithTraceback(cause, "Traceback ..."),
    })
    reported = ray_failure(failed, max_failures=2)
    assert classify(reported) == (code, True)
    assert describe(reported) == f"training failed after ray.max_failures=2 restart(s): {words}"
    plain = ValueError("not Ray's")
    assert ray_failure(plain, 0) is plain
