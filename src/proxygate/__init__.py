"""proxygate: HTTP/HTTPS forward proxy and LLM inference gateway."""

__version__ = "0.1.0"
__all__ = ["__version__"]
