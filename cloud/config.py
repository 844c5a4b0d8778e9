"""The relay's YAML config (``edgetwin cloud run --config relay.yaml``)::

    listen: "0.0.0.0:7443"
    tls: {cert_file: relay.pem, key_file: relay-key.pem, ca_file: ca.pem}
    kubeconfig: null            # null: in-cluster service account (the Deployment)
    minStatusInterval: 5s       # at most one status write per Device per interval

A bad file is refused with :class:`RelayConfigError` naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from deviceapi.types import first_problem, parse_duration_ms


class RelayConfigError(ValueError):
    """The relay's configuration is unusable; the message names the key."""


class RelayTls(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cert_file: Path
    key_file: Path
    ca_file: Path  # the CA that signs gateway (client) certificates


class RelayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    listen: str = "0.0.0.0:7443"
    tls: RelayTls
    kubeconfig: Path | None = None
    minStatusInterval: int = Field(5_000, ge=0)  # ms

    @field_validator("minStatusInterval", mode="before")
    @classmethod
    def _interval(cls, v: Any) -> int:
        return parse_duration_ms(v)


def load_relay_config(path: str | Path) -> RelayConfig:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise RelayConfigError(f"{p}: cannot read config: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise RelayConfigError(f"{p}: not YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RelayConfigError(f"{p}: the file must hold a YAML mapping of keys")
    try:
        cfg = RelayConfig.model_validate(data)
    except ValidationError as exc:
        key, msg = first_problem(exc, unknown="is not a known key")
        raise RelayConfigError(f"{p}: {key}: {msg}" if key else f"{p}: {msg}") from None
    base = p.parent
    for name in ("cert_file", "key_file", "ca_file"):
        value = getattr(cfg.tls, name)
        value = value if value.is_absolute() else base / value
        if not value.is_file():
            raise RelayConfigError(f"{p}: tls.{name}: {value} does not exist")
        setattr(cfg.tls, name, value)
    if cfg.kubeconfig is not None:
        cfg.kubeconfig = cfg.kubeconfig if cfg.kubeconfig.is_absolute() else base / cfg.kubeconfig
        if not cfg.kubeconfig.is_file():
            raise RelayConfigError(f"{p}: kubeconfig: {cfg.kubeconfig} does not exist")
    return cfg
