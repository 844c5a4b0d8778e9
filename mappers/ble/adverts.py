"""Advertising data (Core Spec Vol 3 Part C 11, Supplement Part A): the AD structures of
an advertisement or scan response, parsed into the fields bleak's ``AdvertisementData``
carries. Pure; used by the Bumble backend and tested on its own."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgetwin.mappers.ble.codec import BASE_UUID_SUFFIX, CodecError

AD_INCOMPLETE_16 = 0x02
AD_COMPLETE_16 = 0x03
AD_INCOMPLETE_32 = 0x04
AD_COMPLETE_32 = 0x05
AD_INCOMPLETE_128 = 0x06
AD_COMPLETE_128 = 0x07
AD_SHORT_NAME = 0x08
AD_COMPLETE_NAME = 0x09
AD_TX_POWER = 0x0A
AD_SERVICE_DATA_16 = 0x16
AD_SERVICE_DATA_32 = 0x20
AD_SERVICE_DATA_128 = 0x21
AD_MANUFACTURER = 0xFF


def uuid_from_le(raw: bytes) -> str:
    """A 2-, 4- or 16-byte little-endian UUID as bleak's lower-case 128-bit string."""
    if len(raw) == 2:
        return f"0000{int.from_bytes(raw, 'little'):04x}{BASE_UUID_SUFFIX}"
    if len(raw) == 4:
        return f"{int.from_bytes(raw, 'little'):08x}{BASE_UUID_SUFFIX}"
    if len(raw) == 16:
        h = raw[::-1].hex()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    raise CodecError(f"a UUID has 2, 4 or 16 bytes, not {len(raw)}")


@dataclass(slots=True)
class ParsedAdvert:
    local_name: str | None = None
    manufacturer_data: dict[int, bytes] = field(default_factory=dict)
    service_data: dict[str, bytes] = field(default_factory=dict)
    service_uuids: list[str] = field(default_factory=list)
    tx_power: int | None = None

    def merge(self, other: ParsedAdvert) -> None:
        """Fold a scan response (or a newer advertisement) into this one."""
        if other.local_name is not None:
            self.local_name = other.local_name
        self.manufacturer_data.update(other.manufacturer_data)
        self.service_data.update(other.service_data)
        for u in other.service_uuids:
            if u not in self.service_uuids:
                self.service_uuids.append(u)
        if other.tx_power is not None:
            self.tx_power = other.tx_power


def parse_ad(data: bytes) -> ParsedAdvert:
    """Parse AD structures (length, type, payload). A truncated or malformed structure
    ends parsing; what was read before it is kept, as receivers in the field do."""
    out = ParsedAdvert()
    pos = 0
    while pos < len(data):
        length = data[pos]
        if length == 0:  # early termination padding
            break
        if pos + 1 + length > len(data):
            break
        ad_type, payload = data[pos + 1], bytes(data[pos + 2 : pos + 1 + length])
        pos += 1 + length
        if ad_type in (
            AD_INCOMPLETE_16,
            AD_COMPLETE_16,
            AD_INCOMPLETE_32,
            AD_COMPLETE_32,
            AD_INCOMPLETE_128,
            AD_COMPLETE_128,
        ):
            size = {AD_INCOMPLETE_16: 2, AD_COMPLETE_16: 2, AD_INCOMPLETE_32: 4, AD_COMPLETE_32: 4}.get(
                ad_type, 16
            )
            for i in range(0, len(payload) - size + 1, size):
                u = uuid_from_le(payload[i : i + size])
                if u not in out.service_uuids:
                    out.service_uuids.append(u)
        elif ad_type in (AD_SHORT_NAME, AD_COMPLETE_NAME):
            if ad_type == AD_COMPLETE_NAME or out.local_name is None:
                out.local_name = payload.decode("utf-8", errors="replace")
        elif ad_type == AD_TX_POWER and len(payload) == 1:
            out.tx_power = int.from_bytes(payload, "little", signed=True)
        elif ad_type in (AD_SERVICE_DATA_16, AD_SERVICE_DATA_32, AD_SERVICE_DATA_128):
            size = {AD_SERVICE_DATA_16: 2, AD_SERVICE_DATA_32: 4}.get(ad_type, 16)
            if len(payload) >= size:
                out.service_data[uuid_from_le(payload[:size])] = payload[size:]
        elif ad_type == AD_MANUFACTURER and len(payload) >= 2:
            out.manufacturer_data[int.from_bytes(payload[:2], "little")] = payload[2:]
    return out


def build_ad(
    *,
    name: str | None = None,
    service_uuids16: list[int] = (),  # type: ignore[assignment]
    manufacturer: tuple[int, bytes] | None = None,
    service_data16: tuple[int, bytes] | None = None,
    flags: int | None = 0x06,
) -> bytes:
    """AD structures for an advertisement (used by the simulator and tests)."""
    parts: list[tuple[int, bytes]] = []
    if flags is not None:
        parts.append((0x01, bytes([flags])))
    if name is not None:
        parts.append((AD_COMPLETE_NAME, name.encode()))
    if service_uuids16:
        parts.append((AD_COMPLETE_16, b"".join(u.to_bytes(2, "little") for u in service_uuids16)))
    if service_data16 is not None:
        parts.append((AD_SERVICE_DATA_16, service_data16[0].to_bytes(2, "little") + service_data16[1]))
    if manufacturer is not None:
        parts.append((AD_MANUFACTURER, manufacturer[0].to_bytes(2, "little") + manufacturer[1]))
    out = b"".join(bytes([len(p) + 1, t]) + p for t, p in parts)
    if len(out) > 31:
        raise CodecError(f"legacy advertising data holds 31 bytes, this needs {len(out)}")
    return out
