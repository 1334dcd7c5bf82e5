"""Exit policies: one module per policy, collected in a registry.

``build_policy("mess", pixel_threshold=0.9)`` makes one; ``policy_from_dict`` rebuilds a
fitted one from a bundle's ``policy:`` entry. See ``docs/calibrate.md`` for formulas.
"""
from mexify.policies.base import (
    PROB_EDGES,
    Policy,
    PolicyFit,
    available_policies,
    boundary_mask,
    build_policy,
    policy_class,
    policy_from_dict,
    policy_options,
    prob_bins,
    register_policy,
    snap_to_edge,
)
from mexify.policies.cbt import CBTPolicy, class_thresholds_from_means, pixel_level_flops
from mexify.policies.class_means import ClassMeansPolicy
from mexify.policies.entropy import EntropyPolicy, mean_entropy
from mexify.policies.fft import FFTPolicy, band_energy
from mexify.policies.learned import LearnedPolicy
from mexify.policies.maxprob import MaxProbPolicy
from mexify.policies.mess import MessPolicy
from mexify.policies.oracle import OraclePolicy

__all__ = [
    "Policy",
    "PolicyFit",
    "register_policy",
    "build_policy",
    "policy_class",
    "policy_options",
    "available_policies",
    "policy_from_dict",
    "PROB_EDGES",
    "prob_bins",
    "snap_to_edge",
    "boundary_mask",
    "MessPolicy",
    "EntropyPolicy",
    "FFTPolicy",
    "band_energy",
    "MaxProbPolicy",
    "LearnedPolicy",
    "CBTPolicy",
    "ClassMeansPolicy",
    "OraclePolicy",
    "class_thresholds_from_means",
    "pixel_level_flops",
    "mean_entropy",
]
