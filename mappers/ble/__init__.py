"""The BLE mapper: config (visitors), codec and sig (value formats), adverts, radio
(slots, scanning, device state), bumble_backend (a Bumble central for bleak), mapper."""
