"""edgert.engine: serve loaded models with batching, caching, cascades, admission control and hot swap."""

from edgert.engine.cascade import DIGITS_DEFAULT_RULE, DIGITS_DEFAULT_THRESHOLD
from edgert.engine.config import CascadeConfig, InferResult, ModelConfig, ModelInfo, ServableModel
from edgert.engine.engine import Engine
from edgert.engine.served import INLINE_THRESHOLD_S, Progress

__all__ = [
    "DIGITS_DEFAULT_RULE",
    "DIGITS_DEFAULT_THRESHOLD",
    "INLINE_THRESHOLD_S",
    "CascadeConfig",
    "Engine",
    "InferResult",
    "ModelConfig",
    "ModelInfo",
    "Progress",
    "ServableModel",
]
