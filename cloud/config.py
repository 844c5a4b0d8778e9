"""The relay's YAML config (``edgetwin cloud run --config relay.yaml``); docs/relay.md
is the reference for every key::

    listen: "0.0.0.0:7443"
    tls: {cert_file: relay.pem, key_file: relay-key.pem, ca_file: ca.pem}
    kubeconfig: null            # null: in-cluster service account, else $KUBECONFIG or ~/.kube/config
    context: null               # a kubeconfig context other than its current one
    minStatusInterval: 5s       # at most one status write per Device per interval
    nodeSelector: auto          # auto | field | label: how a node's Devices are selected
    linkDeadAfter: 45s          # a stream silent this long is dead
    name: null                  # this replica in Gateway status: null = $POD_NAME or the host name
    gatewayStatus: {interval: 30s, heartbeat: 60s, staleAfter: 180s}
    log: {level: INFO, format: text}

A bad file is refused with :class:`RelayConfigError` naming the key.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgetwin.deviceapi import yaml_strict
from edgetwin.deviceapi.problems import compose_all, locate_errors, report
from edgetwin.deviceapi.types import check_host_port, parse_duration_ms


class RelayConfigError(ValueError):
    """The relay's configuration is unusable; the message names the key."""


class RelayTls(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cert_file: Path
    key_file: Path
    ca_file: Path  # the CA that signs gateway (client) certificates


class RelayLog(BaseModel):
    model_config = ConfigDict(extra="forbid")

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class GatewayStatusConfig(BaseModel):
    """How often the relay writes each node's Gateway status (cloud/gateway_status.py)."""

    model_config = ConfigDict(extra="forbid")

    interval: int = 30_000  # ms: at most one write per gateway per interval for changed stats
    heartbeat: int = 60_000  # ms: an unchanged connected gateway's lastSeenTime is refreshed
    staleAfter: int = 180_000  # ms: a Gateway no replica refreshed is marked disconnected

    @field_validator("interval", "heartbeat", "staleAfter", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> int:
        return parse_duration_ms(v)

    @model_validator(mode="after")
    def _order(self) -> GatewayStatusConfig:
        if self.staleAfter < 2 * self.heartbeat:
            raise ValueError(
                f"staleAfter ({self.staleAfter} ms) must be at least twice heartbeat ({self.heartbeat} ms), "
                "or live gateways would be swept as stale"
            )
        return self


class RelayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    listen: str = "0.0.0.0:7443"
    tls: RelayTls
    kubeconfig: Path | None = None
    context: str | None = None
    minStatusInterval: int = Field(5_000, ge=0)  # ms
    # How a node's Devices are selected: by the spec.nodeName field selector (CRD
    # selectableFields, Kubernetes 1.31+), by the edgetwin.io/node label, or auto: the
    # field, falling back to the label where the API server refuses it.
    nodeSelector: Literal["auto", "field", "label"] = "auto"
    # A stream silent this long is taken as dead (gateways send a heartbeat after 24 s of silence).
    linkDeadAfter: int = 45_000  # ms
    name: str | None = Field(None, max_length=253)
    gatewayStatus: GatewayStatusConfig = Field(default_factory=GatewayStatusConfig)
    log: RelayLog = Field(default_factory=RelayLog)
    # Plaintext gRPC health (grpc.health.v1) for kubelet's grpc probes, e.g.
    # "0.0.0.0:7444"; off when unset. The sync port always serves the same health
    # service behind mutual TLS.
    healthListen: str | None = None
    # Prometheus /metrics and /healthz over HTTP, e.g. "0.0.0.0:9464"; off when unset.
    metricsListen: str | None = None
    # How often readiness asks the API server whether it answers (one GET each time).
    apiProbeInterval: int = Field(10_000, ge=1_000)  # ms
    # The relay's own API request rate (token bucket, as client-go's QPS/Burst); 0: no limit.
    apiQPS: float = Field(100.0, ge=0)
    apiBurst: int = Field(200, ge=1)

    @field_validator("minStatusInterval", "linkDeadAfter", "apiProbeInterval", mode="before")
    @classmethod
    def _interval(cls, v: Any) -> int:
        return parse_duration_ms(v)

    @field_validator("listen", "healthListen", "metricsListen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        return None if v is None else check_host_port(v, "(e.g. 0.0.0.0:7443 or [::]:7443)")


def load_relay_config(path: str | Path) -> RelayConfig:
    p = Path(path)
    try:
        text = p.read_text()
        data = yaml_strict.safe_load(text)
    except OSError as exc:
        raise RelayConfigError(f"{p}: cannot read config: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise RelayConfigError(f"{p}: not YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RelayConfigError(f"{p}: the file must hold a YAML mapping of keys")
    try:
        cfg = RelayConfig.model_validate(data)
    except ValidationError as exc:
        nodes = compose_all(text)
        problems = locate_errors(exc, RelayConfig, nodes[0] if nodes else None, unknown="is not a known key")
        raise RelayConfigError(report(problems, str(p))) from None
    base = p.parent
    for name in ("cert_file", "key_file", "ca_file"):
        value = _resolve(base, getattr(cfg.tls, name))
        if not value.is_file():
            raise RelayConfigError(f"{p}: tls.{name}: {value} does not exist")
        setattr(cfg.tls, name, value)
    try:
        ssl.create_default_context().load_cert_chain(cfg.tls.cert_file, cfg.tls.key_file)
    except ssl.SSLError as exc:
        raise RelayConfigError(
            f"{p}: tls.key_file: {cfg.tls.key_file} is not the key of {cfg.tls.cert_file} "
            f"({exc.reason or exc})"
        ) from None
    if cfg.kubeconfig is not None:
        cfg.kubeconfig = _resolve(base, cfg.kubeconfig)
        if not cfg.kubeconfig.is_file():
            raise RelayConfigError(f"{p}: kubeconfig: {cfg.kubeconfig} does not exist")
    return cfg


def _resolve(base: Path, path: Path) -> Path:
    """``~`` is the user's home; a relative path is taken from the config's folder."""
    path = path.expanduser()
    return path if path.is_absolute() else base / path


def kube_config(cfg: RelayConfig, source: str = "") -> Any:
    """The Kubernetes client configuration the relay uses, or RelayConfigError saying
    what to set: ``kubeconfig`` (with ``context``), or with ``kubeconfig: null`` the
    in-cluster service account, then $KUBECONFIG, then ~/.kube/config."""
    from lightkube import KubeConfig
    from lightkube.core.exceptions import ConfigError

    where = f"{source}: " if source else ""
    try:
        kube = KubeConfig.from_file(cfg.kubeconfig) if cfg.kubeconfig is not None else KubeConfig.from_env()
    except ConfigError as exc:
        raise RelayConfigError(
            f"{where}kubeconfig: null means the in-cluster service account, $KUBECONFIG or ~/.kube/config, "
            f"and none is usable here ({exc}); set kubeconfig: to a kubeconfig file"
        ) from None
    try:
        return kube.get(context_name=cfg.context)
    except ConfigError as exc:
        contexts = ", ".join(sorted(getattr(kube, "contexts", {}) or {})) or "none"
        raise RelayConfigError(f"{where}context: {exc} (the kubeconfig has: {contexts})") from None
