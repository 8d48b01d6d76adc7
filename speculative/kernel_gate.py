"""Whether one of our Triton kernels runs on a device: the switch every kernel module shares.

A kernel is an optimisation, never a different result, so it runs only where it can be trusted:
on CUDA tensors, unless its environment variable asks for the torch code (an A/B), and after a
one-time check on that device against the torch code. A kernel that fails to compile or
disagrees costs a warning and the speed, not a run. Not inside a CUDA graph capture, where
the check cannot run: there the torch code is what gets captured.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

try:
    import triton
except ImportError:  # pragma: no cover - every supported install has Triton (torch's CUDA wheels, vLLM)
    triton = None


class KernelGate:
    """``gate(like)``: True where the kernel named ``name`` should run on ``like``'s device.
    ``check(device)`` returns None when the kernel agrees with the torch code there, else what
    went wrong (it may raise: that is a failure too)."""

    def __init__(self, name: str, env_var: str, check: Callable[[torch.device], str | None]):
        self.name, self.env_var, self.check = name, env_var, check
        self.checked: dict[torch.device, bool] = {}

    def __call__(self, like: torch.Tensor) -> bool:
        if like.device.type != "cuda" or triton is None or os.environ.get(self.env_var, "triton") == "torch":
            return False
        if like.device not in self.checked:
            if torch.cuda.is_current_stream_capturing():
                return False
            self.checked[like.device] = self._passes(like.device)
        return self.checked[like.device]

    def chosen(self, like: torch.Tensor, forced: bool | None = None) -> bool:
        """Whether a call site runs the kernel: ``forced`` where it is given (True, e.g. on CPU under
        Triton's interpreter; False keeps the torch code); inside an Inductor trace, which cannot
        run the check, the outcome a check run eagerly before found; else the gate itself."""
        if forced is not None:
            return forced
        if torch.compiler.is_compiling():
            return self.checked.get(like.device, False)
        return self(like)

    def _passes(self, device: torch.device) -> bool:
        try:
            problem = self.check(device)
        except Exception as exc:  # noqa: BLE001 - a kernel failure costs speed, not results
            problem = f"failed ({type(exc).__name__}: {exc})"
        if problem is None:
            return True
        warnings.warn(f"the {self.name} kernel {problem} on {device}; the torch code from now on "
                      f"(or set {self.env_var}=torch)", stacklevel=4)
        return False
