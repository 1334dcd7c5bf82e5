"""The MESS configuration search: per exit, off or one head candidate, and the thresholds (``calibrate --search``).

It also moves exits: with ``max_exits`` at most that many exits stay on, so a bundle converted with
more exit positions than it should keep (say ``--exits 12`` for 6) lets the search choose where the
exits sit, on the same single cache pass (a bundle with one head per exit is searched over positions
alone).

One pass over the calibration split caches every candidate's statistics as a *virtual* exit
(``exit#k``; the backbone runs once, every candidate reads the same features). A configuration
(off or candidate ``k`` per exit) is a view of that cache: the chosen columns and the final exit,
stage costs merged across switched-off exits, the chosen heads' costs. The policy's thresholds are
fitted on each view exactly as ``mexify calibrate`` fits them, and a coordinate search over the
exits (start: every exit on with its most accurate candidate; then, exit by exit, every option,
kept when the budget is met better; repeated until nothing changes) picks the configuration. Pure
arithmetic on the cache. Costs are measured latency when the bundle has a profile that timed every
candidate (``mexify profile`` on the bundle with its candidates: stages, each candidate, decisions and
masks, combined per configuration as the runtime spends them), else FLOPs.

Policies whose fitted parameters are per exit (``learned``, ``class-means``) and temperatures are
not searched (their parameters would have to follow the configuration).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from mexify.calibrate.budget import Budget
from mexify.calibrate.cache import ExitCache, collect_cache
from mexify.calibrate.fit import _checked
from mexify.calibrate.search import oracle_at_budget
from mexify.errors import BudgetError, ConfigError
from mexify.nn import ExitOutput, exit_flops, module_device, run_head
from mexify.policies import Policy, PolicyFit, build_policy
from mexify.policies import policy_options as policy_options_of
from mexify.runtime import LatencyProfile, expected_stream

__all__ = ["Candidate", "CandidateView", "ConfigurationReport", "ExitChoice", "search_configuration", "apply_configuration", "view", "view_profile", "SEARCHABLE"]

SEARCHABLE = ("mess", "entropy", "maxprob", "cbt", "fft")
_EXIT_AXIS_1 = ("class_hist", "edge_hist", "mean_maxprob", "mean_entropy", "tp", "pred_count", "agree_tp", "agree_pred_count",
                "thumb_bins", "thumb_pred", "fft_energy")
_EXIT_AXIS_0 = ("label_prob_sum", "agree_prob_sum")


class Candidate(NamedTuple):
    """One head candidate seen as an exit of its own: candidate ``index`` of the exit ``exit`` (position ``exit_index``)."""

    exit_index: int
    exit: str
    index: int


class CandidateView(nn.Module):
    """A :class:`~mexify.nn.MultiExitModel` seen with every head candidate as its own exit (what the cache collects).

    A wrapper, like timm's ``features_only``: the model is its one submodule (``train()`` / ``eval()`` reach
    it), nothing of it is changed. ``columns[j]`` is the :class:`Candidate` of virtual exit ``j``;
    ``exit_names[j]`` (``"name#k"``) only labels it. Satisfies :class:`~mexify.calibrate.cache.ExitSource`.
    """

    def __init__(self, model: Any):
        super().__init__()
        self.model = model
        self.training = model.training  # the view is in the model's mode
        cfg = model.config
        self.columns: List[Candidate] = []
        stage, heads = [], []
        for i, e in enumerate(cfg.exits):
            for k, flops in enumerate(e.candidate_flops or (e.head_flops,)):
                self.columns.append(Candidate(i, e.name, k))
                stage.append(float(model.stage_flops[i]) if k == 0 else 0.0)
                heads.append(float(flops))
        self.exit_names = [f"{c.exit}#{c.index}" for c in self.columns] + ["final"]
        self.stage_flops = stage + [float(model.stage_flops[-1])]
        self.head_flops = heads
        self.num_classes = model.num_classes
        self.original_flops = model.original_flops

    def cost_to_exit(self, j: int) -> float:
        """FLOPs to leave at virtual exit ``j`` with every candidate on the way evaluated."""
        return float(exit_flops(self.stage_flops, self.head_flops)[j])

    def iter_exits(self, x: torch.Tensor) -> Iterator[ExitOutput]:
        """Every candidate's logits at its own resolution (the backbone once), then the final logits."""
        m = self.model
        state, j = m.start(x), 0
        for i in range(m.num_exits):
            state = m.run_stage(i, state)
            if i < m.num_exits - 1:
                inputs = m.head_inputs(i, state)
                name = m.exit_names[i]
                for head in m.candidates[name] if m.candidates is not None else [m.heads[name]]:
                    yield ExitOutput(j, self.exit_names[j], run_head(head, inputs), None, state)
                    j += 1
        yield ExitOutput(j, "final", m.exit_logits(m.num_exits - 1, state), None, state)


def view_profile(profile: LatencyProfile, cand: "CandidateView", columns: Sequence[int]) -> LatencyProfile:
    """A latency profile of the configuration ``columns``: stages merged across switched-off exits, the chosen
    candidates' times (from ``profile.candidate_head_ms``; a bundle with one head per exit: ``head_ms``), their exits'
    decisions and masks."""
    chosen = [cand.columns[c] for c in columns]
    stage = [float(v) for v in profile.stage_ms]
    bounds = [-1] + [c.exit_index for c in chosen] + [len(stage) - 1]
    policy, mask = profile.policy_ms, profile.mask_ms
    return dataclasses.replace(
        profile,
        stage_ms=[sum(stage[a + 1: b + 1]) for a, b in zip(bounds[:-1], bounds[1:])],
        head_ms=[float(profile.candidate_head_ms[c.exit][c.index]) if profile.candidate_head_ms else float(profile.head_ms[c.exit_index])
                 for c in chosen],
        policy_ms=[float(policy[c.exit_index]) for c in chosen] if policy else None,
        mask_ms=[float(mask[c.exit_index]) for c in chosen] + [float(mask[-1])] if mask else None,
        exit_names=[cand.exit_names[c] for c in columns] + ["final"], flops_to_exit=[], candidate_head_ms=None,
    )


def view(cache: ExitCache, columns: Sequence[int], stage_flops: Sequence[float], head_flops: Sequence[float],
         latency: Optional[LatencyProfile] = None) -> ExitCache:
    """The cache restricted to ``columns`` (virtual exits, ascending) and the final exit, stage costs merged;
    costed by ``latency`` (a :func:`view_profile`) when given, else FLOPs."""
    keep = list(columns) + [cache.num_exits - 1]
    fields: Dict[str, Any] = {}
    for name in _EXIT_AXIS_1:
        a = getattr(cache, name)
        fields[name] = a[:, keep] if a is not None else None
    for name in _EXIT_AXIS_0:
        fields[name] = getattr(cache, name)[keep]
    px = cache.num_pixels
    fields["num_pixels"] = px[:, keep] if px.ndim == 2 else px
    bounds = [-1] + list(keep)
    stages = [float(sum(stage_flops[a + 1: b + 1])) for a, b in zip(bounds[:-1], bounds[1:])]
    heads = [float(head_flops[c]) for c in columns]
    costs = np.asarray(exit_flops(stages, heads), dtype=np.float64)
    out = dataclasses.replace(cache, exit_names=[cache.exit_names[c] for c in keep], costs=costs, stage_flops=stages,
                              head_flops=heads, latency=None, cost="flops", **fields)
    return out.with_latency(latency) if latency is not None else out


@dataclasses.dataclass(frozen=True)
class ExitChoice:
    """What the search chose at one early exit: off (``candidate`` None) or a head candidate, and its threshold."""

    exit: str
    candidate: Optional[int]
    head: str  # the candidate's settings in short (``mess w64 b1``), or ``off``
    head_flops: int
    threshold: float  # inf: never leaves here
    exit_rate: float

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ConfigurationReport:
    """The chosen configuration: per exit ``None`` (off) or a candidate index, the fitted policy over
    the real exits, its figures, and the uniform-FCN and uniform default-head configurations' (when in the space)."""

    choice: List[Optional[int]]
    policy: Policy
    figures: Dict[str, Any]
    rows: List[ExitChoice]
    pareto: List[Dict[str, Any]]
    baseline: Optional[Dict[str, Any]]
    baseline_pareto: List[Dict[str, Any]]
    evaluations: int
    seconds: float
    notes: List[str]
    files: Dict[str, str] = dataclasses.field(default_factory=dict)
    default: Optional[Dict[str, Any]] = None  # every exit with the default mess head (one 3x3 block), when in the space
    default_pareto: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    budget: Budget = Budget()
    # the oracle at the budget (perfect per-image decisions) with the chosen exits, and with every position on: the
    # yardstick of what the exits allow (None without labels)
    oracle: Optional[Dict[str, Any]] = None
    oracle_all: Optional[Dict[str, Any]] = None

    def to_dict(self) -> Dict[str, Any]:
        pol = self.policy.to_dict()
        return {"choice": self.choice, "policy": pol, "budget": self.budget.record(), "figures": self.figures, "exits": [r.to_dict() for r in self.rows], "uniform_fcn": self.baseline,
                "uniform_default": self.default, "oracle": self.oracle, "oracle_all_exits": self.oracle_all,
                "evaluations": self.evaluations, "seconds": self.seconds, "notes": self.notes, "files": self.files}


def search_configuration(
    model: Any,
    batches: Callable[[], Iterable[Any]],
    *,
    policy: str = "mess",
    budget: Budget = Budget(),
    latency: Optional[LatencyProfile] = None,
    policy_options: Optional[Dict[str, Any]] = None,
    device: Any = None,
    progress: Optional[Callable[[str, int, int], None]] = None,
    rounds: int = 3,
    max_exits: Optional[int] = None,
) -> ConfigurationReport:
    """Choose, per exit, off or one head candidate, and the policy's thresholds, for a budget (see the module docstring).

    ``latency`` (a bundle's latency profile that timed every candidate) costs the configurations unless
    ``budget.cost`` is ``"flops"``; without it they are costed by FLOPs. ``max_exits``: at most this many
    early exits on (the search moves them among the bundle's positions).

    Raises:
        ConfigError: a policy that cannot be searched, a bundle with nothing to search (one head per exit and
            no ``max_exits`` below its exit count), or ``max_exits`` < 1.
        BudgetError: a budget below every configuration's cheapest cost.
    """
    t0 = time.perf_counter()
    _check_searchable(model, policy, max_exits)
    cand = CandidateView(model)
    budget = _checked(budget)
    cache = collect_cache(cand, batches(), device=device if device is not None else module_device(model), progress=progress)
    cache = dataclasses.replace(cache, cost="flops")
    timed = latency is not None and (bool(latency.candidate_head_ms) or model.candidates is None) and budget.cost != "flops"
    if budget.cost == "latency" and not timed:
        raise ConfigError("--cost latency for --search needs a latency profile that timed every head candidate",
                          "run `mexify profile BUNDLE` on the bundle with its candidates first, or use --cost flops")

    def costed(cols: Sequence[int]) -> ExitCache:
        return view(cache, cols, cand.stage_flops, cand.head_flops, view_profile(latency, cand, cols) if timed else None)

    unit = "ms" if timed else "flops"
    search = budget.bounds(costed([0]).original_cost, unit)
    max_cost = search["max_cost"]
    base = build_policy(policy, **policy_options_of(policy, policy_options))
    per_exit: List[List[int]] = [[j for j, c in enumerate(cand.columns) if c.exit_index == e] for e in range(model.num_exits - 1)]
    tried: Dict[Tuple, Any] = {}

    def evaluate(choice: Tuple[Optional[int], ...]) -> Optional[Tuple[Tuple[float, float], PolicyFit]]:
        if max_exits is not None and sum(k is not None for k in choice) > max_exits:
            return None
        if choice not in tried:
            cols = [per_exit[e][k] for e, k in enumerate(choice) if k is not None]
            tried[choice] = None
            if cols:
                try:
                    fit = base.fit_search(costed(cols), **search)
                except BudgetError:  # this configuration's cheapest exit costs more than the budget
                    return None
                f = fit.policy.figures
                key = (f["miou"], -f["mean_cost"]) if max_cost is not None else (-f["mean_cost"], f["miou"])
                tried[choice] = (key, fit)
        return tried[choice]

    preferred = tuple(int(np.argmax([cache.exit_miou(j) for j in cols])) for cols in per_exit)  # the most accurate head
    best, best_val = _coordinate_search(_spread(preferred, max_exits), preferred, [len(cols) for cols in per_exit], evaluate, rounds)
    if best_val is None:
        cheapest = min(float(costed([j]).exit_costs()[0]) for j in per_exit[0])
        raise BudgetError(f"no configuration reaches {'the budget' if budget.drop is not None else budget.text}: the cheapest, every image at the "
                          f"first exit with its cheapest head, is {costed([0]).original_cost / cheapest:.2f}x",
                          "give a smaller budget (e.g. --budget 1.5x) or --max-drop")
    report = _report(model, best, best_val[1])
    report.policy.budget, report.budget = budget.record(), budget
    report.evaluations, report.seconds = len(tried), time.perf_counter() - t0
    report.baseline, report.baseline_pareto = _uniform(model, per_exit, evaluate, "fcn")
    report.default, report.default_pareto = _uniform(model, per_exit, evaluate, "mess", blocks=1)
    # the yardstick: perfect decisions with the chosen exits, and with every position on
    report.oracle = oracle_at_budget(costed([cols[k] for cols, k in zip(per_exit, best) if k is not None]), budget)[0]
    report.oracle_all = oracle_at_budget(costed([cols[k] for cols, k in zip(per_exit, preferred)]), budget)[0]
    if report.baseline is None:
        report.notes.append("the head space has no fcn candidate: no uniform-FCN configuration to compare with")
    report.notes.append(f"cost model: measured latency, profile {latency.key} (every candidate timed)" if timed else
                        "cost model: FLOPs (1 multiply-add = 1 FLOP); no latency profile that timed every candidate")
    return report


def _check_searchable(model: Any, policy: str, max_exits: Optional[int]) -> None:
    """Refuse a policy with per-exit parameters, ``max_exits`` < 1, and a bundle with nothing to choose."""
    if policy not in SEARCHABLE:
        raise ConfigError(f"--search fits {', '.join(SEARCHABLE)}; {policy!r} has per-exit parameters",
                          "search with one of those, then calibrate the chosen bundle with any policy")
    early = model.num_exits - 1
    if max_exits is not None and max_exits < 1:
        raise ConfigError(f"--max-exits must be at least 1, got {max_exits}", "e.g. --max-exits 6")
    if getattr(model, "candidates", None) is None and (max_exits is None or max_exits >= early):
        raise ConfigError("this bundle has one head per exit and --max-exits leaves every exit on: there is nothing to search",
                          "convert with --heads SPACE (e.g. --heads fused) to choose heads, or with more exit positions "
                          f"(e.g. --exits {2 * early}) and search with --max-exits {early} to choose where exits sit")


def _spread(start: Tuple[Optional[int], ...], max_exits: Optional[int]) -> Tuple[Optional[int], ...]:
    """``start`` with at most ``max_exits`` exits on, spread evenly over the positions (the last kept)."""
    n = len(start)
    if max_exits is None or max_exits >= n:
        return start
    keep = {n - 1 - round(j * n / max_exits) for j in range(max_exits)}
    return tuple(k if e in keep else None for e, k in enumerate(start))


def _coordinate_search(start: Tuple[Optional[int], ...], preferred: Sequence[int], sizes: Sequence[int], evaluate: Callable,
                       rounds: int) -> Tuple[Tuple, Any]:
    """From ``start``, exit by exit, every option (off or candidate k), then every move of one exit to a position
    that is off (with its ``preferred`` candidate), kept when it scores better; until nothing changes."""
    best, best_val = start, evaluate(start)

    def better(trial: Tuple) -> bool:
        nonlocal best, best_val
        val = evaluate(trial)
        if val is not None and (best_val is None or val[0] > best_val[0]):
            best, best_val = trial, val
            return True
        return False

    for _ in range(rounds):
        changed = False
        for e, k in enumerate(sizes):
            for option in [None] + list(range(k)):
                changed |= better(best[:e] + (option,) + best[e + 1:])
        for a in range(len(sizes)):  # moves: exit a off, position b on (what a cap on the exits needs)
            for b in range(len(sizes)):
                if best[a] is not None and best[b] is None:
                    trial = list(best)
                    trial[a], trial[b] = None, preferred[b]
                    changed |= better(tuple(trial))
        if not changed:
            break
    return best, best_val


def _report(model: Any, choice: Tuple[Optional[int], ...], fit: PolicyFit) -> ConfigurationReport:
    """The view's thresholds mapped back to the real exits (off: ``inf``), and one row per exit."""
    fitted = fit.policy
    names = list(model.exit_names)
    it = iter(fitted.thresholds)
    thresholds = [next(it) if k is not None else float("inf") for k in choice]
    policy = fitted.with_thresholds(thresholds)
    policy.exit_names = names
    f = dict(fitted.figures)
    rates = list(f["exit_rates"].values())
    f["exit_rates"] = {}
    rows, r = [], iter(rates[:-1])
    for e, k in enumerate(choice):
        rate = next(r) if k is not None else 0.0
        f["exit_rates"][names[e]] = rate
        cfg = model.config.exits[e]
        head = (cfg.candidates or (cfg.head,))[k] if k is not None else None
        rows.append(ExitChoice(names[e], k, _describe(head) if head else "off",
                               int((cfg.candidate_flops or (cfg.head_flops,))[k]) if k is not None else 0, thresholds[e], rate))
    f["exit_rates"]["final"] = rates[-1]
    policy.figures = f
    policy.monitor = _monitor(names, choice, fit.search, thresholds)
    return ConfigurationReport(list(choice), policy, f, rows, fit.search.pareto, None, [], 0, 0.0, [])


def _monitor(names: Sequence[str], choice: Sequence[Optional[int]], search: Any, thresholds: Sequence[float]) -> Dict[str, Any]:
    """The drift record (``policy.monitor``) of a chosen configuration: the view's scores and exits put at the real
    exits' places (an exit switched off has no score and takes no image)."""
    on = [e for e, k in enumerate(choice) if k is not None]
    scores = np.full((len(search.assignment), len(names) - 1), np.nan)
    scores[:, on] = np.asarray(search.scores, dtype=np.float64).reshape(len(search.assignment), len(on))
    assignment = np.asarray(on + [len(names) - 1])[np.asarray(search.assignment)]
    return expected_stream(names, scores, assignment, thresholds)


def _uniform(model: Any, per_exit: List[List[int]], evaluate: Callable, template: str, blocks: Optional[int] = None
             ) -> Tuple[Optional[Dict[str, Any]], List[Dict[str, Any]]]:
    """Every exit on with its first candidate of ``template`` (and ``blocks``), when the space has one at every exit:
    MESS's uniform FCN baseline, or the default mess head everywhere."""
    choice = []
    for e in range(len(per_exit)):
        ks = [k for k, c in enumerate(model.config.exits[e].candidates or ())
              if c.template == template and (blocks is None or (c.blocks == blocks and not c.aspp_rates and c.dilation == 1))]
        if not ks:
            return None, []
        choice.append(ks[0])
    val = evaluate(tuple(choice))
    return (dict(val[1].policy.figures), val[1].search.pareto) if val is not None else (None, [])


def _describe(head: Any) -> str:
    text = f"{head.template} w{head.width}"
    if head.template == "mess":
        text += f" b{head.blocks}" + (f" d{head.dilation}" if head.dilation > 1 else "")
        text += f" aspp{':'.join(map(str, head.aspp_rates))}" if head.aspp_rates else ""
    return text + (" fused" if head.fuse else "")


def apply_configuration(model: Any, choice: Sequence[Optional[int]], keep_candidates: bool = False) -> Any:
    """Make each exit's head the chosen candidate (an exit switched off keeps its current head, never run);
    without ``keep_candidates`` the other candidates leave the model and its config. Returns the new config."""
    config = model.config
    if model.candidates is None:  # one head per exit: the policy's thresholds switch exits off, the heads stay
        return config
    exits = []
    for e, (cfg, k) in enumerate(zip(config.exits, choice)):
        keep = cfg.chosen if k is None else int(k)
        exits.append(dataclasses.replace(cfg, head=cfg.candidates[keep], head_flops=int(cfg.candidate_flops[keep]), chosen=keep,
                                         candidates=cfg.candidates if keep_candidates else None,
                                         candidate_flops=cfg.candidate_flops if keep_candidates else None))
        model.heads[cfg.name] = model.candidates[cfg.name][keep]
        model.head_flops[e] = int(cfg.candidate_flops[keep])
    if not keep_candidates:
        model.candidates = None
    model.config = dataclasses.replace(config, exits=tuple(exits), latency=None)
    return model.config
