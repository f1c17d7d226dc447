"""Reference MixLoRA adapters and logits from the peer libraries moe-peft 2.0.2 and mixlora 0.2.3.

Runs only in .venv-peers (moe-peft needs transformers 4.46.x); the test suite calls it by subprocess:

    peer_tool.py base OUT_DIR [--seed 0]
    peer_tool.py create --lib {moe-peft,mixlora} --base BASE --out ADAPTER_DIR
        --strategy {mixlora,mixlora-dynamic,mixlora-switch} [--num-experts 4] [--top-k 2] [--top-p 0.8]
        [--temperature 0.0] [--r 8] [--alpha 16] [--targets q_proj,...,down_proj] [--rslora] [--seed 1]
    peer_tool.py logits --lib {moe-peft,mixlora} --base BASE --adapter ADAPTER_DIR --out OUT.pt

Library output goes to stderr; stdout carries only one final JSON line. Everything written loads with
torch.load(weights_only=True): versions are plain strings, tensors are detached plain tensors.
Exit codes: 3 = the library does not support this routing strategy (mixlora: 'mixlora' only);
4 = the weights the library actually holds after loading differ from adapter_model.bin.

Workarounds for the libraries' pitfalls (details: /work/shared/reference/peers_cpu.md):
- Both apply LoRA dropout at inference. moe-peft keeps its Lora modules in plain dicts that
  LLMModel.eval() never reaches; mixlora keeps its expert LoraLinears in plain dicts too. We call
  .eval() on each of them. moe-peft's default "efficient" operator also calls F.dropout with training
  always on, and silently skips attention LoRAs whose parameters have requires_grad=False, so we
  always pass efficient_operator_=False. mixlora also multiplies the router input by random jitter
  whenever jitter_noise > 0, even at inference (moe-peft skips it there), so we zero it.
- moe-peft's inference mode returns a mixlora-switch block's input unchanged (the FFN skipped):
  switch logits come from its training-mode forward with LoRA dropout off, jitter 0 and an
  expert capacity of the sequence length (servers drop no token), i.e. p_max * FFN_e(x).
- moe-peft loads the base in bf16 by default (the CPU reports bf16 support): load_dtype=float32.
- mixlora has no create/init/save code and accepts routing_strategy 'mixlora' only. We build its
  weights dict by hand in its key layout, inject it, and save cfg.export() + torch.save ourselves.
  It needs "act_fn" in its config (None crashes the forward), so we write the base's hidden_act.
- moe-peft's save_adapter_weight reads TrainConfig.task_, which only TrainConfig.prepare() sets, and
  writes into PARENT/<adapter name>/: we name the adapter after ADAPTER_DIR and pass its parent.
- Both libraries assert lora_dropout > 0, hence lora_dropout = 0.05 in every config.
- moe-peft's loader .get()s every LoRA key and silently default-inits (B = 0) what is missing, and both
  libraries ignore keys they do not know, so `logits` reads back what the library holds and compares.
- Both libraries read only adapter_config.json + adapter_model.bin (an adapter_model.safetensors is
  ignored); mixlora's loader ignores base_model_name_or_path, the base always comes from --base.
"""

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

LORA_DROPOUT = 0.05
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "down_proj", "up_proj")  # moe-peft's storage order
DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
MOEPEFT_NAME, MIXLORA_NAME = "peer", "default"


class PeerError(Exception):
    """An expected failure, reported on stderr with exit code `code` (3 or 4, see above)."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def versions(lib):  # the --lib names are the distribution names
    return {p: str(importlib.metadata.version(p)) for p in ("torch", "transformers", lib)}


def load_inputs(base):
    return torch.load(os.path.join(base, "input_ids.pt"), weights_only=True)


def hf_model(base):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32).eval()


def plain(t):
    return t.detach().float().contiguous().clone()


def check_held(file_weights, held):
    """Fail unless the library holds exactly the tensors stored in adapter_model.bin."""
    unused = sorted(file_weights.keys() - held.keys())
    missing = sorted(held.keys() - file_weights.keys())
    differ = sorted(k for k in held.keys() & file_weights.keys()
                    if not torch.equal(plain(held[k]), plain(file_weights[k])))
    if unused or missing or differ:
        raise PeerError(4, f"weight mismatch: ignored by the library: {unused}; default-initialised "
                           f"(not in file): {missing}; loaded with other values: {differ}")


# ----------------------------------------------------------------------------------------- moe-peft
def moepeft_model(base):
    import moe_peft

    return moe_peft.LLMModel.from_pretrained(base, device="cpu", load_dtype=torch.float32)


def moepeft_forward(model, name, inputs):
    import moe_peft

    ids = inputs["input_ids"]
    switch = False
    for layer in model.model_.layers_:
        attn, mlp = layer.state_dict()
        for linear in (*attn.values(), *mlp.values()):
            for lora in linear.loras_.values():
                lora.eval()
        moe = layer.mlp_.moes_.get(name)
        if type(moe).__name__ == "SwitchSparseMoe":
            # moe-peft's inference mode returns a switch block's input unchanged; its training
            # forward is the switch math: run that, jitter off and a capacity no sequence
            # overflows (a server drops no token)
            moe.jitter_noise_, moe.expert_capacity_, switch = 0.0, ids.shape[1], True
    batch = moe_peft.LLMModelInput(
        batch_configs_=[moe_peft.LLMBatchConfig(adapter_name_=name, batch_start_idx_=0,
                                                batch_end_idx_=ids.shape[0])],
        batch_tokens_=ids.tolist(), batch_masks_=inputs["attention_mask"].tolist(),
        inference_mode_=not switch, efficient_operator_=False)
    out = model.forward(batch)[0]
    return {"logits": plain(out.logits), "router_logits": plain(out.router_logits)}


def moepeft_create(a, out_dir, inputs):
    import moe_peft
    from moe_peft.tasks import CasualTask
    from moe_peft.trainer import TrainConfig, save_adapter_weight

    name = os.path.basename(out_dir)
    routing = {"mixlora": {"top_k": a.top_k},
               "mixlora-dynamic": {"top_p": a.top_p, "temperature": a.temperature},
               "mixlora-switch": {"jitter_noise": 0.0}}[a.strategy]
    cfg = moe_peft.adapter_factory(
        "MIXLORA", name, routing_strategy=a.strategy, num_experts=a.num_experts, r=a.r,
        lora_alpha=a.alpha, lora_dropout=LORA_DROPOUT, target_modules=a.targets,
        use_rslora=a.rslora, **routing)
    model = moepeft_model(a.base)
    torch.manual_seed(a.seed)
    model.init_adapter(cfg)  # lora_A kaiming-uniform, lora_B zero, router N(0, 0.02^2)
    with torch.no_grad():  # the dict holds the live Parameters
        for key, w in model.get_adapter_weight_dict(name).items():
            if ".lora_B." in key:
                w.normal_(0.0, 0.05)
            elif key.endswith("moe_gate.weight"):
                w.normal_(0.0, 0.5)
    train_cfg = TrainConfig(adapter_name=name, task_name="casual")
    train_cfg.task_ = CasualTask()
    save_adapter_weight(model, train_cfg, os.path.dirname(out_dir))
    return moepeft_forward(model, name, inputs)


def moepeft_logits(a, inputs):
    model = moepeft_model(a.base)
    model.load_adapter(a.adapter, MOEPEFT_NAME)
    file_weights = torch.load(os.path.join(a.adapter, "adapter_model.bin"), weights_only=True)
    check_held(file_weights, model.get_adapter_weight_dict(MOEPEFT_NAME))
    return moepeft_forward(model, MOEPEFT_NAME, inputs)


# ------------------------------------------------------------------------------------------ mixlora
def mixlora_forward(model, inputs):
    model.eval()  # reaches the attention LoraLinears, not the experts
    for layer in model.model.layers:
        for moe in layer.mlp.mixlora_moes.values():
            moe.jitter_noise_ = 0.0  # mixlora applies router jitter even at inference
            for expert in moe.experts_.values():
                expert.eval()
    return {"logits": plain(model(**inputs).logits)}


def mixlora_held(model):
    """The weights injected into `model`, in the adapter_model.bin key layout."""
    from mixlora.lora_linear import LoraLinear

    held = {}
    for i, layer in enumerate(model.model.layers):
        pre = f"mixlora.layers.{i}"
        moe = layer.mlp.mixlora_moes[MIXLORA_NAME]
        held[f"{pre}.mlp.moe_gate.weight"] = moe.gate_
        loras = {f"self_attn.{p}": getattr(layer.self_attn, p) for p in ATTN_PROJ}
        for key, lora in moe.experts_.items():  # key: experts.<e>.<proj>
            _, e, proj = key.split(".")
            loras[f"mlp.{proj}.experts.{e}"] = lora
        for name, lora in loras.items():
            if isinstance(lora, LoraLinear):
                held[f"{pre}.{name}.lora_A.weight"] = lora.lora_A.weight
                held[f"{pre}.{name}.lora_B.weight"] = lora.lora_B.weight
    return held


def mixlora_create(a, out_dir, inputs):
    import mixlora

    model = hf_model(a.base)
    cfg_dict = {
        "bias": "none", "peft_type": "MIXLORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": os.path.abspath(a.base), "r": a.r, "lora_alpha": a.alpha,
        "lora_dropout": LORA_DROPOUT, "target_modules": a.targets, "routing_strategy": "mixlora",
        "num_experts": a.num_experts, "act_fn": model.config.hidden_act, "top_k": a.top_k,
    }
    if a.rslora:
        cfg_dict["use_rslora"] = True
    cfg = mixlora.MixLoraConfig.from_config(cfg_dict)
    cfg.adapter_name_, cfg.dtype_ = MIXLORA_NAME, torch.float32
    cfg.check()

    weights = {}  # same key order as moe-peft: gate, attention (q k v o), mlp (gate down up)

    def add_lora(prefix, linear):  # moe-peft's init: A kaiming-uniform(a=sqrt 5); B ~ N(0, 0.05^2)
        out_f, in_f = linear.weight.shape
        weights[f"{prefix}.lora_A.weight"] = torch.nn.init.kaiming_uniform_(
            torch.empty(a.r, in_f), a=math.sqrt(5))
        weights[f"{prefix}.lora_B.weight"] = torch.empty(out_f, a.r).normal_(0.0, 0.05)

    torch.manual_seed(a.seed)
    for i, layer in enumerate(model.model.layers):
        pre = f"mixlora.layers.{i}"
        weights[f"{pre}.mlp.moe_gate.weight"] = torch.empty(
            a.num_experts, model.config.hidden_size).normal_(0.0, 0.5)
        for proj in (p for p in ATTN_PROJ if p in a.targets):
            add_lora(f"{pre}.self_attn.{proj}", getattr(layer.self_attn, proj))
        for proj in (p for p in MLP_PROJ if p in a.targets):
            for e in range(a.num_experts):
                add_lora(f"{pre}.mlp.{proj}.experts.{e}", getattr(layer.mlp, proj))
    mixlora.inject_adapter_in_model(model, cfg, weights)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as fp:
        json.dump(cfg.export(), fp, indent=4)
    torch.save(weights, os.path.join(out_dir, "adapter_model.bin"))
    return mixlora_forward(model, inputs)


def mixlora_logits(a, inputs):
    import mixlora

    with open(os.path.join(a.adapter, "adapter_config.json")) as fp:
        strategy = json.load(fp).get("routing_strategy")
    if strategy != "mixlora":
        raise PeerError(3, f"mixlora 0.2.3 supports routing_strategy 'mixlora' only, got {strategy!r}")
    cfg, weights = mixlora.load_adapter_weights(a.adapter, adapter_name=MIXLORA_NAME, device="cpu",
                                                dtype=torch.float32)
    model = hf_model(a.base)
    mixlora.inject_adapter_in_model(model, cfg, weights)
    check_held(weights, mixlora_held(model))
    return mixlora_forward(model, inputs)


# ----------------------------------------------------------------------------------------- commands
def cmd_base(a):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(a.seed)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256,
        tie_word_embeddings=False))
    model.save_pretrained(a.out_dir, safe_serialization=True)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), dtype=torch.int64)
    path = os.path.join(a.out_dir, "input_ids.pt")
    torch.save({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, path)
    return path


def cmd_create(a):
    if a.lib == "mixlora" and a.strategy != "mixlora":
        raise PeerError(3, "mixlora 0.2.3 supports routing_strategy 'mixlora' only")
    out_dir = os.path.abspath(a.out)
    inputs = load_inputs(a.base)
    with torch.no_grad():
        result = (moepeft_create if a.lib == "moe-peft" else mixlora_create)(a, out_dir, inputs)
        result["base_logits"] = plain(hf_model(a.base)(**inputs).logits)
    path = os.path.join(out_dir, "peer_logits.pt")
    torch.save({**result, "lib": a.lib, "versions": versions(a.lib)}, path)
    return path


def cmd_logits(a):
    inputs = load_inputs(a.base)
    with torch.no_grad():
        result = (moepeft_logits if a.lib == "moe-peft" else mixlora_logits)(a, inputs)
    torch.save({**result, "lib": a.lib, "versions": versions(a.lib)}, a.out)
    return a.out


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    base = sub.add_parser("base", help="tiny random fp32 Llama + input_ids.pt")
    base.add_argument("out_dir")
    base.add_argument("--seed", type=int, default=0)
    create = sub.add_parser("create", help="random MixLoRA adapter + its logits (peer_logits.pt)")
    logits = sub.add_parser("logits", help="logits of an existing adapter dir")
    for s in (create, logits):
        s.add_argument("--lib", required=True, choices=["moe-peft", "mixlora"])
        s.add_argument("--base", required=True)
        s.add_argument("--out", required=True)
    create.add_argument("--strategy", required=True,
                        choices=["mixlora", "mixlora-dynamic", "mixlora-switch"])
    for flag, kind, default in (("--num-experts", int, 4), ("--top-k", int, 2), ("--top-p", float, 0.8),
                                ("--temperature", float, 0.0), ("--r", int, 8), ("--alpha", int, 16),
                                ("--seed", int, 1)):
        create.add_argument(flag, type=kind, default=default)
    create.add_argument("--targets", default=DEFAULT_TARGETS,
                        type=lambda s: [t for t in s.split(",") if t])
    create.add_argument("--rslora", action="store_true")
    logits.add_argument("--adapter", required=True)
    a = p.parse_args(argv)
    bad = set(getattr(a, "targets", [])) - set(ATTN_PROJ + MLP_PROJ)
    if bad:
        p.error(f"unknown --targets {sorted(bad)}")
    return a


def main(argv=None):
    a = parse_args(argv)
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # libraries print; stdout is ours
            path = {"base": cmd_base, "create": cmd_create, "logits": cmd_logits}[a.cmd](a)
    except PeerError as e:
        print(e, file=sys.stderr)
        return e.code
    print(json.dumps({"cmd": a.cmd, "out": path, "seconds": round(time.perf_counter() - start, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
