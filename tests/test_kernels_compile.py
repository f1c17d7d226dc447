"""The kernels as vLLM will run them: compiled, checked as custom ops, built for the GPU.

Why each test exists:
- test_compile_fullgraph_*: vLLM compiles the model with `fullgraph=True` and a dynamic token
  count; a graph break, a data-dependent shape or a guard on the token count anywhere on the
  MoLE path fails here (the fake impls are what the compiler sees), and the compiled result
  must equal eager.
- test_opcheck_*: `torch.library.opcheck` checks schemas (declared mutations), fake impls
  against real outputs, and registration for every op.
- test_kernels_build_for_sm90: the interpreter accepts code the GPU compiler rejects, and
  says nothing about registers; this compiles every kernel with the default GPU tiles to an
  sm_90 cubin with Triton's bundled ptxas (no GPU needed) and fails on register spills; the
  tile tuner's widest tiles (for each kernel that uses them) must build and fit in shared
  memory (a GPU session must not lose a call to a candidate that cannot launch).
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from mole_serve.kernels import mixlora_route, mole_ffn_kernels, plan_tokens
from mole_serve.kernels.configs import BLOCK_M
from mole_serve.routing_stats import RoutingStats
from mole_serve.stack import GroupedLoRAStack
from test_kernels import ZOO, frozen, make_stack, tokens

OPS = torch.ops.mole_serve


def case(num_tokens: int = 24):
    x, slots = tokens(num_tokens, 4, seed=29)
    return x, frozen(29), slots, make_stack([ZOO[0], ZOO[2], ZOO[4], None], seed=29)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_traces_the_custom_ops_for_any_token_count(backend):
    """aot_eager: the traced graph is the eager program (bit-identical). inductor (what vLLM
    compiles with): the in-place custom ops survive functionalization and fusion around them;
    its own GEMM and SiLU·mul code rounds differently, hence a tolerance."""
    torch._dynamo.reset()
    compiled = torch.compile(mole_ffn_kernels, fullgraph=True, backend=backend, dynamic=True)

    def check(num_tokens):
        x, base, slots, stack = case(num_tokens)
        got, want = compiled(x, base, slots, stack), mole_ffn_kernels(x, base, slots, stack)
        if backend == "aot_eager":
            assert torch.equal(got, want)
        else:
            assert (got - want).abs().max() <= 1e-5 * want.abs().max()

    check(24)
    with torch._dynamo.config.patch(error_on_recompile=True):  # one graph serves every T
        check(40)
        check(3)


def op_samples():
    x, base, slots, stack = case(12)
    ffn = stack.ffn
    plan = plan_tokens(slots, 4, BLOCK_M)
    meta = (plan.sorted_tokens, plan.block_slot)
    routing = mixlora_route(x, plan, ffn)
    g, u = x @ base.gate.T, x @ base.up.T
    h = base.act(g) * u
    stats = RoutingStats(4, ffn.router.shape[1], 0, ("ffn",)).to(x.device)
    counts, bounds = stats.counts, stats.entropy_bounds
    # The route op takes a group of projections sharing x: here one, the MixLoRA router.
    grouped = (ffn.router[None], ffn.gate_up_a[None], ffn.routing[None], ffn.enabled[None])
    partials = OPS.mixlora_experts(h.clone(), g, u, routing.shrink, routing.ids,
                                   routing.weights, ffn.gate_up_b, ffn.down_a, ffn.scaling,
                                   ffn.enabled, *meta, "silu", 2)
    gate, up, down = (stack.gated[p] for p in ("gate_proj", "up_proj", "down_proj"))
    gate_up = GroupedLoRAStack.of([gate, up])
    gate_up_routing = OPS.route(x, gate_up.router, gate_up.a, gate_up.routing, gate_up.enabled,
                                *meta, gate_up.k_max)
    intermediate_args = (h.clone(), g, u, *gate_up_routing, gate_up.b, gate_up.scaling,
                         gate_up.enabled, down.router, down.a, down.routing, down.enabled,
                         *meta, "silu", 2)
    down_logits, down_shrink = OPS.dynmole_intermediate(*intermediate_args)
    down_stats = RoutingStats(4, down.router.shape[1], 0, ("down",)).to(x.device)
    return {
        "dynmole_intermediate": (OPS.dynmole_intermediate, intermediate_args),
        "dynmole_down": (OPS.dynmole_down,
                         (h @ base.down.T, down_logits, down_shrink, down.b, down.scaling,
                          down.routing, down.enabled, *meta, down.k_max, down_stats.counts[0],
                          down_stats.entropy_bounds)),
        "route": (OPS.route, (x, *grouped, *meta, ffn.k_max)),
        "route_counting": (OPS.route, (x, *grouped, *meta, ffn.k_max, counts, bounds)),
        "router_logits": (OPS.router_logits, (x, *grouped, *meta)),
        "route_given_logits": (OPS.route, (x, *grouped, *meta, ffn.k_max, counts, bounds,
                                           OPS.router_logits(x, *grouped, *meta))),
        "mixlora_experts": (OPS.mixlora_experts,
                            (h, g, u, routing.shrink, routing.ids, routing.weights,
                             ffn.gate_up_b, ffn.down_a, ffn.scaling, ffn.enabled, *meta,
                             "silu", 2)),
        "routed_expand": (OPS.routed_expand,
                          (h @ base.down.T, partials[:, None], routing.ids[None],
                           routing.weights[None], ffn.down_b, ffn.scaling[None],
                           ffn.enabled[None], *meta, [base.down.shape[0]])),
    }


@pytest.mark.parametrize("name", ["route", "route_counting", "router_logits",
                                  "route_given_logits", "mixlora_experts", "routed_expand",
                                  "dynmole_intermediate", "dynmole_down"])
def test_opcheck_custom_ops(name):
    op, args = op_samples()[name]
    torch.library.opcheck(op, args)


SM90_SCRIPT = r"""
import os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
import triton.backends.nvidia as nvidia
from mole_serve.kernels import configs, dynmole, expand, experts, route
sys.path.insert(0, "benchmarks")
from tune_tiles import CANDIDATES

TOOLS = os.path.join(os.path.dirname(nvidia.__file__), "bin")
# Arguments the launcher specialises as 16-aligned for Llama-7B shapes (so loads vectorise).
ALIGNED = {"stride_x", "stride_g", "stride_u", "stride_h", "stride_y", "H", "I", "N", "R", "NR"}
H, I, R, E = 4096, 11008, 16, 8
SHARED_MEMORY = 232448  # bytes a block may use on sm_90


def build(kernel, pointers, constexprs, num_warps, check_spills):
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i32")
                 for name in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if signature[name].startswith("*") or name in ALIGNED}
    binary = compile(ASTSource(kernel, signature, constexprs, attrs),
                     target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    what = f"{kernel.fn.__name__} {constexprs} warps={num_warps}"
    assert binary.metadata.shared <= SHARED_MEMORY, f"{what}: {binary.metadata.shared} B shared"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(binary.asm["cubin"])
    usage = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "--dump-resource-usage", f.name],
                           capture_output=True, text=True, check=True).stdout
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    assert stack == 0 or not check_spills, f"{what}: {stack} B spilled"


ids = {"sorted_tokens_ptr": "*i32", "block_slot_ptr": "*i32", "ids_ptr": "*i32",
       "weights_ptr": "*fp32", "enabled_ptr": "*i1", "scaling_ptr": "*fp32"}
split_i = configs.split_i_for(I)


def common(dt, precision, k):
    return dict(K=k, K_PAD=triton.next_power_of_2(k), BLOCK_M=configs.BLOCK_M,
                PRECISION=precision)


def build_route(tiles, dt, precision, k, serving, logits_modes=(0,)):
    for logits in logits_modes:
        build(route._route_kernel, {**ids, "x_ptr": f"*{dt}", "router_ptr": "*fp32",
              "shrink_a_ptr": f"*{dt}", "table_ptr": "*fp32", "shrink_ptr": "*fp32",
              "counts_ptr": "*fp64", "bounds_ptr": "*fp32", "logits_ptr": "*fp32"},
              dict(common(dt, precision, k), E_PAD=configs.padded(E),
                   NR_PAD=configs.padded(2 * R), BLOCK_H=tiles.block_h, COUNT=serving, NB=10,
                   NB_PAD=16, LOGITS=logits),
              tiles.num_warps, serving)


def build_experts(tiles, dt, precision, k, serving):
    build(experts._experts_kernel, {**ids, "g_ptr": f"*{dt}", "u_ptr": f"*{dt}",
          "h_ptr": f"*{dt}", "shrink_ptr": "*fp32", "gate_up_b_ptr": f"*{dt}",
          "down_a_ptr": f"*{dt}", "partials_ptr": "*fp32"},
          dict(common(dt, precision, k), R_PAD=configs.padded(R), BLOCK_I=tiles.block_i,
               ACT=0, TILES_PER_SPLIT=triton.cdiv(triton.cdiv(I, tiles.block_i), split_i)),
          tiles.num_warps, serving)


def build_expand(tiles, dt, precision, k, serving):
    build(expand._expand_kernel, {**ids, "y_ptr": f"*{dt}", "partials_ptr": "*fp32",
          "b_ptr": f"*{dt}"},
          dict(common(dt, precision, k), R_PAD=configs.padded(R), BLOCK_N=tiles.block_n,
               P_CHUNK=expand.partials_per_load(configs.BLOCK_M, k, R, split_i),
               TILES_PER_SPLIT=triton.cdiv(triton.cdiv(H, tiles.block_n), tiles.split_n)),
          tiles.num_warps, serving)


def build_intermediate(tiles, dt, precision, k, serving):
    build(dynmole._intermediate_kernel, {**ids, "g_ptr": f"*{dt}", "u_ptr": f"*{dt}",
          "h_ptr": f"*{dt}", "shrink_ptr": "*fp32", "b_ptr": f"*{dt}", "router_ptr": "*fp32",
          "down_a_ptr": f"*{dt}", "down_table_ptr": "*fp32", "down_enabled_ptr": "*i1",
          "logits_ptr": "*fp32", "partials_ptr": "*fp32"},
          dict(common(dt, precision, k), R_PAD=configs.padded(R), ED_PAD=configs.padded(E),
               RD_PAD=configs.padded(R), BLOCK_I=tiles.block_i, ACT=0,
               TILES_PER_SPLIT=triton.cdiv(triton.cdiv(I, tiles.block_i), split_i)),
          tiles.num_warps, serving)


def build_down(tiles, dt, precision, k, serving, experts=E):
    build(dynmole._down_kernel, {**ids, "y_ptr": f"*{dt}", "logits_ptr": "*fp32",
          "partials_ptr": "*fp32", "b_ptr": f"*{dt}", "table_ptr": "*fp32",
          "counts_ptr": "*fp64", "bounds_ptr": "*fp32"},
          dict(K=k, E_PAD=triton.next_power_of_2(experts), R_PAD=configs.padded(R),
               BLOCK_M=configs.BLOCK_M, BLOCK_N=tiles.block_n, PRECISION=precision,
               COUNT=serving, NB=10, NB_PAD=16,
               TILES_PER_SPLIT=triton.cdiv(triton.cdiv(H, tiles.block_n), tiles.split_n),
               L_CHUNK=expand.partials_per_load(configs.BLOCK_M, 1, experts, split_i),
               P_CHUNK=expand.partials_per_load(configs.BLOCK_M, experts, R, split_i)),
          tiles.num_warps, serving)


for tiles in {tiles for _, tiles in configs.TILE_TABLE}:
    # Serving (bf16, must not spill) with switch, top-2 and dynamic k; fp32 (the GPU tests'
    # dtype, IEEE dots on CUDA cores) top-2 only has to build. Serving counts routing metrics
    # in the route kernel (fp64 atomics); under tensor parallelism a row-parallel router
    # stores its partial logits, then routes from their sum.
    for dt, precision, k in (("bf16", "tf32", 1), ("bf16", "tf32", 2), ("bf16", "tf32", 8),
                             ("fp32", "ieee", 2)):
        serving = dt == "bf16"
        build_route(tiles.route, dt, precision, k, serving,
                    (0, 1, 2) if serving and k == 2 else (0,))
        build_experts(tiles.experts, dt, precision, k, serving)
        build_expand(tiles.expand, dt, precision, k, serving)
    # DynMoLE's FFN (k_max = E in a server): on the experts and expand tiles; a server of
    # one-expert adapters selects over a single column.
    for dt, precision in (("bf16", "tf32"), ("fp32", "ieee")):
        build_intermediate(tiles.experts, dt, precision, E, dt == "bf16")
        build_down(tiles.expand, dt, precision, E, dt == "bf16")
    build_down(tiles.expand, "bf16", "tf32", 1, True, experts=1)
# The tuner's largest tiles must build and fit in shared memory (spills are its to measure).
BUILDERS = {"route": [build_route], "experts": [build_experts, build_intermediate],
            "expand": [build_expand, build_down]}
WIDTH = {"route": "block_h", "experts": "block_i", "expand": "block_n"}
for kernel, options in CANDIDATES.items():
    widest = max(getattr(o, WIDTH[kernel]) for o in options)
    for warps in sorted({o.num_warps for o in options if getattr(o, WIDTH[kernel]) == widest}):
        option = next(o for o in options
                      if getattr(o, WIDTH[kernel]) == widest and o.num_warps == warps)
        for builder in BUILDERS[kernel]:
            builder(option, "bf16", "tf32", 8, False)
print("built")
"""


ROOT = pathlib.Path(__file__).resolve().parents[1]
GPU_HOST_TRITON = ROOT / ".triton-gpu"  # triton 3.6.0, as on the GPU host (`make setup`)


@pytest.mark.parametrize("triton_version", ["installed", "gpu-host"])
def test_kernels_build_for_sm90(triton_version):
    """Codegen (and so register spills) changes between triton versions: build with the
    venv's and with the GPU host's."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    if triton_version == "gpu-host":
        if importlib.metadata.version("triton") == "3.6.0":
            pytest.skip("the installed triton is the GPU host's (on the GPU host itself)")
        assert (GPU_HOST_TRITON / "triton").is_dir(), "run `make setup` (it installs it)"
        env["PYTHONPATH"] = os.pathsep.join([str(GPU_HOST_TRITON), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", SM90_SCRIPT + VERSION_CHECK], env=env,
                          capture_output=True, cwd=ROOT, text=True, timeout=300)
    assert done.returncode == 0 and "built" in done.stdout, done.stderr[-3000:]
    if triton_version == "gpu-host":
        assert "triton 3.6.0" in done.stdout


VERSION_CHECK = "\nprint('triton', triton.__version__)\n"
