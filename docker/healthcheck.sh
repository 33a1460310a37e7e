#!/usr/bin/env bash
# Docker HEALTHCHECK: healthy once Triton reports every model ready (KServe v2 over HTTP).
exec curl -fsS -o /dev/null --max-time 5 "http://127.0.0.1:${FILIP_HTTP_PORT:-8000}/v2/health/ready"
