"""What the runtime spends to leave at each exit, from measured times (a latency profile).

One function, used by calibration (the search's cost), ``mexify eval`` (its prediction for the exit
mix it observes) and ``mexify bench`` (predicted beside measured), so that all three count the
same things the runtime does:

* every stage up to the exit;
* for each *active* early exit on the way (one the policy can take), its head and the policy's
  decision; switched-off exits cost nothing;
* masks (resize to the input and argmax): eagerly, only the exit taken makes them, for the images
  that leave there; replayed as CUDA graphs (``mode == "graphs"``), each active exit's graph makes
  the masks of every row it sees, so an image pays them at every active exit on its way.

Times are per image: a profile's batch times divided by its batch size.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

__all__ = ["exit_ms_per_image", "original_ms_per_image"]


def exit_ms_per_image(profile: Dict[str, Any], active: Sequence[int]) -> List[float]:
    """Milliseconds per image to leave at each exit when the ``active`` exits' heads run.

    Args:
        profile: one entry of a bundle's ``latency:`` table (``stage_ms``, ``head_ms``, and when
            measured ``policy_ms``, ``mask_ms``, ``mode``, per batch of ``batch_size``).
        active: indices of the exits whose head and decision run (the final exit always runs).
    """
    b = float(profile["batch_size"])
    stages = [float(v) for v in profile["stage_ms"]]
    e = len(stages)
    heads = [float(v) for v in profile["head_ms"]]
    policy = [float(v) for v in (profile.get("policy_ms") or [0.0] * len(heads))]
    masks = [float(v) for v in (profile.get("mask_ms") or [0.0] * e)]
    graphs = profile.get("mode") == "graphs"
    on = set(int(i) for i in active) | {e - 1}
    out, total = [], 0.0
    for i in range(e):
        total += stages[i]
        if i < e - 1 and i in on:
            total += heads[i] + policy[i] + (masks[i] if graphs else 0.0)
        own_mask = masks[i] if not graphs or i == e - 1 else 0.0
        out.append((total + own_mask) / b)
    return out


def original_ms_per_image(profile: Dict[str, Any]) -> float:
    """The original model's milliseconds per image, from the same pieces: every stage and the final
    exit's masks, no head (the path of an image with every exit switched off).

    The profile's separately timed ``original_ms`` is not used here: the stages are the original
    graph (on a GPU, replaying them costs what one graph of the whole model costs, within 1%), and a
    baseline timed apart from the pieces adds its own noise to every predicted speed-up (+-8% on a
    shared 2-core CPU).
    """
    return exit_ms_per_image(profile, [])[-1]
