"""The cloud relay (``edgetwin cloud run``): gRPC server for gateways, Kubernetes client
for Device status. It imports ``deviceapi``, ``runtime`` and ``sync``, never ``gateway``."""
