#!/usr/bin/env bash
# Docker HEALTHCHECK: healthy when Triton is ready AND one tiny request to each model answers
# (python -m filip_client.health --deep, over gRPC).  /v2/health/ready alone stays 200 while a
# Python-backend stub is dead.
exec "${PYTHON:-python3}" -m filip_client.health --url "127.0.0.1:${FILIP_GRPC_PORT:-8001}" --deep --timeout "${FILIP_HEALTH_TIMEOUT:-15}"
