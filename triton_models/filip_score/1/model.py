"""filip_score: late-interaction scores between given embeddings.

The Triton Python-backend model is filip_engine.adapters.ScoreModel."""
from filip_engine.adapters import ScoreModel as TritonPythonModel  # noqa: F401
