"""Model-diffing analysis: per-latent labels, statistics, Latent Scaling, examples, causal
checks and holistic baselines. ``run_diff`` runs them all; each is usable on its own."""

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
from crosscoders.diff.causal import SourceSite, patch_test, splice_metrics
from crosscoders.diff.examples import (
    ExampleCollector,
    collect_examples,
    load_examples,
    save_examples,
)
from crosscoders.diff.graded import (
    GRADED_CATEGORIES,
    GradedConfig,
    bh_qvalues,
    fit_null,
    grade,
)
from crosscoders.diff.latent_scaling import (
    LatentScalingAccumulator,
    LatentScalingResult,
    TrulyExclusiveRule,
    latent_scaling,
    pick_latents,
)
from crosscoders.diff.lens import activation_difference, lens_tokens
from crosscoders.diff.run import DiffConfig, run_diff
from crosscoders.diff.similarity import linear_cka, similarity_matrix, svcca
from crosscoders.diff.stats import ActivationStats, activation_stats, analysis_pass
from crosscoders.diff.steering import steer
from crosscoders.diff.table import LatentTable, latent_table

__all__ = [
    "CATEGORIES",
    "GRADED_CATEGORIES",
    "PRESETS",
    "ActivationStats",
    "CategoryThresholds",
    "DiffConfig",
    "ExampleCollector",
    "GradedConfig",
    "LatentScalingAccumulator",
    "LatentScalingResult",
    "LatentTable",
    "SourceSite",
    "TrulyExclusiveRule",
    "activation_difference",
    "activation_stats",
    "analysis_pass",
    "bh_qvalues",
    "category_score",
    "classify_latents",
    "collect_examples",
    "decoder_cosine",
    "decoder_norms",
    "fit_null",
    "get_thresholds",
    "grade",
    "labels_from_scores",
    "latent_scaling",
    "latent_table",
    "lens_tokens",
    "linear_cka",
    "load_examples",
    "minder_norm_diff",
    "patch_test",
    "pick_latents",
    "relative_norm",
    "run_diff",
    "save_examples",
    "similarity_matrix",
    "splice_metrics",
    "steer",
    "svcca",
]
