"""The one base class of errors a user can act on: the CLI prints these plainly, without a traceback.

``describe`` names the few other failures that are the user's machine speaking, not a bug (a full disk, a
read-only folder, a name too long, a damaged or locked database file), so that the CLI prints them as one
``error:`` line too; anything else keeps its traceback.
"""

from __future__ import annotations

import errno
import sqlite3
import sys


class PipelineError(Exception):
    """Bad input or missing prerequisite; the message names the file, key or value and what would be valid."""


_OS_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space (or move the output elsewhere) and run the command again",
    errno.EDQUOT: "the disk quota is used up: free some space and run the command again",
    errno.EROFS: "the file system is read-only: run from a writable copy of the project",
    errno.EACCES: "permission denied: give this user access, or run from a copy of the project you own",
    errno.EPERM: "operation not permitted: give this user access, or run from a copy of the project you own",
    errno.ENAMETOOLONG: "the name is too long for the file system: choose a shorter name or folder",
}


def describe(err: BaseException) -> str | None:
    """A one-line explanation of ``err`` when it is an environment failure the user can fix, else None."""
    if isinstance(err, OSError) and err.errno in _OS_ADVICE:
        where = err.filename if err.filename is not None else "writing an output"
        return f"{where}: {_OS_ADVICE[err.errno]} ({err.strerror or errno.errorcode[err.errno]})"
    if reason := database_error(err):
        return (
            f"a database file cannot be used ({reason}): MLflow's store (mlflow.tracking_uri, or "
            f"MLFLOW_TRACKING_URI) or Optuna's (tune.storage); {database_advice(reason)}"
        )
    return None


def database_error(err: BaseException) -> str | None:
    """The database's own reason when ``err``, or what caused it (MLflow wraps them), is SQLite's or
    SQLAlchemy's error about the database (a damaged, locked or read-only file), else None. SQLAlchemy is only
    checked where it is loaded already."""
    for _ in range(5):  # MLflow's wrapper, SQLAlchemy's, then SQLite's own
        if reason := _database_reason(err):
            return reason
        if (cause := err.__cause__ or err.__context__) is None:
            return None
        err = cause
    return None


def _database_reason(err: BaseException) -> str | None:
    sqlalchemy_exc = sys.modules.get("sqlalchemy.exc")
    if sqlalchemy_exc is not None and isinstance(err, sqlalchemy_exc.DatabaseError):
        err = err.orig if isinstance(err.orig, BaseException) else err
    if isinstance(err, sqlite3.DatabaseError) or (
        sqlalchemy_exc is not None and isinstance(err, sqlalchemy_exc.DatabaseError)
    ):
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return None


def database_advice(reason: str) -> str:
    """What to do about a database file that SQLite refused for ``reason``."""
    if "locked" in reason:
        return "another process is writing to it (a running stage, dvc exp run, or a tool holding it): wait for it"
    if "readonly" in reason or "read-only" in reason:
        return "it is read-only: give write permission to it and its folder"
    if "unable to open" in reason:
        return "its folder does not exist or cannot be written"
    return (
        "the file is damaged or not a database (a copy cut short?): restore it from a backup, or move it aside "
        "to start a new empty one"
    )
