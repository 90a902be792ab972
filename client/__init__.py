"""Python client for the taskserve HTTP API: `Client` (sync) and `AsyncClient` over httpx, sharing
one request builder (`client.calls`), with errors mapped back to the server's error classes."""

from client.api import AsyncClient, Client
from client.calls import Prediction

__all__ = ["AsyncClient", "Client", "Prediction"]
