"""The cloud relay (``edgetwin cloud run``): gRPC server for gateways, Kubernetes client
for Device status. Built with the cloud-sync issue; it will import ``deviceapi`` and
never ``gateway``."""
