"""The files edgetwin ships beside its code: ``deploy/`` (CRDs, relay manifests, the
systemd unit, example configs, the test PKI script). In the repository ``edgetwin/deploy``
links to the top-level ``deploy/``; the wheel carries a copy at the same place, so an
installed edgetwin finds them without a checkout (``edgetwin cloud crds``)."""

from __future__ import annotations

from pathlib import Path

DEPLOY = Path(__file__).resolve().parent / "deploy"
CRDS = DEPLOY / "crds"


def crd_files() -> list[Path]:
    """The CustomResourceDefinitions edgetwin needs in a cluster, in a stable order."""
    return sorted(CRDS.glob("*.yaml"))


def crds_yaml() -> str:
    """Every CRD as one multi-document YAML stream, for ``kubectl apply -f -``."""
    texts = [p.read_text() for p in crd_files()]
    return "---\n".join(t if t.endswith("\n") else t + "\n" for t in texts)
