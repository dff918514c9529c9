"""Where and how a number was measured: the environment, a ``Result`` record, and ``record`` for ``make run``."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers

from .._fs import atomic_write_text
from ..hardware import cpu_model

__all__ = ["REPORT_ENV", "Result", "environment_info", "record"]


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment_info() -> dict:
    """Describe where a number was measured: versions, device, CPU threads, git commit."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"{cpu_model()} (CPU, {os.cpu_count()} cores)"
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(terse=True),
            "device": device, "cpu_threads": torch.get_num_threads(),
            "git_commit": _git_commit(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


@dataclass
class Result:
    """A measured result: a named set of metrics plus the profile, seed and environment."""

    name: str  # what was measured, e.g. "00_baseline"
    metrics: dict  # metric name -> number (or nested dict of numbers)
    profile: str = ""  # profile the run used
    seed: int = 0  # seed the run used
    env: dict = field(default_factory=environment_info)  # versions, device, commit

    def to_json(self) -> str:
        """Serialize to a JSON string."""
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    def save(self, path: str | Path) -> Path:
        """Write the record as JSON (atomically) and return the path."""
        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Result":
        """Read a record written by ``save``."""
        return cls(**json.loads(Path(path).read_text()))


REPORT_ENV = "DISTILL_LAB_REPORT_DIR"


def record(result: Result) -> Path | None:
    """Save a notebook's result into ``$DISTILL_LAB_REPORT_DIR/results/`` when ``make run`` set it."""
    folder = os.environ.get(REPORT_ENV)
    if not folder:
        return None
    return result.save(Path(folder) / "results" / f"{result.name}.json")
