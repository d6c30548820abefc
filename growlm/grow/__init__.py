"""Growth: pure maps from a small model's parameters (and optimizer state) to a larger one's."""

from growlm.grow.core import Grown, grow, grown_config, is_exact, validate
from growlm.grow.plan import DEPTH_METHODS, WIDTH_METHODS, GrowthPlan, layer_sources

__all__ = ["Grown", "GrowthPlan", "grow", "grown_config", "is_exact", "validate",
           "layer_sources", "WIDTH_METHODS", "DEPTH_METHODS"]
