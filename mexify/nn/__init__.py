"""The multi-exit model as ``torch.nn`` modules: stages of the original graph plus exit heads.

No I/O, no runtime, no data: what a deployment needs to hold the network.
"""
from mexify.nn.device import device_name, module_device, parse_device, resolve_device
from mexify.nn.heads import HEAD_SPACES, ExitHead, build_head, head_space, parse_head_overrides, resize_logits
from mexify.nn.model import ExitOutput, MultiExitModel, StageState, exit_flops, run_head

__all__ = [
    "MultiExitModel",
    "StageState",
    "ExitOutput",
    "exit_flops",
    "run_head",
    "ExitHead",
    "build_head",
    "parse_head_overrides",
    "head_space",
    "HEAD_SPACES",
    "resize_logits",
    "resolve_device",
    "parse_device",
    "module_device",
    "device_name",
]
