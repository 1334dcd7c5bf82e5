"""The policy the runtime runs: a fitted policy, the bundle's own, or a fixed exit."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from mexify.errors import ConfigError, nearest
from mexify.policies import policy_from_dict

__all__ = ["FixedExit", "resolve_policy", "active_exits"]


class FixedExit:
    """A policy-like object that sends every image to one exit (``mexify predict --exit N``).

    Its confidence is the mean top-1 softmax probability at that exit.
    """

    name = "fixed-exit"
    needs_features = False

    def __init__(self, exit_index: int, num_exits: int):
        if exit_index < 0:
            exit_index += num_exits
        if not 0 <= exit_index < num_exits:
            raise ConfigError(
                f"exit {exit_index} does not exist: the model has exits 0..{num_exits - 1}",
                "pass an index in range (negative counts from the final exit) or an exit name",
            )
        self.exit_index = int(exit_index)
        self.num_exits = int(num_exits)

    @torch.no_grad()
    def decide(self, exit_index: int, logits: torch.Tensor, features: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        conf = torch.softmax(logits.float(), dim=1).amax(1).flatten(1).mean(1)
        go = exit_index >= self.exit_index or exit_index == self.num_exits - 1
        return torch.full_like(conf, go, dtype=torch.bool), conf

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "exit": self.exit_index}

    def __repr__(self) -> str:
        return f"FixedExit({self.exit_index})"


def _exit_index(model: Any, exit: Union[int, str]) -> int:
    names = list(model.exit_names)
    if isinstance(exit, str) and not exit.lstrip("-").isdigit():
        if exit not in names:
            near = nearest(exit, names)
            raise ConfigError(
                f"the model has no exit named {exit!r}",
                f"exits: {', '.join(names)}" + (f"; did you mean {near[0]!r}?" if near else ""),
            )
        return names.index(exit)
    return int(exit)


def resolve_policy(model: Any, policy: Any = None, exit: Union[int, str, None] = None) -> Any:
    """The policy object the runtime uses.

    Args:
        model: the multi-exit model.
        policy: a policy object (anything with ``decide``), a policy dict (a bundle's
            ``policy:`` entry), or None for the bundle's own policy (``model.config.policy``).
        exit: force every image to this exit (index, negative from the end, or name);
            overrides ``policy``.

    Raises:
        ConfigError: no policy anywhere, an unknown exit, or a policy fitted for other exits.
    """
    e = model.num_exits
    if exit is not None:
        return FixedExit(_exit_index(model, exit), e)
    if policy is None:
        cfg = getattr(model, "config", None)
        policy = getattr(cfg, "policy", None) if cfg is not None else None
        if policy is None:
            raise ConfigError(
                "the bundle has no exit policy",
                "run `mexify calibrate BUNDLE --data SPEC` first, or force an exit (exit=N / --exit N)",
            )
    if isinstance(policy, dict):
        policy = policy_from_dict(policy)
    if not callable(getattr(policy, "decide", None)):
        raise ConfigError(f"{policy!r} is not an exit policy (it has no decide method)", "pass a Policy, a policy dict or exit=N")
    if getattr(policy, "needs_labels", False):
        raise ConfigError("the oracle reads labels and cannot run at inference time", "calibrate a deployable policy, e.g. mess")
    names = getattr(policy, "exit_names", None)
    if names is not None and list(names) != list(model.exit_names):
        raise ConfigError(
            f"the policy was fitted for exits {list(names)} but the model has {list(model.exit_names)}",
            "calibrate the policy on this bundle again",
        )
    th = getattr(policy, "thresholds", None)
    if isinstance(th, (list, tuple)) and len(th) != e - 1:
        raise ConfigError(f"the policy has {len(th)} thresholds for {e - 1} early exits", "calibrate the policy on this bundle again")
    return policy


def active_exits(policy: Any, num_exits: int) -> List[int]:
    """Exits whose head must be evaluated: those the policy can take (the final one always)."""
    if isinstance(policy, FixedExit):
        return [policy.exit_index] if policy.exit_index < num_exits - 1 else [num_exits - 1]
    th = getattr(policy, "thresholds", None)
    if isinstance(th, (list, tuple)) and len(th) == num_exits - 1:
        # decide() tests confidence >= threshold; nothing passes +inf, so that head is never needed
        return [i for i, t in enumerate(th) if not (math.isinf(t) and t > 0)] + [num_exits - 1]
    return list(range(num_exits))
