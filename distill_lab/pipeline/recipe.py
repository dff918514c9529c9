"""A recipe: an ordered list of steps read from YAML, and the registry of step kinds.

``Recipe.from_yaml`` validates every step's config before anything runs; ``register_step`` adds a kind
(the built-in ones are registered by ``distill_lab.pipeline.steps``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from .._fs import atomic_write_text

__all__ = ["Recipe", "STEPS", "Step", "StepKind", "register_step", "step_kinds"]

MAX_NAME = 100  # characters of a recipe's name (one line: table rows, folder names)
MAX_DESCRIPTION = 1000  # characters of a recipe's description (one line for humans)
MAX_STEPS = 32  # steps in one recipe
MAX_FILE_BYTES = 1 << 20  # a recipe file (a few hundred bytes in practice)
MAX_NODES = 10_000  # values in a parsed recipe, every YAML alias counted each time it is used

# ----------------------------------------------------------------------------------------------
# The step registry
# ----------------------------------------------------------------------------------------------


@dataclass
class StepKind:
    """One kind of recipe step: how to validate its config and how to apply it."""

    name: str  # the key used in recipe files, e.g. "prune"
    apply: Callable  # apply(model, config: dict, ctx: StepContext) -> model (new or changed in place)
    validate: Callable | None = None  # validate(config: dict) -> None; raises ValueError
    doc: str = ""  # one line shown by `python -m distill_lab compress --help`


STEPS: dict[str, StepKind] = {}


def register_step(name: str, apply: Callable, validate: Callable | None = None, doc: str = "") -> StepKind:
    """Register (or replace) a recipe step kind; ``apply(model, config, ctx)`` returns the model."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"step name={name!r}; allowed: a Python identifier such as 'prune'")
    STEPS[name] = StepKind(name, apply, validate, doc)
    return STEPS[name]


def step_kinds() -> list[str]:
    """Names of the registered step kinds."""
    return sorted(STEPS)


def _config_from(cls, config: dict, where: str, also: tuple = ()):
    """Build dataclass ``cls`` from a dict; unknown keys and bad values raise ValueError naming ``where``
    (``also``: the step's other knobs, listed with ``cls``'s fields as allowed)."""
    allowed = [*also, *(f.name for f in dataclasses.fields(cls))]
    unknown = [k for k in config if k not in allowed]
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r}; allowed: {', '.join(allowed)}")
    try:
        return cls(**config)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    except TypeError as err:
        raise ValueError(f"{where}: {err}") from None


# ----------------------------------------------------------------------------------------------
# Recipes
# ----------------------------------------------------------------------------------------------


@dataclass
class Step:
    """One recipe step: a registered ``kind`` and its config."""

    kind: str  # a registered step kind (see step_kinds())
    config: dict = field(default_factory=dict)  # the step's knobs, validated by its kind

    def __post_init__(self):
        if self.kind not in STEPS:
            raise ValueError(f"unknown recipe step {self.kind!r}; allowed: {', '.join(step_kinds())}")
        if self.config is None:
            self.config = {}
        if not isinstance(self.config, dict):
            raise ValueError(f"step {self.kind!r}: config={self.config!r}; allowed: a mapping of knobs")
        spec = STEPS[self.kind]
        if spec.validate is not None:
            spec.validate(dict(self.config))

    @property
    def label(self) -> str:
        """Short human label, e.g. ``quantize(format=int4, group_size=64)``."""
        knobs = ", ".join(f"{k}={v}" for k, v in self.config.items())
        return f"{self.kind}({knobs})" if knobs else self.kind

    def to_dict(self) -> dict:
        """The step as ``{kind: config}`` (the short form used in recipe files)."""
        return {self.kind: dict(self.config)}


@dataclass
class Recipe:
    """A compression recipe: ordered steps plus a quality guard."""

    name: str  # a short name, used for folders and table rows
    steps: list  # list of Step (dicts are converted: {"kind": k, "config": {...}} or {k: {...}})
    max_ppl_ratio: float | None = None  # stop when in-domain ppl / teacher ppl exceeds this after a step
    # (None: never); a step followed by distil or qat is not checked, since that step heals it
    description: str = ""  # one line for humans

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip() or len(self.name) > MAX_NAME \
                or "\n" in self.name:
            raise ValueError(f"recipe name={_short(self.name)}; allowed: a non-empty one-line string of at most "
                             f"{MAX_NAME} characters")
        if self.description is None:
            self.description = ""
        if not isinstance(self.description, str) or len(self.description) > MAX_DESCRIPTION:
            raise ValueError(f"recipe description={_short(self.description)}; allowed: a string of at most "
                             f"{MAX_DESCRIPTION} characters")
        if not isinstance(self.steps, (list, tuple)) or not self.steps or len(self.steps) > MAX_STEPS:
            raise ValueError(f"recipe steps={_short(self.steps)}; allowed: a non-empty list of at most {MAX_STEPS} "
                             f"steps")
        self.steps = [_as_step(s, i) for i, s in enumerate(self.steps)]
        if self.max_ppl_ratio is not None:
            ok = isinstance(self.max_ppl_ratio, (int, float)) and not isinstance(self.max_ppl_ratio, bool)
            if not ok or not math.isfinite(self.max_ppl_ratio) or self.max_ppl_ratio < 1.0:
                raise ValueError(f"max_ppl_ratio={self.max_ppl_ratio!r}; allowed: a number >= 1.0 or null")
            self.max_ppl_ratio = float(self.max_ppl_ratio)

    def to_dict(self) -> dict:
        """The recipe as plain data (what ``save`` writes)."""
        return {"name": self.name, "description": self.description, "max_ppl_ratio": self.max_ppl_ratio,
                "steps": [s.to_dict() for s in self.steps]}

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        """Build a recipe from plain data, rejecting unknown top-level fields."""
        if not isinstance(data, dict):
            raise ValueError(f"a recipe must be a mapping with 'name' and 'steps', got {type(data).__name__}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in allowed]
        if unknown:
            raise ValueError(f"recipe: unknown field {unknown[0]!r}; allowed: {', '.join(allowed)}")
        if "steps" not in data:
            raise ValueError("recipe: missing field 'steps'; allowed: a non-empty list of steps")
        return cls(name=data.get("name", "recipe"), steps=data["steps"],
                   max_ppl_ratio=data.get("max_ppl_ratio"), description=data.get("description", ""))

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        """Read a recipe from a ``.yaml``/``.yml`` or ``.json`` file."""
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"recipe file {str(path)!r} is a folder; allowed: a .yaml, .yml or .json file")
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {str(path)!r} does not exist")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ValueError(f"recipe file {str(path)!r} is {path.stat().st_size} bytes; allowed: at most "
                             f"{MAX_FILE_BYTES} bytes")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"recipe file {str(path)!r} cannot be read ({err})") from None
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"recipe file {path.name}: invalid JSON ({err})") from None
        elif path.suffix.lower() in (".yaml", ".yml"):

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as err:
                raise ValueError(f"recipe file {path.name}: invalid YAML ({str(err).splitlines()[0]})") from None
        else:
            raise ValueError(f"recipe file {path.name}: suffix {path.suffix!r}; allowed: .yaml, .yml, .json")
        _check_nodes(data, f"recipe file {path.name}")  # before any value is printed: a YAML alias bomb stops here
        if isinstance(data, dict) and "name" not in data:
            data = {**data, "name": path.stem}
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        """Write the recipe as YAML or JSON (by suffix), atomically."""
        path = Path(path)
        if path.suffix.lower() == ".json":
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        elif path.suffix.lower() in (".yaml", ".yml"):

            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        else:
            raise ValueError(f"recipe file {path.name}: suffix {path.suffix!r}; allowed: .yaml, .yml, .json")
        atomic_write_text(path, text)
        return path

    def fingerprint(self, upto: int) -> str:
        """Hash of steps ``0..upto`` (inclusive): a finished step is reused only if its prefix matches."""
        blob = json.dumps([s.to_dict() for s in self.steps[:upto + 1]], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _as_step(obj, index: int) -> Step:
    if isinstance(obj, Step):
        return obj
    if isinstance(obj, dict) and "kind" in obj:
        extra = [k for k in obj if k not in ("kind", "config")]
        if extra:
            raise ValueError(f"recipe step {index + 1}: unknown field {extra[0]!r}; allowed: kind, config")
        return Step(obj["kind"], obj.get("config") or {})
    if isinstance(obj, dict) and len(obj) == 1:
        (kind, config), = obj.items()
        return Step(kind, config or {})
    if isinstance(obj, str):
        return Step(obj, {})
    raise ValueError(f"recipe step {index + 1}: {obj!r}; allowed: {{kind: {{knobs}}}} or "
                     f"{{kind: ..., config: {{knobs}}}} with kind in {', '.join(step_kinds())}")


def _short(value, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters; a container only by its type and length (never its whole repr)."""
    if isinstance(value, (list, tuple, dict, set)):
        flat = len(value) <= 8 and all(isinstance(v, (str, int, float, type(None))) and len(str(v)) <= 40
                                       for v in (value.values() if isinstance(value, dict) else value))
        if not flat:
            return f"<{type(value).__name__} of {len(value)} items>"
    text = repr(value[:limit + 1] if isinstance(value, str) else value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_nodes(data, where: str) -> None:
    """Raise ``ValueError`` when ``data`` holds more than ``MAX_NODES`` values (shared ones counted at every use)."""
    stack, count = [data], 0
    while stack:
        item = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise ValueError(f"{where} holds more than {MAX_NODES} values (nested YAML aliases?); allowed: at most "
                             f"{MAX_NODES}")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
