"""What every benchmark's JSON report says of the machine, and writing the report."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch


def machine() -> dict[str, Any]:
    """The platform, cores, torch version and torch threads the figures were measured with."""
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def write_json(report: dict[str, Any], path: Path) -> None:
    """Write ``report`` to ``path`` (its directory made if needed) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
