"""vLLM general plugin entry point (`vllm.general_plugins: mole_serve`).

vLLM calls `register()` in every process it starts (API server while building the CLI parser,
engine core, workers) and possibly more than once; each step below is idempotent. Nothing
changes vLLM's behaviour until MoLE serving is switched on with `--enable-mole-adapters` (or
`additional_config={"mole": {"enabled": True}}`): even the CPU LoRA bug fix is installed by
our model class, in the processes that serve it.
"""

from . import vllm_compat


def register() -> None:
    """Register the MoLE model class, the CLI flags and the adapter hooks."""
    vllm_compat.check_version()
    vllm_compat.register_model()
    vllm_compat.add_cli_flags()
    vllm_compat.keep_drafts_stock()
    vllm_compat.install_adapter_hooks()
    vllm_compat.install_api_validation()
    vllm_compat.install_idle_metrics_flush()
