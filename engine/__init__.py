"""FILIP inference engine: model, checkpoints, tokenizer, preprocessing, scoring, runtimes.

``engine`` imports nothing from ``export``, ``triton_models`` or ``client``.
"""
