"""Transport security: the client talks TLS to a TLS-enabled tritonserver using a certificate
the test makes (with the openssl command), and sends per-call metadata, which the server
checks (a restricted inference protocol refuses calls without the right header)."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from filip_client import FilipClient, FilipConnectionError, FilipOverloadedError, FilipServerError
from filip_export.launch import TritonServer
from filip_export.to_trt import main as export_main

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")


def _certs(d):
    """A CA and a server certificate for 127.0.0.1 / localhost signed by it."""
    run = lambda *a: subprocess.run(["openssl", *a], cwd=d, check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=filip-test-ca",
        "-keyout", "ca.key", "-out", "ca.pem")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr")
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
        "-extfile", "san.ext", "-out", "server.pem")
    return d / "ca.pem", d / "server.pem", d / "server.key"


def test_tls_and_metadata(tiny_checkpoint, tmp_path):
    ca, cert, key = _certs(tmp_path)
    repo = tmp_path / "repo"
    assert export_main([str(tiny_checkpoint), "--out", str(repo)]) == 0
    tls = ["--grpc-use-ssl=true", f"--grpc-server-cert={cert}", f"--grpc-server-key={key}", f"--grpc-root-cert={ca}",
           # the server itself checks that the metadata arrives: inference without this header is refused
           "--grpc-restricted-protocol=inference:filip-key=test-token"]
    header = {"triton-grpc-protocol-filip-key": "test-token"}         # Triton's prefix for restricted-protocol keys
    with TritonServer(repo, extra=tls) as server:
        with FilipClient(server.url, ssl=True, root_certificates=str(ca), headers=header) as c:
            emb = c.embed_texts(["a photo of a cat"])
            assert emb.tokens.shape[0] == 1 and c.health().ok
        for headers in ({}, {"triton-grpc-protocol-filip-key": "wrong"}):   # TLS alone, or a wrong value
            with FilipClient(server.url, ssl=True, root_certificates=str(ca), headers=headers, timeout=10) as c:
                with pytest.raises(FilipServerError, match="restricted") as e:    # refused by the server itself
                    c.embed_texts(["a photo of a cat"])
                assert not isinstance(e.value, (FilipConnectionError, FilipOverloadedError)), e.value
        with FilipClient(server.url, timeout=5) as plain:   # no TLS: refused, as a connection error
            with pytest.raises(FilipConnectionError):
                plain.embed_texts(["a photo of a cat"])
