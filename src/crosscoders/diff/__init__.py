"""Model-diffing analysis: per-latent statistics and shared / exclusive labels."""

from crosscoders.diff.categories import (
    CATEGORIES,
    PRESETS,
    CategoryThresholds,
    category_score,
    classify_latents,
    decoder_cosine,
    decoder_norms,
    get_thresholds,
    labels_from_scores,
    minder_norm_diff,
    relative_norm,
)

__all__ = [
    "CATEGORIES",
    "PRESETS",
    "CategoryThresholds",
    "category_score",
    "classify_latents",
    "decoder_cosine",
    "decoder_norms",
    "get_thresholds",
    "labels_from_scores",
    "minder_norm_diff",
    "relative_norm",
]
