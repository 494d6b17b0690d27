"""The live status page (`GET /status`) and its data (`GET /status.json`)."""

from .board import StatusBoard, page

__all__ = ["StatusBoard", "page"]
