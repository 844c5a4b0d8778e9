"""Gateway configuration: one YAML file, validated at start.

A bad file is refused with :class:`ConfigError`, whose message names the key and what is
wrong (``mqtt.url: expected mqtt://host:port or mqtts://host:port``); the CLI exits with
status 2 on it. docs/configuration.md is the reference for every key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgetwin.deviceapi import yaml_strict
from edgetwin.deviceapi.problems import Problem, compose_all, locate_errors, parse_path, report
from edgetwin.deviceapi.types import check_host_port, parse_duration_ms

_NODE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


class ConfigError(ValueError):
    """The configuration is unusable; the message names the file, the line and column
    where known, the key and the problem, one line per problem (all of them)."""

    def __init__(
        self, key: str, problem: str, source: str = "", problems: list[Problem] | None = None
    ) -> None:
        self.problems = problems or [Problem(key, problem)]
        super().__init__(report(self.problems, source))
        self.key = self.problems[0].path
        self.problem = self.problems[0].message
        self.source = source


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StoreConfig(_Section):
    path: Path
    # The event log keeps this many newest rows; older ones are dropped.
    events_max: int = Field(10_000, ge=100, le=10_000_000)
    # Group commit: after the first change, wait this long for more before committing.
    # Trades a few ms of latency for far fewer fsyncs under load; 0 commits at once.
    commit_linger_ms: float = Field(2.0, ge=0, le=1000)
    # Where the COMMIT's fsync runs: "inline" on the event loop's thread, "thread" on a
    # writer thread, "auto" inline while fsyncs are fast (< 2 ms average).
    commit_mode: Literal["auto", "inline", "thread"] = "auto"


class TlsConfig(_Section):
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = False

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class EmbeddedBroker(_Section):
    # Always explicit: amqtt's own default would listen on 0.0.0.0:1883.
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=0, le=65535)


class MqttConfig(_Section):
    url: str | None = None
    embedded: EmbeddedBroker | None = None
    username: str | None = None
    password: str | None = None
    tls: TlsConfig | None = None
    client_id: str | None = None
    # MQTT 5 lets the gateway bound how many unacknowledged QoS 1 messages the broker
    # sends it (Receive Maximum); with 3.1.1 the broker's max_inflight_messages applies.
    protocol: Literal["5", "3.1.1"] = "5"
    receive_maximum: int = Field(1000, ge=1, le=65535)
    session_expiry: int = 7 * 24 * 3600_000  # ms; how long the broker keeps our session
    keepalive: int = Field(30, ge=5, le=3600)  # seconds
    max_payload: int = Field(64 * 1024, ge=256, le=16 * 1024 * 1024)
    # QoS of twin/update/result answers, one per update. Inbound twin traffic, deltas,
    # get results and retained values are QoS 1 regardless. 0 is safe here because an
    # answer is sent before the update is acknowledged on the same connection: if it is
    # lost with the connection, the update is redelivered and answered again. QoS 1
    # roughly halves peak ingest (docs/mqtt.md, "QoS").
    result_qos: Literal[0, 1] = 0
    # QoS 1 messages the gateway keeps in flight to the broker when the broker does not
    # announce its own limit (MQTT 3.1.1); an MQTT 5 broker's Receive Maximum wins.
    max_inflight_outgoing: int = Field(1000, ge=1, le=65535)
    # Outgoing messages queued while the broker is slow; beyond it they are dropped and
    # counted (every retained value is republished on reconnect).
    max_queued_outgoing: int = Field(20_000, ge=100, le=10_000_000)
    # How reported values are published for local apps, retained: one message per
    # property and change (edgetwin/{node}/{ns}/{name}/{property}), one document per
    # device and commit with all its values (.../{name}/_values: far cheaper when
    # devices report many values at once), or both (docs/mqtt.md, "Retained values").
    values: Literal["per_property", "per_device", "both"] = "per_property"

    @field_validator("session_expiry", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> int:
        return parse_duration_ms(v)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"expected mqtt://host:port or mqtts://host:port, got {v!r}")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"bad port in {v!r}") from None
        if port is None:  # no silent 1883/8883: say which port
            default = 8883 if parts.scheme == "mqtts" else 1883
            raise ValueError(f"give the port, e.g. {parts.scheme}://{parts.hostname}:{default}, got {v!r}")
        return v

    @model_validator(mode="after")
    def _one_broker(self) -> MqttConfig:
        if (self.url is None) == (self.embedded is None):
            raise ValueError("give exactly one of url (an external broker) or embedded")
        if self.embedded is not None and self.protocol == "5":
            # amqtt speaks MQTT 3.1.1.
            self.protocol = "3.1.1"
        return self

    @property
    def host_port(self) -> tuple[str, int]:
        if self.embedded is not None:
            return self.embedded.host, self.embedded.port
        assert self.url is not None
        parts = urlsplit(self.url)
        default = 8883 if parts.scheme == "mqtts" else 1883
        return parts.hostname or "127.0.0.1", parts.port or default

    @property
    def use_tls(self) -> bool:
        return self.tls is not None or (self.url or "").startswith("mqtts://")


class LogConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class HealthConfig(_Section):
    """Probes and metrics (docs/operations.md, "Health and watchdog")."""

    # HTTP /healthz and /metrics (Prometheus), e.g. 127.0.0.1:9464; off when unset.
    listen: str | None = None
    # A loop with work pending and no progress for this long is stuck: /healthz answers
    # 503 and systemd's watchdog is no longer fed. Above the uplink's dead-link time, so
    # a dead link is reconnected before it counts as stuck.
    stuck_after: int = Field(default=60_000, ge=1_000)  # ms

    @field_validator("stuck_after", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> int:
        return parse_duration_ms(v)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        return None if v is None else check_host_port(v, "with the port given (e.g. 127.0.0.1:9464)")


class UplinkConfig(_Section):
    """The link to the cloud relay (gRPC, mutual TLS)."""

    address: str  # host:port of the relay

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        return check_host_port(v, "with the port given (e.g. relay.example.com:7443)")

    ca_file: Path
    cert_file: Path  # this node's certificate (its common name is the node name)
    key_file: Path
    server_name: str | None = None  # the relay certificate's name, if not the address host
    # Link budget in bytes per second of frame payload (8,000 = 64 kbit/s), up and down
    # (budget_down_bps: the relay's pace towards this gateway; default budget_bps).
    budget_bps: int = Field(8_000, ge=100)
    budget_down_bps: int | None = Field(None, ge=100)
    batch_max: int = Field(500, ge=1, le=10_000)  # status messages per frame
    # A frame carries at most this many seconds of the budget, so a heartbeat never waits
    # behind more; larger outbox entries go in parts.
    frame_s: float = Field(2.0, ge=0.1, le=60)
    # After the outbox changes, gather this long before sending (more updates a frame).
    batch_window_ms: int = 500
    # Silence from the relay this long: send a heartbeat (echo request). Nothing at all
    # for dead_after_ms: the link is dead (noticed within 30 s with the defaults).
    heartbeat_ms: int = 24_000
    dead_after_ms: int = 27_000
    reconnect_min_ms: int = 500
    reconnect_max_ms: int = 30_000

    @field_validator(
        "batch_window_ms",
        "heartbeat_ms",
        "dead_after_ms",
        "reconnect_min_ms",
        "reconnect_max_ms",
        mode="before",
    )
    @classmethod
    def _durations(cls, v: Any) -> int:
        return parse_duration_ms(v)

    @model_validator(mode="after")
    def _timers(self) -> UplinkConfig:
        if self.heartbeat_ms >= self.dead_after_ms:
            raise ValueError(
                "heartbeat_ms must be shorter than dead_after_ms (the heartbeat keeps the link alive)"
            )
        if self.reconnect_min_ms > self.reconnect_max_ms:
            raise ValueError("reconnect_min_ms must not exceed reconnect_max_ms")
        return self


class WritesConfig(_Section):
    """How desired values are written to devices (deltas or mapper writes)."""

    # Delivered attempts before a write is marked failed. Attempts while the broker or
    # the device is down do not count: the schedule pauses instead.
    attempts: Annotated[int, Field(ge=1, le=1000)] = 8
    retry_min: int = 1_000  # ms before the second attempt, doubling up to retry_max
    retry_max: int = 60_000

    @field_validator("retry_min", "retry_max", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> int:
        return parse_duration_ms(v)

    @model_validator(mode="after")
    def _order(self) -> WritesConfig:
        if self.retry_min > self.retry_max:
            raise ValueError("retry_min must not exceed retry_max")
        return self


class GatewayConfig(_Section):
    node: str
    store: StoreConfig
    mqtt: MqttConfig
    manifests: list[Path] = Field(default_factory=list)
    log: LogConfig = Field(default_factory=LogConfig)
    health: HealthConfig = HealthConfig()
    # Options per mapper, by protocol name (passed to the mapper as given).
    mappers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    uplink: UplinkConfig | None = None
    writes: WritesConfig = WritesConfig()
    # Protocols served by external mappers over MQTT (no plugin installed for them):
    # their devices are Ready; a protocol neither installed nor listed here is not.
    external_protocols: list[str] = Field(default_factory=list)

    @field_validator("node")
    @classmethod
    def _node(cls, v: str) -> str:
        if not _NODE.match(v):
            raise ValueError(f"{v!r} is not a lowercase DNS-1123 name (a Kubernetes node name)")
        return v

    @field_validator("manifests", mode="before")
    @classmethod
    def _manifest_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


def _resolve(base: Path, path: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else (base / path)


def parse_config(
    data: Any, source: str = "", base: Path | None = None, node: yaml.Node | None = None
) -> GatewayConfig:
    """Validate a config mapping; relative paths are taken from ``base``. ``node`` is the
    composed YAML of ``data``: problems then carry its lines and columns."""
    if not isinstance(data, dict):
        raise ConfigError("", "the file must hold a YAML mapping of keys", source)
    try:
        cfg = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        problems = locate_errors(exc, GatewayConfig, node, unknown="is not a known key")
        raise ConfigError("", "", source, problems) from None
    try:
        _check_files(cfg, source, base)
    except ConfigError as exc:
        raise ConfigError("", "", source, [p.at(node, parse_path(p.path)) for p in exc.problems]) from None
    return cfg


def _check_files(cfg: GatewayConfig, source: str, base: Path | None) -> None:
    """What a valid config may still name wrongly: files that do not exist, a store
    path that is not a file; relative paths resolved from ``base`` on the way."""
    if base is not None:
        cfg.store.path = _resolve(base, cfg.store.path)
        cfg.manifests = [_resolve(base, m) for m in cfg.manifests]
        if cfg.mqtt.tls is not None:
            for name in ("ca_file", "cert_file", "key_file"):
                value = getattr(cfg.mqtt.tls, name)
                if value is not None:
                    setattr(cfg.mqtt.tls, name, _resolve(base, value))
    if cfg.mqtt.tls is not None:
        for name in ("ca_file", "cert_file", "key_file"):
            value = getattr(cfg.mqtt.tls, name)
            if value is not None and not Path(value).is_file():
                raise ConfigError(f"mqtt.tls.{name}", f"{value} does not exist", source)
    if cfg.uplink is not None:
        for name in ("ca_file", "cert_file", "key_file"):
            value = getattr(cfg.uplink, name)
            if base is not None:
                value = _resolve(base, value)
                setattr(cfg.uplink, name, value)
            if not Path(value).is_file():
                raise ConfigError(f"uplink.{name}", f"{value} does not exist", source)
    for index, path in enumerate(cfg.manifests):
        if not path.exists():
            raise ConfigError(f"manifests[{index}]", f"{path} does not exist", source)
    _check_store_path(Path(cfg.store.path), source)


def _check_store_path(path: Path, source: str) -> None:
    """What ``gateway run`` would fail on later: a folder, or a file that is not SQLite."""
    if path.is_dir():
        raise ConfigError(
            "store.path", f"{path} is a folder; give a file path, e.g. {path / 'store.db'}", source
        )
    if path.is_file():
        try:
            with path.open("rb") as f:
                head = f.read(16)
        except OSError as exc:
            raise ConfigError("store.path", f"cannot read {path}: {exc.strerror}", source) from None
        if head and head != b"SQLite format 3\x00":
            raise ConfigError("store.path", f"{path} exists and is not an SQLite database", source)


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate the YAML config at ``path``."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError("", f"cannot read config: {exc.strerror}", str(p)) from None
    try:
        data = yaml_strict.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"not valid YAML: {exc}", str(p)) from None
    nodes = compose_all(text)
    return parse_config(data, str(p), p.parent, nodes[0] if nodes else None)
