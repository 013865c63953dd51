"""Frozen features: a disk cache of frozen towers' outputs and the wrapper frozen-feature methods share."""
from .cache import (
    CACHE_ENV,
    CacheStats,
    FeatureCache,
    ImageFeatures,
    default_cache_root,
    feature_space,
    image_item_key,
    text_item_key,
    tower_weight_names,
    weights_fingerprint,
)
from .wrapper import FrozenBackboneWrapper

__all__ = ["CACHE_ENV", "CacheStats", "FeatureCache", "FrozenBackboneWrapper", "ImageFeatures", "default_cache_root",
           "feature_space", "image_item_key", "text_item_key", "tower_weight_names", "weights_fingerprint"]
