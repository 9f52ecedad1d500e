"""Credentials in URIs: found, so params.yaml can refuse them, and masked in any text that is shown or logged.

A password in ``tune.storage`` or ``mlflow.tracking_uri`` would be copied into ``dvc.lock`` (both are
stage params), logged as an MLflow param and inside ``params.json``. Secrets come from the
environment instead, where each client already looks: ``PGPASSWORD`` or ``~/.pgpass`` for PostgreSQL
(libpq), ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` / ``MLFLOW_TRACKING_TOKEN`` for an
MLflow server. ``redact`` is applied to what is logged and to error messages all the same, so a URI
given in the environment (``MLFLOW_TRACKING_URI``) is never printed with its password either.
"""

from __future__ import annotations

import re

MASK = "***"
# Query parameters that carry a secret: ?password=, &token=, &api_key=, Azure SAS's &sig=, ...
_SECRET_NAME = (
    r"[^=&;\s?#]*(?:password|passwd|pwd|token|secret|api[_-]?key|access[_-]?key|signature|sig|credential)"
    r"[^=&;\s#]*"
)
_QUERY = re.compile(rf"(?P<key>[?&;]{_SECRET_NAME}=)(?P<value>[^&;\s#]+)", re.IGNORECASE)
# scheme://user:password@host: the password runs to the last '@' before the path. One slash is enough: a URI
# that went through ``pathlib.Path`` ('https:/user:pw@host/x.pth') still carries its password.
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*:/{1,2}[^:/@\s]*:)(?P<password>[^/\s]*)@")


def found_in(uri: str) -> list[str]:
    """What secrets ``uri`` holds: 'a password', 'a token (query parameter token)'..., or []."""
    found = ["a password"] if _USERINFO.search(uri) else []
    found += [f"a secret query parameter ({m.group('key')[1:-1]})" for m in _QUERY.finditer(uri)]
    return found


def redact(text: str) -> str:
    """``text`` with every URI password and secret query value replaced by ``***``."""
    text = _USERINFO.sub(lambda m: f"{m.group('head')}{MASK}@", text)
    return _QUERY.sub(lambda m: f"{m.group('key')}{MASK}", text)


def refuse_in_params(key: str, uri: str) -> None:
    """Raise ``ValueError`` (naming ``key``, never the secret) when a params URI holds a credential."""
    if found := found_in(uri):
        raise ValueError(
            f"{key} holds {' and '.join(found)}: params.yaml values are copied into dvc.lock and "
            "logged to MLflow, so take secrets from the environment instead (PGPASSWORD or ~/.pgpass "
            "for PostgreSQL; MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or "
            "MLFLOW_TRACKING_TOKEN, for an MLflow server); see docs/tuning.md"
        )
