"""Triton kernels for MoLE serving (import as `mole_serve.kernels`, never `kernels`).

Layering (ScatterMoE style): `@triton.jit` kernels and their launchers (route.py,
experts.py, expand.py, dynmole.py; small dataclass arguments) -> `torch.library` custom ops
with fake impls (ops.py) -> the functions a layer calls (functional.py). Without CUDA the
kernels run under Triton's interpreter (tests only: it is slow), which must be chosen before
triton is imported.

The repository keeps this package in a top-level `kernels/` folder, so with the repository root
on `sys.path` (`python -m ...` run there) it is also found as `kernels`, the name of Hugging
Face's kernel library, which transformers imports to read its version. Under that name it
defines nothing: it must neither register the `mole_serve::` custom ops a second time (the
first registration wins, so `mole_serve.kernels` would run another module's code) nor switch
a CPU process to Triton's interpreter.
"""

if __name__ == "mole_serve.kernels":
    import os

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

    from .configs import BLOCK_M
    from .functional import (
        as_gated, dynmole_down_delta_, dynmole_gate_up, dynmole_gate_up_route,
        dynmole_intermediate_, gated_lora_, mixlora_down_delta_, mixlora_experts_, mixlora_route,
        mole_ffn_kernels, mole_projection_kernels, num_slots, router_logits)
    from .plan import TokenPlan, max_blocks, plan_tokens
    from .dynmole import DownPartials
    from .route import Routing, RoutingCounts

    __all__ = ["BLOCK_M", "TokenPlan", "Routing", "RoutingCounts", "max_blocks", "plan_tokens",
               "num_slots", "mixlora_route", "mixlora_experts_", "mixlora_down_delta_",
               "DownPartials", "dynmole_gate_up", "dynmole_gate_up_route", "dynmole_intermediate_",
               "dynmole_down_delta_", "gated_lora_", "as_gated", "router_logits",
               "mole_projection_kernels", "mole_ffn_kernels"]
