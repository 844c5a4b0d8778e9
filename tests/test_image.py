"""The container images are built and run: ``scripts/image build`` (a Debian base from
Debian's packages, then the Containerfile with buildah) and ``scripts/image test`` (the
relay and the gateway started in their images as the non-root user, their health
endpoints answering; the relay image without the gateway's libraries). scripts/test
installs buildah and mmdebstrap."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(
    not (shutil.which("buildah") and shutil.which("mmdebstrap")),
    reason="buildah and mmdebstrap are not installed (scripts/test installs them)",
)
def test_the_images_build_and_serve_their_health_endpoints_as_a_non_root_user() -> None:
    built = subprocess.run(
        [str(ROOT / "scripts" / "image"), "build"], capture_output=True, text=True, timeout=900, cwd=ROOT
    )
    assert built.returncode == 0, built.stdout + built.stderr
    assert "built localhost/edgetwin-relay:" in built.stdout
    assert "built localhost/edgetwin-gateway:" in built.stdout
    tested = subprocess.run(
        [str(ROOT / "scripts" / "image"), "test"], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "relay: /healthz ok, gRPC health SERVING, as uid 65532" in tested.stdout
    assert "gateway: /healthz ok, as uid 65532" in tested.stdout
