"""The edge <-> cloud sync contract, shared by the gateway's uplink and the relay: the
gRPC service generated from protos/edgetwin/sync/v1/sync.proto (``v1``) and the batches
inside its frames (``wire``). Imports neither ``gateway`` nor ``cloud``."""
