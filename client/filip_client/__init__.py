"""gRPC client library for the served FILIP models (needs only tritonclient[grpc], numpy, Pillow).

    from filip_client import FilipClient            # AsyncFilipClient: same methods, awaitable
"""
from .aio import AsyncFilipClient
from .errors import (FilipConnectionError, FilipError, FilipInvalidInputError, FilipOverloadedError,
                     FilipServerError, FilipTimeoutError)
from .sync import FilipClient
from .types import Embeddings, Health, Hit, IndexReport, SearchResults
from filip_contract.prompts import DEFAULT_TEMPLATES

__all__ = ["FilipClient", "AsyncFilipClient", "Embeddings", "Health", "Hit", "IndexReport", "SearchResults", "DEFAULT_TEMPLATES", "FilipError",
           "FilipConnectionError", "FilipTimeoutError", "FilipInvalidInputError", "FilipServerError",
           "FilipOverloadedError"]
