"""``deltatune serve``: many deltas served from one backbone behind an OpenAI-compatible HTTP API.

Needs the ``serve`` extra (FastAPI and uvicorn): ``pip install "deltatune[serve]"``.  :mod:`.engine` batches the
requests of all deltas together (:class:`~deltatune.bank.DeltaBank`); :mod:`.app` is the HTTP API.
"""

from .app import create_app
from .engine import Classification, Engine, QueueFull, Request

__all__ = ["Classification", "Engine", "QueueFull", "Request", "create_app"]
