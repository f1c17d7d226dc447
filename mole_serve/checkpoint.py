"""Read and write MoLE adapter dirs: MoE-PEFT / mixlora (modern and legacy keys) and DynMoLE.

Reading accepts `adapter_model.safetensors` (preferred) or `adapter_model.bin`, the pickle
the peers write, which we open only with `torch.load(weights_only=True)`. Every tensor is
checked against the shape the config (and, when given, the base model) implies, so a bad
adapter fails here with a message naming the tensor, never later inside a kernel.
"""

from __future__ import annotations

import pathlib
import pickle
import re
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .adapter import BaseShape, ExpertLoRAs, LoRA, MoleAdapter, MoleLayer, is_attention
from .config import (ALL_PROJS, CONFIG_NAME, LEGACY_PROJS, MOE_PEFT_ORDER, PEFT_TYPE_OF,
                     PLAIN_LORA, AdapterLimits, MoleConfig, read_config_json, same_activation)
from .errors import AdapterError

SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"

_LEGACY_ROUTER = re.compile(r"^mixlora\.layers\.(\d+)\.gate\.weight$")
_LEGACY_EXPERT = re.compile(
    r"^mixlora\.layers\.(\d+)\.experts\.(\d+)\.(\w+)\.(lora_[AB]\.weight)$")
_MODERN_EXPERT = re.compile(
    r"^mixlora\.layers\.(\d+)\.mlp\.(\w+)\.experts\.(\d+)\.(lora_[AB]\.weight)$")
_LAYER_INDEX = re.compile(r"^(?:base_model\.model\.model|\w+)\.layers\.(\d+)\.")


def _module(proj: str) -> str:
    return "self_attn" if is_attention(proj) else "mlp"


def _prefix(config: MoleConfig) -> str:
    return "dynmole" if config.is_per_linear else "mixlora"


def _expert_key(config: MoleConfig, layer: int, proj: str, expert: int, ab: str) -> str:
    return (f"{_prefix(config)}.layers.{layer}.{_module(proj)}.{proj}.experts.{expert}"
            f".lora_{ab}.weight")


def _router_key(config: MoleConfig, layer: int, proj: str | None = None) -> str:
    if proj is None:
        return f"mixlora.layers.{layer}.mlp.moe_gate.weight"
    return f"dynmole.layers.{layer}.{_module(proj)}.{proj}.moe_gate.weight"


def _lora_key(config: MoleConfig, layer: int, proj: str, ab: str) -> str:
    if config.is_plain_lora:  # PEFT's names, which vLLM reads
        return f"base_model.model.model.layers.{layer}.{_module(proj)}.{proj}.lora_{ab}.weight"
    return f"mixlora.layers.{layer}.self_attn.{proj}.lora_{ab}.weight"


def state_dict_items(adapter: MoleAdapter) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors under their modern keys, in the order MoE-PEFT writes them."""
    config = adapter.config
    for index, layer in enumerate(adapter.layers):
        if config.is_per_linear:
            for proj in config.target_modules:
                yield _router_key(config, index, proj), layer.routers[proj]
                yield from _expert_items(config, index, proj, layer.experts[proj])
            continue
        if config.has_ffn_experts:
            yield _router_key(config, index), layer.router
        for proj in MOE_PEFT_ORDER:
            if proj in config.lora_targets:
                yield _lora_key(config, index, proj, "A"), layer.lora[proj].a
                yield _lora_key(config, index, proj, "B"), layer.lora[proj].b
        for proj in ("gate_proj", "down_proj", "up_proj"):
            if proj in layer.experts:
                yield from _expert_items(config, index, proj, layer.experts[proj])


def _expert_items(config: MoleConfig, layer: int, proj: str, experts: ExpertLoRAs):
    for e in range(config.num_experts):
        yield _expert_key(config, layer, proj, e, "A"), experts.a[e]
        yield _expert_key(config, layer, proj, e, "B"), experts.b[e]


def convert_legacy_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """m-LoRA names (`layers.L.gate`, `layers.L.experts.e.w1_proj`) -> modern MoE-PEFT names."""
    out = {}
    for key, value in tensors.items():
        if m := _LEGACY_ROUTER.match(key):
            key = f"mixlora.layers.{m[1]}.mlp.moe_gate.weight"
        elif m := _LEGACY_EXPERT.match(key):
            proj = LEGACY_PROJS.get(m[3], m[3])
            key = f"mixlora.layers.{m[1]}.mlp.{proj}.experts.{m[2]}.{m[4]}"
        elif m := _MODERN_EXPERT.match(key):
            proj = LEGACY_PROJS.get(m[2], m[2])
            key = f"mixlora.layers.{m[1]}.mlp.{proj}.experts.{m[3]}.{m[4]}"
        out[key] = value
    return out


MOLE_PEFT_TYPES = frozenset(t for s, t in PEFT_TYPE_OF.items() if s != PLAIN_LORA)


def is_mole_adapter_dir(path: str | pathlib.Path) -> bool:
    """Whether a dir's adapter_config.json declares a MoLE adapter (MIXLORA, DYNMOLE).
    Plain PEFT LoRA dirs answer False: a server leaves those to vLLM's own loader."""
    try:
        return served_as_mole(str(path), "?")
    except AdapterError:
        return False


def served_as_mole(path: str, adapter: str) -> bool:
    """Who loads a requested adapter path: mole_serve (True: a MoLE dir) or vLLM's own loader
    (False: a plain PEFT LoRA dir, or a name vLLM resolves itself such as a hub id). A local
    path that cannot be an adapter raises AdapterError naming why, where vLLM would answer
    404 or 500 without saying. A missing path that is a valid hub id ('name', 'org/name') is
    left to vLLM, which may download it."""
    local = pathlib.Path(path).expanduser()
    try:
        exists = local.exists()
    except OSError as exc:  # e.g. a name too long: no such dir
        raise AdapterError(adapter, "path", "an adapter directory",
                           f"{local} cannot be read: {exc.strerror}") from None
    if not exists:
        if _is_hub_id(path):
            return False
        raise AdapterError(adapter, "path", "an adapter directory", f"{local} does not exist")
    if not local.is_dir():
        raise AdapterError(adapter, "path", "an adapter directory", f"{local} is a file")
    declared = read_config_json(local, adapter).get("peft_type")
    peft_type = str(declared).upper()
    if peft_type in MOLE_PEFT_TYPES:
        return True
    if declared is None or peft_type == "LORA":  # PEFT LoRA; vLLM reads no peft_type either
        return False
    raise AdapterError(adapter, f"{CONFIG_NAME}:peft_type",
                       f"one of {sorted(MOLE_PEFT_TYPES | {'LORA'})}", repr(declared))


# huggingface_hub's rule for a repo id ('name' or 'org/name'), which vLLM may download
_HUB_ID = re.compile(r"(?:\b[\w.-]{1,96}\b/)?\b[\w.-]{1,96}\b", re.ASCII)


def _is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.fullmatch(name)) and not ("--" in name or ".." in name
                                                  or name.endswith(".git"))


_PLAIN_LORA_KEY = re.compile(r"\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])"
                             r"(?:\.\w+)?\.weight$")


def check_plain_lora_fits(adapter_dir: pathlib.Path, adapter: str, base: BaseShape,
                          max_rank: int) -> None:
    """The faults of a plain PEFT LoRA dir that vLLM's loader reports as a bare 500, as an
    AdapterError naming them: a rank over the server's, factors of the base's layers that do
    not fit them. Whatever else the dir holds (other modules or layers, which vLLM skips, a
    weights format we do not read) stays vLLM's to judge."""
    config = read_config_json(adapter_dir, adapter)
    ranks = [config.get("r"), *(config.get("rank_pattern") or {}).values()]
    too_large = [r for r in ranks if isinstance(r, int) and r > max_rank]
    if too_large:
        raise AdapterError(adapter, f"{CONFIG_NAME}:r", f"<= the server's max rank {max_rank}",
                           str(max(too_large)))
    for key, shape in _tensor_shapes(adapter_dir, adapter).items():
        match = _PLAIN_LORA_KEY.search(key)
        if match is None or match[2] not in ALL_PROJS:
            continue
        if int(match[1]) >= base.num_layers:
            continue
        fan_in, fan_out = base.in_out(match[2])
        rank = shape[0] if match[3] == "A" else shape[-1]
        expected = [rank, fan_in] if match[3] == "A" else [fan_out, rank]
        if list(shape) != expected:
            raise AdapterError(adapter, key, f"shape {expected}", f"shape {list(shape)}")
        if rank > max_rank:
            raise AdapterError(adapter, key, f"rank <= the server's max rank {max_rank}",
                               f"rank {rank}")


def _tensor_shapes(adapter_dir: pathlib.Path, adapter: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of an adapter dir (from the safetensors header alone when it has one);
    none for a weights file we do not read."""
    st = adapter_dir / SAFETENSORS_NAME
    if st.is_file():
        try:
            with safe_open(str(st), framework="pt") as f:
                return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        except (SafetensorError, OSError) as exc:
            raise AdapterError(adapter, st.name, "a readable weights file",
                               f"{type(exc).__name__}: {exc}") from None
    if (adapter_dir / BIN_NAME).is_file():
        return {key: tuple(t.shape) for key, t in read_tensors(adapter_dir, adapter).items()}
    return {}


# Read exactly (then kept in fp32); fp8 and other formats would need their scales.
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def read_tensors(adapter_dir: pathlib.Path, adapter: str) -> dict[str, torch.Tensor]:
    """The raw tensor dict of an adapter dir (safetensors preferred over the .bin pickle)."""
    st, pt = adapter_dir / SAFETENSORS_NAME, adapter_dir / BIN_NAME
    try:
        if st.is_file():
            return load_file(str(st))
        if pt.is_file():
            loaded = torch.load(str(pt), map_location="cpu", weights_only=True)
            if not isinstance(loaded, dict) or not all(
                    isinstance(k, str) and isinstance(v, torch.Tensor)
                    for k, v in loaded.items()):
                raise AdapterError(adapter, BIN_NAME, "a dict of tensors by name",
                                   "a dict with other keys or values"
                                   if isinstance(loaded, dict) else type(loaded).__name__)
            return {k: v.detach() for k, v in loaded.items()}
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError,
            pickle.UnpicklingError) as exc:
        if isinstance(exc, AdapterError):
            raise
        raise AdapterError(adapter, st.name if st.is_file() else BIN_NAME,
                           "a readable weights file", f"{type(exc).__name__}: {exc}") from None
    raise AdapterError(adapter, "weights", f"{SAFETENSORS_NAME} or {BIN_NAME} in {adapter_dir}",
                       "neither file")


def load_adapter(adapter_dir: str | pathlib.Path, name: str | None = None, *,
                 base: BaseShape | None = None, limits: AdapterLimits | None = None
                 ) -> MoleAdapter:
    """Read and validate one adapter dir (any supported flavour) into a MoleAdapter."""
    path = pathlib.Path(adapter_dir)
    name = name or path.name
    if not path.is_dir():
        raise AdapterError(name, "path", "an adapter directory", f"{path} does not exist")
    config = MoleConfig.load(path, name, limits)
    tensors = read_tensors(path, name)
    if config.has_ffn_experts:
        tensors = convert_legacy_keys(tensors)
    return from_state_dict(config, tensors, name, base)


def from_state_dict(config: MoleConfig, tensors: dict[str, torch.Tensor], name: str,
                    base: BaseShape | None = None) -> MoleAdapter:
    """Check keys, shapes and values of a modern-key tensor dict and build the adapter."""
    if base is not None:
        _check_activation(config, base, name)
    num_layers = base.num_layers if base is not None else _count_layers(tensors, name)
    dims = _projection_dims(config, tensors, base, name)
    hidden = base.hidden if base is not None else _hidden(config, dims, tensors)
    expected = _expected_shapes(config, num_layers, dims, hidden)
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise AdapterError(name, missing[0], f"present (tensor of shape "
                           f"{list(expected[missing[0]])})", f"missing ({len(missing)} "
                           f"missing keys in all)")
    extra = sorted(k for k in tensors if k not in expected)
    if extra:
        raise AdapterError(name, extra[0], "no such tensor for this config "
                           f"({config.routing_strategy}, {num_layers} layers, targets "
                           f"{list(config.target_modules)})",
                           f"an unexpected key ({len(extra)} unexpected keys in all)")
    for key, shape in expected.items():
        tensor = tensors[key]
        if tensor.dtype not in WEIGHT_DTYPES:
            raise AdapterError(name, key, "fp32, fp16, bf16 or fp64 weights", str(tensor.dtype))
        if tuple(tensor.shape) != shape:
            raise AdapterError(name, key, f"shape {list(shape)}", f"shape {list(tensor.shape)}")
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise AdapterError(name, key, "finite values", f"{bad} NaN/Inf values")
    fp32 = {k: tensors[k].float() for k in expected}
    return MoleAdapter(name, config, [_layer(config, fp32, i) for i in range(num_layers)])


def _layer(config: MoleConfig, t: dict[str, torch.Tensor], i: int) -> MoleLayer:
    def experts(proj: str) -> ExpertLoRAs:
        E = range(config.num_experts)
        return ExpertLoRAs(torch.stack([t[_expert_key(config, i, proj, e, "A")] for e in E]),
                           torch.stack([t[_expert_key(config, i, proj, e, "B")] for e in E]))

    expert_projs = config.target_modules if config.is_per_linear else config.ffn_targets
    return MoleLayer(
        router=t[_router_key(config, i)] if config.has_ffn_experts else None,
        routers={p: t[_router_key(config, i, p)] for p in expert_projs if config.is_per_linear},
        experts={p: experts(p) for p in expert_projs if not config.is_plain_lora},
        lora={p: LoRA(t[_lora_key(config, i, p, "A")], t[_lora_key(config, i, p, "B")])
              for p in config.lora_targets})


def _check_activation(config: MoleConfig, base: BaseShape, name: str) -> None:
    """A MixLoRA expert is the frozen FFN plus LoRA deltas, computed by the peers with the
    adapter's `act_fn`; we compute it with the base's, so refuse any other."""
    if (config.has_ffn_experts and config.act_fn is not None and base.hidden_act is not None
            and not same_activation(config.act_fn, base.hidden_act)):
        raise AdapterError(name, f"{CONFIG_NAME}:act_fn", f"the base model's activation "
                           f"{base.hidden_act!r} (or absent)", repr(config.act_fn))


def check_fits(adapter: MoleAdapter, base: BaseShape) -> None:
    """AdapterError unless an adapter loaded without `base=` fits `base`: the checks loading
    it with `base=` makes."""
    from_state_dict(adapter.config, dict(state_dict_items(adapter)), adapter.name, base)


def _count_layers(tensors: dict[str, torch.Tensor], name: str) -> int:
    indices = [int(m[1]) for k in tensors if (m := _LAYER_INDEX.match(k))]
    if not indices:
        raise AdapterError(name, "weights", "keys like 'mixlora.layers.0....' or "
                           "'dynmole.layers.0....'", f"{len(tensors)} keys, none per layer")
    return max(indices) + 1


def _projection_dims(config: MoleConfig, tensors: dict[str, torch.Tensor],
                     base: BaseShape | None, name: str) -> dict[str, tuple[int, int]]:
    """(in, out) per targeted projection: from the base when known, else from layer 0."""
    if base is not None:
        return {p: base.in_out(p) for p in config.target_modules}
    dims = {}
    for proj in config.target_modules:
        if proj in config.lora_targets:
            a, b = _lora_key(config, 0, proj, "A"), _lora_key(config, 0, proj, "B")
        else:
            a, b = (_expert_key(config, 0, proj, 0, ab) for ab in "AB")
        if a not in tensors or b not in tensors:
            raise AdapterError(name, a if a not in tensors else b, "present", "missing")
        dims[proj] = (tensors[a].shape[-1], tensors[b].shape[0])
    return dims


def _hidden(config: MoleConfig, dims: dict[str, tuple[int, int]],
            tensors: dict[str, torch.Tensor]) -> int:
    for proj in ("gate_proj", "up_proj", "q_proj", "k_proj", "v_proj"):
        if proj in dims:
            return dims[proj][0]
    for proj in ("down_proj", "o_proj"):
        if proj in dims:
            return dims[proj][1]
    router = tensors.get(_router_key(config, 0))
    return router.shape[-1] if router is not None and router.dim() == 2 else -1


def _expected_shapes(config: MoleConfig, num_layers: int, dims: dict[str, tuple[int, int]],
                     hidden: int) -> dict[str, tuple[int, ...]]:
    E, r = config.num_experts, config.r
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(num_layers):
        if config.has_ffn_experts:
            shapes[_router_key(config, i)] = (E, hidden)
        for proj in config.target_modules:
            fan_in, fan_out = dims[proj]
            if proj in config.lora_targets:
                shapes[_lora_key(config, i, proj, "A")] = (r, fan_in)
                shapes[_lora_key(config, i, proj, "B")] = (fan_out, r)
                continue
            if config.is_per_linear:
                shapes[_router_key(config, i, proj)] = (E, fan_in)
            for e in range(E):
                shapes[_expert_key(config, i, proj, e, "A")] = (r, fan_in)
                shapes[_expert_key(config, i, proj, e, "B")] = (fan_out, r)
    return shapes


def save_adapter(adapter: MoleAdapter, adapter_dir: str | pathlib.Path, *,
                 safetensors: bool = True, bin: bool = False,
                 dtype: torch.dtype = torch.float32) -> pathlib.Path:
    """Write config + weights. `bin=True` adds the `.bin` that MoE-PEFT / mixlora read;
    `dtype` bfloat16 halves the files (a server computes in its own dtype anyway)."""
    if not (safetensors or bin):
        raise ValueError("save_adapter: ask for safetensors, bin or both")
    path = pathlib.Path(adapter_dir)
    path.mkdir(parents=True, exist_ok=True)
    adapter.config.save(path)
    tensors = {k: v.detach().to("cpu", dtype).contiguous()
               for k, v in state_dict_items(adapter)}
    if safetensors:
        save_file(tensors, str(path / SAFETENSORS_NAME), metadata={"format": "pt"})
    if bin:
        torch.save(tensors, str(path / BIN_NAME))
    # an earlier adapter's weights left beside this config would be read as its own
    for written, name in ((safetensors, SAFETENSORS_NAME), (bin, BIN_NAME)):
        if not written:
            (path / name).unlink(missing_ok=True)
    return path
