"""filip_search: top-k gallery search by late interaction (TEXT), a gallery reload (RELOAD), or a status request (neither).

The Triton Python-backend model is filip_engine.adapters.SearchModel."""
from filip_engine.adapters import SearchModel as TritonPythonModel  # noqa: F401
