"""camel.nn: modules and layers (one file per layer family, as in MLX).

Reading order: module.py (Module, Parameter, containers), linear.py, activation.py,
layernorm.py, embedding.py, attention.py.
"""

from .activation import GELU, ReLU
from .attention import MultiHeadAttention
from .embedding import Embedding
from .layernorm import LayerNorm
from .linear import Linear
from .module import Module, ModuleList, Parameter, Sequential


def __getattr__(name):  # a PyTorch name camel lacks: say what to use instead
    from camel import hints

    raise hints.missing("camel.nn", name)


__all__ = [
    "Module",
    "Parameter",
    "Sequential",
    "ModuleList",
    "Linear",
    "ReLU",
    "GELU",
    "LayerNorm",
    "Embedding",
    "MultiHeadAttention",
]
