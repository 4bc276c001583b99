"""cablectl's server: HTTP surface, routing, model backends, keys, errors."""

__version__ = "0.1.0"

__all__ = ["__version__"]
