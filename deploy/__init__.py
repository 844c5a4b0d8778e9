"""The files edgetwin ships beside its code, importable as ``edgetwin.deploy``: CRDs,
relay manifests, the systemd unit, example configs and the test PKI script. A source
checkout and an installed wheel find them the same way (``edgetwin cloud crds``)."""

from __future__ import annotations

from pathlib import Path

DEPLOY = Path(__file__).resolve().parent
CRDS = DEPLOY / "crds"


def crd_files() -> list[Path]:
    """The CustomResourceDefinitions edgetwin needs in a cluster, in a stable order."""
    return sorted(CRDS.glob("*.yaml"))


def crds_yaml() -> str:
    """Every CRD as one multi-document YAML stream, for ``kubectl apply -f -``."""
    texts = [p.read_text() for p in crd_files()]
    return "---\n".join(t if t.endswith("\n") else t + "\n" for t in texts)
