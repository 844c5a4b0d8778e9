"""A Kubernetes API emulator that keeps the semantics the relay and kubectl rely on."""
