"""edgetwin's release, as installed (gateway and relay report it to each other and in
the Gateway resource)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgetwin")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
