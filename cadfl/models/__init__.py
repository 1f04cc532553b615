"""CNN definitions as data (`ModelSpec`) and the builder that turns them into modules."""

from .spec import (
    GroupedLinear,
    Layer,
    ModelSpec,
    SpecError,
    build_loaded,
    build_model,
    count_params,
    state_shapes,
    with_classes,
)
from .zoo import MODELS, get_model

__all__ = ["GroupedLinear", "Layer", "MODELS", "ModelSpec", "SpecError", "build_loaded",
           "build_model", "count_params", "get_model",
           "state_shapes", "with_classes"]
