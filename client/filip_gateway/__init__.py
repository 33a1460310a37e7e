"""filip-gateway: an OpenAI-compatible HTTP gateway in front of the served FILIP models
(FastAPI + uvicorn, talking to Triton through filip_client.AsyncFilipClient; no torch).

    pip install './client[gateway]'
    filip-gateway --triton localhost:8001 --port 8080 --api-key sk-local

Endpoints and fields: README.md, "HTTP gateway".
"""
from .app import GatewaySettings, create_app

__all__ = ["GatewaySettings", "create_app"]
