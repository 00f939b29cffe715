"""orch: converge a cluster of Apple-silicon Macs to a running MLX inference service."""

__version__ = "0.1.0"
