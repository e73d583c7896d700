"""The versions that change a run's numbers, written into every results.json."""

from __future__ import annotations

import platform
from importlib.metadata import version


def package_versions() -> dict[str, str]:
    """Python, platform and the libraries whose versions change the numbers (for results.json)."""
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ["flwr", "torch", "transformers", "datasets", "numpy", "ray"]:
        found[package] = version(package)
    return found
