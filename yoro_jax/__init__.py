"""yoro-jax: You Only Reason Once, in JAX/Flax."""

from yoro_jax.checkpoint import Model, load_model
from yoro_jax.config import LlamaConfig
from yoro_jax.yoro import Yoro, YoroConfig

__all__ = ["LlamaConfig", "Model", "Yoro", "YoroConfig", "load_model"]
__version__ = "0.1.0"
