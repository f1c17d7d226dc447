"""Tile tuning on the GPU host: each kernel's tiles swept at each token count of the kernel
benchmark, on the Llama-2-7B FFN shape with 32 adapters (MixLoRA top-2 and DynMoLE, the two
kernel paths), the fastest written as the device's tuned table (`kernels/configs.py`).

Each kernel is timed alone, so its tiles are tuned independently of the others' and the
frozen GEMMs' noise does not enter; `triton.testing.do_bench` clears the L2 cache before
every call, as the frozen GEMMs' weight streaming does in a served layer (a replayed graph
would time the adapters' weights from a warm L2). A candidate's time is the sum over the
calls a layer makes of that kernel (MixLoRA: route, experts, down expand; DynMoLE: gate/up
route, intermediate, down: the experts and expand tiles serve both paths); it replaces the
default only if at least `MIN_GAIN` faster (medians of ~46 candidates otherwise pick
noise). `tiles.csv` keeps every measurement
(`gpu,date,commit,tokens,kernel,tiles,median_us,default_us`): the per-kernel profile the
kernel benchmark's notes cite. The table applies to layers with at most the
tuned expert count and rank (`configs.TunedTable.covers`).

Usage: python benchmarks/tune_tiles.py [--out DIR] [--install]   (GPU, bf16)
       python benchmarks/tune_tiles.py --smoke --out DIR           (CPU interpreter)
--install also writes the table where the kernels look first ($MOLE_SERVE_TUNED_CONFIG_FOLDER,
else kernels/tuned/), so later steps of the same session run on it.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import pathlib
import sys
from typing import Callable

import torch
import torch.nn.functional as F

from bench_kernels import (FULL, SMOKE, Layer, Setup, calibrate_top_p, draw_slots, make_adapters,
                           median_seconds, parse_args)
from mole_serve.kernels import (configs, dynmole_down_delta_, dynmole_gate_up_route,
                                dynmole_intermediate_, mixlora_down_delta_, mixlora_experts_,
                                mixlora_route, num_slots, ops, plan_tokens)
from mole_serve.kernels.configs import ExpandTiles, ExpertsTiles, RouteTiles, Tiles, TunedTable
from provenance import commit

ADAPTERS = 32
MIN_GAIN = 0.03
COLUMNS = ["gpu", "date", "commit", "tokens", "kernel", "tiles", "median_us", "default_us"]

# Candidates per kernel (the others keep their default while one is swept).
CANDIDATES: dict[str, list] = {
    "route": [RouteTiles(h, lanes, w) for h in (32, 64, 128, 256) for lanes in (1, 2, 8)
              for w in (4, 8)],
    "experts": [ExpertsTiles(i, w) for i in (32, 64, 128) for w in (4, 8)],
    "expand": [ExpandTiles(n, split, 4) for n in (32, 64, 128, 256) for split in (4, 8, 16, 32)],
}
SMOKE_CANDIDATES: dict[str, list] = {
    "route": [RouteTiles(32, 1, 4), RouteTiles(64, 3, 4)],
    "experts": [ExpertsTiles(32, 4), ExpertsTiles(64, 4)],
    "expand": [ExpandTiles(32, 2, 4), ExpandTiles(64, 1, 4)],
}


def kernel_calls(layers: list[Layer], setup: Setup, tokens: int, device: str
                 ) -> dict[str, list[Callable[[], object]]]:
    """Per kernel, the calls each layer (MixLoRA or DynMoLE) makes of it."""
    calls: dict[str, list] = {"route": [], "experts": [], "expand": []}
    for layer in layers:
        for kernel, fn in _layer_calls(layer, setup, tokens, device):
            calls[kernel].append(fn)
    return calls


def _layer_calls(layer: Layer, setup: Setup, tokens: int, device: str
                 ) -> list[tuple[str, Callable[[], object]]]:
    """(kernel, call) of one layer's MoLE launches, on inputs computed once (in-place
    outputs are rewritten each call: timing only)."""
    x = torch.randn(tokens, setup.hidden, device=device, dtype=setup.dtype)
    slots = draw_slots(tokens, ADAPTERS, "uniform", device)
    plan = plan_tokens(slots, num_slots(layer.stack), configs.BLOCK_M)
    gate_up = F.linear(x, layer.gate_up)
    g, u = gate_up.split(setup.intermediate, dim=1)
    h = F.silu(g) * u
    y = F.linear(h, layer.down)
    ffn = layer.stack.ffn
    if ffn is not None:
        routing = mixlora_route(x, plan, ffn)
        partials = mixlora_experts_(h.clone(), g, u, routing, plan, ffn)
        return [("route", lambda: mixlora_route(x, plan, ffn)),
                ("experts", lambda: mixlora_experts_(h, g, u, routing, plan, ffn)),
                ("expand", lambda: mixlora_down_delta_(y, partials, routing, plan, ffn))]
    group, down = layer.gate_up_group, layer.stack.gated["down_proj"]
    routing = dynmole_gate_up_route(x, plan, group)
    partials = dynmole_intermediate_(h.clone(), g, u, routing, plan, group, down)
    return [("route", lambda: dynmole_gate_up_route(x, plan, group)),
            ("experts", lambda: dynmole_intermediate_(h, g, u, routing, plan, group, down)),
            ("expand", lambda: dynmole_down_delta_(y, partials, plan, down))]


def time_with(tiles: Tiles, fns: list[Callable], device: str) -> float:
    """Summed median seconds of `fns` with every op using `tiles`."""
    default = ops.pick_tiles
    ops.pick_tiles = lambda num_tokens, kernel, experts, width: getattr(tiles, kernel)
    try:
        return sum(median_seconds(fn, device, graph=False) for fn in fns)
    finally:
        ops.pick_tiles = default


def tune(setup: Setup, candidates: dict[str, list], device: str, head: list,
         save: Callable[[TunedTable, list[list], bool], object]) -> None:
    """Sweep every token count; after each, `save` the table so far, every measurement's CSV
    row and whether the sweep is complete: a run cut off keeps what it measured."""
    table, rows = {}, []
    # DynMoLE at the benchmark's load: top-2's mean of 2 experts per token
    top_p = {"top-2": 0.0, "dynmole": calibrate_top_p("dynmole", setup, device)}
    layers = [Layer(setup, make_adapters(strategy, setup, ADAPTERS, p), device)
              for strategy, p in top_p.items()]
    for tokens in setup.tokens:
        calls = kernel_calls(layers, setup, tokens, device)
        default = configs.table_tiles(tokens)
        best = {}
        for kernel, options in candidates.items():  # kernel: the `Tiles` field its op reads
            base_us = time_with(default, calls[kernel], device) * 1e6
            timed = []
            for option in options:
                us = time_with(dataclasses.replace(default, **{kernel: option}), calls[kernel],
                               device) * 1e6
                timed.append((us, option))
                rows.append(head + [tokens, kernel, _describe(option), f"{us:.1f}",
                                    f"{base_us:.1f}"])
            us, option = min(timed, key=lambda pair: pair[0])
            best[kernel] = option if us <= (1 - MIN_GAIN) * base_us else getattr(default, kernel)
            print(f"{tokens} tokens {kernel}: default {base_us:.1f} us, fastest {us:.1f} us "
                  f"({_describe(option)}); kept {_describe(best[kernel])}", flush=True)
        table[tokens] = Tiles(**best)
        save(TunedTable(setup.experts, setup.rank, tuple(sorted(table.items()))), rows,
             tokens == setup.tokens[-1])


def _describe(option) -> str:
    return " ".join(f"{k}={v}" for k, v in dataclasses.asdict(option).items())


def write(table: TunedTable, rows: list[list], head: list, out: pathlib.Path,
          install: bool) -> pathlib.Path:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "tiles.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    name = configs.tuned_file_name(head[0])
    document = {"device": head[0], "date": head[1], "commit": head[2], **table.to_json()}
    text = json.dumps(document, indent=1) + "\n"
    TunedTable.parse(text, "the tuned table")  # what the kernels will accept
    (out / name).write_text(text)
    if install:
        folder = configs.tuned_folders()[0]  # where the kernels look first
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
        print(f"installed {folder / name}")
    return out / name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--install", action="store_true",
                        help="also write the table where the kernels read it")
    args, device, out = parse_args(parser)
    if args.smoke and args.install:
        sys.exit("--install writes a device's table: not from the interpreter")
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu-triton-interpreter"
    head = [gpu, datetime.date.today().isoformat(), commit()]
    # Installed only when complete: a partial table would serve its largest token count's
    # tiles to every larger batch.
    tune(SMOKE if args.smoke else FULL, SMOKE_CANDIDATES if args.smoke else CANDIDATES,
         device, head, lambda table, rows, complete: print(
             write(table, rows, head, out, args.install and complete)))


if __name__ == "__main__":
    main()
