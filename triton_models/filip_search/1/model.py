"""filip_search: top-k gallery search by late interaction or pooled cosine (TEXT), a gallery reload (RELOAD), an append to a gallery (APPEND), or a status request (none of them).

The Triton Python-backend model is filip_engine.adapters.SearchModel."""
from filip_engine.adapters import SearchModel as TritonPythonModel  # noqa: F401
