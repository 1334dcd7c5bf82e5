"""What sits around the runtime: accuracy against labels, timing and benchmarks, image files, plots."""
from mexify.tools.benchmark import BenchReport, bench, original_model, original_runner
from mexify.tools.engines import ENGINES, EngineReport, OnnxEngine, compare_engines, make_engine, time_policies
from mexify.tools.export import ExportResult, export_bundle
from mexify.tools.evaluation import (BudgetObservation, BudgetVerdict, EvalReport, ExitResult, PolicyResult, PredictedLatency, budget_verdict,
                                     evaluate, evaluate_policy, policy_budget_check)
from mexify.tools.images import PredictReport, collect_images, palette, predict_images, predictions_out, read_image, to_tensor
from mexify.tools.plots import save_comparison, save_pareto
from mexify.tools.latency import LatencyProfile, ProfileReport, profile_key, profile_latency, select_profile
from mexify.tools.timing import synchronize, time_call, time_calls, timed_pass

__all__ = [
    "evaluate",
    "evaluate_policy",
    "EvalReport",
    "ExitResult",
    "PolicyResult",
    "PredictedLatency",
    "BudgetObservation",
    "BudgetVerdict",
    "budget_verdict",
    "policy_budget_check",
    "bench",
    "BenchReport",
    "original_model",
    "original_runner",
    "ENGINES",
    "EngineReport",
    "OnnxEngine",
    "compare_engines",
    "make_engine",
    "ExportResult",
    "export_bundle",
    "time_call",
    "time_calls",
    "timed_pass",
    "synchronize",
    "collect_images",
    "read_image",
    "to_tensor",
    "palette",
    "predict_images",
    "PredictReport",
    "predictions_out",
    "save_pareto",
    "save_comparison",
    "time_policies",
    "LatencyProfile",
    "ProfileReport",
    "profile_latency",
    "profile_key",
    "select_profile",
]
