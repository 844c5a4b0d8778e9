"""Packed status: a stream's ``status`` messages as one binary body, near the
information floor of what they carry (the ``packed`` message of edgetwin/sync/wire.py,
used when the relay's welcome names ``packedStatus``; docs/sync-protocol.md).

A reported value in Device status is ``{"value": "-417.23", "metadata": {"timestamp":
"1796624348685", "version": "7", "type": "float"}}`` under its property's name, in a
message naming the device and its outbox revision: ~100 bytes of msgpack, of which a
reading holds about 17 bits. Per stream and direction both ends keep what the stream
already said, so only what is new travels:

- device and property names (a property with its type) are given an index the first
  time they appear on the stream and named by it after;
- revisions and timestamps as the difference from the previous one on the stream;
- a property's version as the difference from its previous one on the stream, left out
  when it is one more;
- the value's text in the shortest exact form: a decimal integer with a count of
  decimals (``-417.23`` is -41723, 2), a float32 or float64 whose ``repr`` is the text,
  or the text itself. The decoder rebuilds the same text; the encoder picks a form only
  after checking that it does.

Everything else of a status patch (device state, conditions, desired acknowledgements,
read errors, removals, reported values with other metadata) travels beside them as
msgpack. Indices and previous values live only as long as the stream: frames on a
stream are decoded once each, in order (``Incoming`` refuses a gap), and a new stream
starts with empty tables at both ends. Pure: no I/O.

Body: records, each
``dev rev_delta (nprops << 1 | has_rest) prop* [rest_len rest]``, a prop
``(ref << 1 | version_given) [version_delta] value ts_delta``; a ``ref`` (device or
property) is 0 followed by its definition (names, utf-8, length first; a property's
type after its name) or index + 1; numbers are LEB128 varints, signed ones zigzag; a
value is a varint ``h`` whose low 2 bits say the form: 0 text of ``h >> 2`` bytes,
1 decimal (``h >> 2`` decimals, then the signed integer), 2 float32, 3 float64 (little
endian).
"""

from __future__ import annotations

import re
import struct
from typing import Any

import msgpack

from edgetwin.sync.patch import compose_into

# Bounds a decoder enforces (a hostile or broken peer gets a WireError, not our memory).
MAX_NAMES = 1 << 16  # devices, and (property, type) pairs, per stream
MAX_NAME_BYTES = 1024
MAX_TRACKED = 1 << 20  # (device, property) version cursors per stream
_DECIMAL = re.compile(r"-?[0-9]{1,19}(?:\.[0-9]{1,19})?")
_F32 = struct.Struct("<f")
_F64 = struct.Struct("<d")
_META = frozenset({"timestamp", "version", "type"})


class PackError(ValueError):
    """A packed body is malformed; the message says where."""


# --------------------------------------------------------------------------- varints
def _uvarint(out: bytearray, n: int) -> None:
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _svarint(out: bytearray, n: int) -> None:
    _uvarint(out, (n << 1) if n >= 0 else ((-n) << 1) - 1)


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def uvarint(self) -> int:
        n = shift = 0
        data = self.data
        while True:
            if self.pos >= len(data):
                raise PackError(f"body ends inside a number at byte {self.pos}")
            if shift > 63:
                raise PackError(f"number over 64 bits at byte {self.pos}")
            b = data[self.pos]
            self.pos += 1
            n |= (b & 0x7F) << shift
            if b < 0x80:
                return n
            shift += 7

    def svarint(self) -> int:
        n = self.uvarint()
        return (n >> 1) if not n & 1 else -((n + 1) >> 1)

    def take(self, size: int) -> bytes:
        if size > len(self.data) - self.pos:
            raise PackError(f"body ends inside a {size}-byte field at byte {self.pos}")
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def text(self, limit: int = MAX_NAME_BYTES) -> str:
        size = self.uvarint()
        if size > limit:
            raise PackError(f"a name of {size} bytes (at most {limit}) at byte {self.pos}")
        try:
            return self.take(size).decode("utf-8")
        except UnicodeDecodeError:
            raise PackError(f"a name that is not utf-8 at byte {self.pos}") from None


# --------------------------------------------------------------------------- values
def _decimal_text(mantissa: int, decimals: int) -> str:
    digits = str(abs(mantissa)).rjust(decimals + 1, "0")
    text = f"{digits[:-decimals]}.{digits[-decimals:]}" if decimals else digits
    return f"-{text}" if mantissa < 0 else text


def _pack_value(out: bytearray, text: str) -> None:
    """The shortest of the forms whose decoding gives ``text`` back exactly."""
    raw = text.encode("utf-8", "surrogatepass")
    plain = bytearray()
    _uvarint(plain, len(raw) << 2)
    plain += raw
    forms = [bytes(plain)]
    if _DECIMAL.fullmatch(text):
        head, _, frac = text.partition(".")
        mantissa = int(head + frac)
        if (
            abs(mantissa) < 1 << 62 and _decimal_text(mantissa, len(frac)) == text
        ):  # no "-0", no leading zeros
            form = bytearray()
            _uvarint(form, len(frac) << 2 | 1)
            _svarint(form, mantissa)
            forms.append(bytes(form))
    if min(map(len, forms)) > 5:
        try:
            number = float(text)
        except ValueError:
            number = None
        if number is not None:
            try:
                f32 = _F32.unpack(_F32.pack(number))[0]
            except OverflowError:
                f32 = None
            if f32 is not None and repr(f32) == text:
                forms.append(b"\x02" + _F32.pack(f32))
            elif repr(number) == text:
                forms.append(b"\x03" + _F64.pack(number))
    out += min(forms, key=len)


def _unpack_value(r: _Reader) -> str:
    h = r.uvarint()
    form, arg = h & 3, h >> 2
    if form == 0:
        if arg > 1 << 16:
            raise PackError(f"a value of {arg} bytes at byte {r.pos}")
        try:
            return r.take(arg).decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise PackError(f"a value that is not utf-8 at byte {r.pos}") from None
    if form == 1:
        if arg > 19:
            raise PackError(f"a decimal with {arg} decimals at byte {r.pos}")
        return _decimal_text(r.svarint(), arg)
    if form == 2:
        return repr(_F32.unpack(r.take(4))[0])
    return repr(_F64.unpack(r.take(8))[0])


def _int_text(value: Any) -> int | None:
    """The int a canonical decimal string holds, else None."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and str(int(value)) == value:
        return int(value)
    return None


# --------------------------------------------------------------------------- codec
class _Tables:
    def __init__(self) -> None:
        self.devices: list[str] = []
        self.props: list[tuple[str, str]] = []
        self.versions: dict[int, int] = {}  # dev index << 16 | prop index -> last version
        self.rev = 0
        self.ts = 0


class StatusPacker(_Tables):
    """One stream's encoder: ``status`` messages in, one ``packed`` body out. Bodies must
    be sent in the order they were packed, on the stream they were packed for."""

    def __init__(self) -> None:
        super().__init__()
        self._dev_index: dict[str, int] = {}
        self._prop_index: dict[tuple[str, str], int] = {}

    def pack(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``messages`` with every ``status`` that can be packed (not a part, a device
        name within the bounds, room in the tables) in one ``packed`` message in their
        place; the others as they are, after it. The relay composes a device's messages
        by revision, so the order between the two does not matter."""
        out = bytearray()
        others: list[dict[str, Any]] = []
        for msg in messages:
            dev = msg.get("dev")
            if (
                msg.get("t") != "status"
                or "part" in msg
                or not isinstance(dev, str)
                or len(dev.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES
                or (dev not in self._dev_index and len(self.devices) >= MAX_NAMES)
                or not 0 < msg["rev"] < 1 << 63
            ):
                others.append(msg)
                continue
            self._record(out, dev, msg["rev"], msg["patch"])
        return ([{"t": "packed", "b": bytes(out)}] if out else []) + others

    def _record(self, out: bytearray, dev: str, rev: int, patch: dict[str, Any]) -> None:
        dev_i = self._dev_index.get(dev)
        if dev_i is None:
            out.append(0)
            raw = dev.encode("utf-8", "surrogatepass")
            _uvarint(out, len(raw))
            out += raw
            dev_i = self._dev_index[dev] = len(self.devices)
            self.devices.append(dev)
        else:
            _uvarint(out, dev_i + 1)
        _svarint(out, rev - self.rev)
        self.rev = rev
        rest, reported = _split(patch)
        room = MAX_NAMES - len(self.props) - len({(r[0], r[4]) for r in reported} - self._prop_index.keys())
        if room < 0:  # the property table is full (a stream's worth of names): as msgpack
            rest, reported = patch, []
        _uvarint(out, len(reported) << 1 | (1 if rest else 0))
        for name, value, ts, version, typ in reported:
            key = (name, typ)
            prop_i = self._prop_index.get(key)
            last = self.versions.get(dev_i << 16 | prop_i, 0) if prop_i is not None else 0
            given = 0 if version == last + 1 else 1
            if prop_i is None:
                _uvarint(out, given)
                for part in key:
                    raw = part.encode("utf-8", "surrogatepass")
                    _uvarint(out, len(raw))
                    out += raw
                prop_i = self._prop_index[key] = len(self.props)
                self.props.append(key)
            else:
                _uvarint(out, (prop_i + 1) << 1 | given)
            if given:
                _svarint(out, version - last)
            self.versions[dev_i << 16 | prop_i] = version
            _pack_value(out, value)
            _svarint(out, ts - self.ts)
            self.ts = ts
        if rest:
            raw = msgpack.packb(rest, use_bin_type=True)
            _uvarint(out, len(raw))
            out += raw


def _split(patch: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str, int, int, str]]]:
    """(the rest of the patch, the reported values in the compact shape)."""
    twins = patch.get("twins")
    if not isinstance(twins, dict):
        return patch, []
    reported: list[tuple[str, str, int, int, str]] = []
    rest_twins: dict[str, Any] = {}
    for name, entry in twins.items():
        rep = entry.get("reported") if isinstance(entry, dict) else None
        meta = rep.get("metadata") if isinstance(rep, dict) else None
        if (
            isinstance(rep, dict)
            and rep.keys() == {"value", "metadata"}
            and isinstance(meta, dict)
            and meta.keys() == _META
            and isinstance(rep["value"], str)
            and isinstance(meta["type"], str)
            and len(name.encode("utf-8", "surrogatepass")) <= MAX_NAME_BYTES
            and len(meta["type"]) <= 64
        ):
            ts, version = _int_text(meta["timestamp"]), _int_text(meta["version"])
            if ts is not None and version is not None and ts < 1 << 62 and 1 <= version < 1 << 62:
                reported.append((name, rep["value"], ts, version, meta["type"]))
                others = {k: v for k, v in entry.items() if k != "reported"}
                if others:
                    rest_twins[name] = others
                continue
        rest_twins[name] = entry
    if not reported:
        return patch, []
    rest = {k: v for k, v in patch.items() if k != "twins"}
    if rest_twins:
        rest["twins"] = rest_twins
    return rest, reported


class StatusUnpacker(_Tables):
    """One stream's decoder: a ``packed`` body back into the ``status`` messages it was
    packed from (equal to them). Raises :class:`PackError`; after one, the stream's
    tables are unusable and the stream must end."""

    def unpack(self, body: bytes) -> list[dict[str, Any]]:
        r = _Reader(body)
        messages: list[dict[str, Any]] = []
        while r.pos < len(body):
            messages.append(self._record(r))
        return messages

    def _record(self, r: _Reader) -> dict[str, Any]:
        ref = r.uvarint()
        if ref == 0:
            if len(self.devices) >= MAX_NAMES:
                raise PackError(f"more than {MAX_NAMES} devices on one stream")
            dev_i = len(self.devices)
            self.devices.append(r.text())
        elif ref > len(self.devices):
            raise PackError(f"device index {ref - 1} was never defined (byte {r.pos})")
        else:
            dev_i = ref - 1
        self.rev += r.svarint()
        if self.rev <= 0:
            raise PackError(f"revision {self.rev} (byte {r.pos})")
        h = r.uvarint()
        twins: dict[str, Any] = {}
        for _ in range(h >> 1):
            ph = r.uvarint()
            ref, given = ph >> 1, ph & 1
            if ref == 0:
                if len(self.props) >= MAX_NAMES:
                    raise PackError(f"more than {MAX_NAMES} properties on one stream")
                prop_i = len(self.props)
                self.props.append((r.text(), r.text(64)))
            elif ref > len(self.props):
                raise PackError(f"property index {ref - 1} was never defined (byte {r.pos})")
            else:
                prop_i = ref - 1
            key = dev_i << 16 | prop_i
            last = self.versions.get(key, 0)
            version = last + (r.svarint() if given else 1)
            if version <= 0:
                raise PackError(f"version {version} (byte {r.pos})")
            if key not in self.versions and len(self.versions) >= MAX_TRACKED:
                raise PackError(f"more than {MAX_TRACKED} properties tracked on one stream")
            self.versions[key] = version
            value = _unpack_value(r)
            self.ts += r.svarint()
            if self.ts < 0:
                raise PackError(f"timestamp {self.ts} (byte {r.pos})")
            name, typ = self.props[prop_i]
            meta = {"timestamp": str(self.ts), "version": str(version), "type": typ}
            twins[name] = {"reported": {"value": value, "metadata": meta}}
        patch: dict[str, Any] = {}
        if h & 1:
            raw = r.take(r.uvarint())
            try:
                rest = msgpack.unpackb(raw, raw=False, strict_map_key=True)
            except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as exc:
                raise PackError(f"the rest of a status is not msgpack: {exc}") from None
            if not isinstance(rest, dict):
                raise PackError(f"the rest of a status is a map, not {type(rest).__name__}")
            patch = rest
        if twins:
            compose_into(patch, {"twins": twins})
        return {"t": "status", "dev": self.devices[dev_i], "rev": self.rev, "patch": patch}
