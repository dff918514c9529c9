"""Combined compression: prune → distil → quantize, with quality measured after every step.

A :class:`Recipe` is a list of steps (``kind`` + config dict) that loads from and saves to YAML or
JSON. :func:`run_recipe` applies the steps to a copy of the teacher, saves every intermediate model
atomically, measures it (perplexity in- and out-of-domain, size on disk, prefill and decode speed)
and resumes from the last finished step when it is run again. :func:`comparison_table` measures the
seed's comparison table (INT8, INT4, distillation, 50 % pruning, combined) on the real teacher.

Papers: the order prune → distil → quantize follows Deep Compression (Han et al., 2016,
"Deep Compression: Compressing Deep Neural Networks with Pruning, Trained Quantization and
Huffman Coding", arXiv:1510.00149) and Minitron (Muralidharan et al., 2024, "Compact Language
Models via Pruning and Knowledge Distillation", arXiv:2407.14679); distillation is Hinton et al.,
2015 (arXiv:1503.02531); quantization-aware training with a distillation loss follows
LLM-QAT (Liu et al., 2023, arXiv:2305.17888).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ._fs import DamagedFileError, atomic_write_text, clean_stale_tmp, make_tmp_dir, replace_dir, share_permissions, write_manifest
from .profiles import Profile, get_profile

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


def _config_from(cls, config: dict, where: str):
    """Build dataclass ``cls`` from a dict; unknown keys and bad values raise ValueError naming ``where``."""
    allowed = [f.name for f in dataclasses.fields(cls)]
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
        """Short human label, e.g. ``quantize(method=int4, group_size=64)``."""
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
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"recipe name={self.name!r}; allowed: a non-empty string")
        if not isinstance(self.steps, (list, tuple)) or not self.steps:
            raise ValueError(f"recipe steps={self.steps!r}; allowed: a non-empty list of steps")
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
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as err:
                raise ValueError(f"recipe file {path.name}: invalid YAML ({str(err).splitlines()[0]})") from None
        else:
            raise ValueError(f"recipe file {path.name}: suffix {path.suffix!r}; allowed: .yaml, .yml, .json")
        if isinstance(data, dict) and "name" not in data:
            data = {**data, "name": path.stem}
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        """Write the recipe as YAML or JSON (by suffix), atomically."""
        path = Path(path)
        if path.suffix.lower() == ".json":
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        elif path.suffix.lower() in (".yaml", ".yml"):
            import yaml

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


# ----------------------------------------------------------------------------------------------
# Context: what a step may use (teacher, data, profile)
# ----------------------------------------------------------------------------------------------


@dataclass
class StepContext:
    """What a step may use: the teacher, its tokenizer, the profile, data, seed and device."""

    teacher: nn.Module  # the uncompressed teacher (never modified)
    tokenizer: object  # the teacher's tokenizer (None for tiny test models)
    profile: Profile  # sizes (train steps, batch, calibration windows, ...)
    seed: int = 0  # seed for every step
    progress: bool = True  # show tqdm bars
    train: torch.Tensor | None = None  # (N, T) training windows (loaded lazily from pydoc train)
    work_dir: Path | None = None  # the recipe's output folder
    cache_dir: Path | None = None  # where cached teacher logits go (shared between recipes; default work_dir)
    extras: dict = field(default_factory=dict)  # what the current step reports besides metrics (losses, notes)
    teacher_digest: str = ""  # model_digest(teacher): keys the cached teacher logits to this very teacher

    def report(self, key: str, value) -> None:
        """Attach JSON-serializable information to the current step's record (e.g. a loss history)."""
        self.extras[key] = value

    def train_windows(self) -> torch.Tensor:
        """(N, T) training windows from the pydoc train split (cached)."""
        if self.train is None:
            from .data import corpus_windows

            self.train = corpus_windows("pydoc", "train", self.tokenizer, self.profile.seq_len)
        return self.train

    def calibration(self, n: int | None = None) -> list[torch.Tensor]:
        """Calibration batches of training windows (``profile.calib_windows`` by default)."""
        from .data import calibration_batches

        n = n or self.profile.calib_windows
        return calibration_batches(self.train_windows(), n, self.profile.batch_size, seed=self.seed)


# ----------------------------------------------------------------------------------------------
# Saving, loading and measuring one model
# ----------------------------------------------------------------------------------------------


def _has_quantized_modules(model: nn.Module) -> bool:
    from .quantization.modules import QuantizedModule

    return any(isinstance(m, QuantizedModule) for m in model.modules())


def save_model(model: nn.Module, tokenizer, folder: str | Path) -> Path:
    """Save a (possibly quantized) model and its tokenizer as a safetensors folder that ``load_model`` reloads."""
    from .models import quiet_transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        if _has_quantized_modules(model):
            from .quantization.serialization import save_quantized

            save_quantized(model, folder)
        else:
            model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    write_manifest(folder)  # checksums of the weight files, checked by every load
    return folder


def load_saved(folder: str | Path, device=None) -> tuple[nn.Module, object]:
    """Reload a folder written by ``save_model``: ``(model, tokenizer or None)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import quiet_transformers
    from .profiles import default_device

    from ._folder import check_model_folder, loading_problems

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a saved model folder (no config.json)")
    device = torch.device(device) if device is not None else default_device()
    with quiet_transformers():
        if (folder / "quantization_config.json").is_file() or "distill_lab" in check_model_folder(folder)["meta"]:
            from .quantization.serialization import load_quantized

            model = load_quantized(folder, device=device)  # checks the folder itself
        else:
            model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False,
                                                               output_loading_info=True)
            problems = loading_problems(model, info.get("missing_keys", ()), info.get("unexpected_keys", ()),
                                        info.get("mismatched_keys", ()))
            if problems:
                raise DamagedFileError(f"model folder {str(folder)!r} does not match its config.json: "
                                       + "; ".join(problems))
        tokenizer = None
        if (folder / "tokenizer_config.json").is_file():  # tiny test models are saved without one
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def weights_bytes(folder: str | Path) -> int:
    """Bytes of the weight files (``*.safetensors``) in a saved model folder."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def eval_windows(tokenizer, profile: Profile) -> dict[str, torch.Tensor]:
    """The test windows every step is scored on: pydoc (in-domain) and stdlib-code (out-of-domain)."""
    from .data import corpus_windows

    return {name: corpus_windows(name, "test", tokenizer, profile.seq_len, max_windows=profile.eval_windows)
            for name in ("pydoc", "stdlib-code")}


def logical_parameters(model: nn.Module) -> int:
    """Parameters the model's architecture holds (counted from its config, so quantized models count too)."""
    from .arch import parameter_count

    return parameter_count(model.config)  # any family: biases, norms and all experts included


# speed depends on the machine and its load at the moment, so it is never reused from an earlier run:
# every speed-up divides two speeds measured in the same run
SPEED_KEYS = ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_ms_per_token")


def measure_speed(model: nn.Module, profile: Profile) -> dict:
    """Prefill tokens/s, decode tokens/s and ms/token of one model, at the profile's sizes."""
    from .evaluate import latency

    lat = latency(model, batch=profile.latency_batch, seq=profile.latency_seq,
                  decode_tokens=profile.decode_tokens, repeats=profile.repeats)
    return {k: lat[k] for k in SPEED_KEYS}


def measure(model: nn.Module, windows: dict[str, torch.Tensor], profile: Profile,
            folder: str | Path | None = None, progress: bool = False) -> dict:
    """Perplexity on each window set, size on disk, parameters, prefill and decode speed of one model."""
    from .evaluate import model_size_bytes, perplexity

    metrics = {}
    for name, w in windows.items():
        metrics[f"ppl_{name}"] = perplexity(model, w, batch_size=profile.batch_size, progress=progress)
    metrics["size_bytes"] = weights_bytes(folder) if folder is not None else model_size_bytes(model, on_disk=True)
    metrics["params"] = logical_parameters(model)
    metrics.update(measure_speed(model, profile))
    return metrics


def relative(metrics: dict, base: dict) -> dict:
    """Ratios against the teacher: ppl ratio, Δppl %, size reduction, prefill and decode speedups."""
    out = {}
    for key in metrics:
        if key.startswith("ppl_") and key in base:
            name = key[4:]
            out[f"ppl_ratio_{name}"] = metrics[key] / base[key]
            out[f"dppl_pct_{name}"] = 100.0 * (metrics[key] / base[key] - 1.0)
    out["size_reduction"] = base["size_bytes"] / metrics["size_bytes"]
    out["prefill_speedup"] = metrics["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
    out["decode_speedup"] = metrics["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    return out


# ----------------------------------------------------------------------------------------------
# Running a recipe
# ----------------------------------------------------------------------------------------------


class QualityGuardError(RuntimeError):
    """Raised when a step's perplexity ratio crosses the recipe's ``max_ppl_ratio``."""


@dataclass
class StepRecord:
    """What one finished step produced: its folder and measured metrics."""

    index: int  # 1-based position in the recipe
    kind: str  # step kind
    config: dict  # step config
    folder: str  # where the intermediate model is saved
    metrics: dict  # measured (see ``measure``) plus ratios to the teacher (see ``relative``)
    seconds: float  # time the step's transform took (0 when resumed)
    resumed: bool = False  # True when loaded from a previous run instead of recomputed
    extras: dict = field(default_factory=dict)  # what the step reported (loss history, what stayed in float)

    @property
    def label(self) -> str:
        """Short label such as ``2 distil``."""
        return f"{self.index} {self.kind}"


@dataclass
class RecipeResult:
    """The outcome of ``run_recipe``: teacher metrics, one record per step, the final model."""

    recipe: Recipe
    teacher: dict  # the teacher's metrics (same harness)
    steps: list  # list of StepRecord
    out_dir: str
    profile: str
    model: nn.Module | None = None  # the last step's model (in memory)

    @property
    def final(self) -> StepRecord:
        """The last finished step."""
        return self.steps[-1]

    def rows(self) -> list[dict]:
        """One row per stage (teacher first): the measured metrics and ratios to the teacher."""
        base = {"stage": "0 teacher", **self.teacher, **relative(self.teacher, self.teacher)}
        return [base] + [{"stage": s.label, **s.metrics} for s in self.steps if s.metrics]

    def markdown(self) -> str:
        """Markdown table of quality, size and speed after every step."""
        head = ("| stage | ppl pydoc | ppl ratio | ppl stdlib-code | size MiB | size reduction "
                "| prefill tok/s | decode tok/s |\n|---|---|---|---|---|---|---|---|")
        lines = [head]
        for r in self.rows():
            lines.append(f"| {r['stage']} | {r['ppl_pydoc']:.2f} | {r['ppl_ratio_pydoc']:.3f} | "
                         f"{r['ppl_stdlib-code']:.2f} | {r['size_bytes'] / 2**20:.1f} | "
                         f"{r['size_reduction']:.2f}× | {r['prefill_tokens_per_s']:.0f} | "
                         f"{r['decode_tokens_per_s']:.1f} |")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        """Plain data for JSON."""
        return {"recipe": self.recipe.to_dict(), "profile": self.profile, "out_dir": self.out_dir,
                "teacher": self.teacher,
                "steps": [{k: v for k, v in dataclasses.asdict(s).items()} for s in self.steps]}


STATE_FILE = "step.json"


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the package's Python sources: saved steps and teacher measurements from other code are not reused."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def model_digest(model: nn.Module) -> str:
    """SHA-256 (16 hex) of a model's state: names, dtypes, shapes and bytes of every tensor.

    Saved steps and cached teacher logits record the digest of the model they came from, so work
    done on one input model is never reused for another. The result is remembered on the model
    until one of its tensors changes (tensor version counters).
    """
    state = model.state_dict()
    key = tuple((k, v.data_ptr(), v._version) for k, v in state.items())
    cached = getattr(model, "_distill_lab_digest", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    digest = hashlib.sha256()
    for name, t in state.items():
        t = t.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(state[name].shape)}\0".encode())
        digest.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    value = digest.hexdigest()[:16]
    try:
        object.__setattr__(model, "_distill_lab_digest", (key, value))
    except (AttributeError, TypeError):
        pass
    return value


def _notice(message: str) -> None:
    """One line on stderr (printed even with progress bars off)."""
    import sys

    print(f"distill_lab: {message}", file=sys.stderr)


def _step_dir(out_dir: Path, index: int, kind: str) -> Path:
    return out_dir / "steps" / f"{index:02d}_{kind}"


def _finished(folder: Path, fingerprint: str, profile, input_digest: str | None = None,
              heal: bool = True) -> dict | None:
    """Return the saved state of a finished step if it matches its inputs: recipe prefix, input model, profile, code.

    A step folder whose files fail to open or fail their checksum is removed (``heal``) with a
    one-line notice, so the step is computed again.
    """
    from ._folder import check_model_folder

    state = folder / STATE_FILE
    if not state.is_file():
        return None
    try:
        data = json.loads(state.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError):
        data = None
    name = profile.name if isinstance(profile, Profile) else profile
    if data is not None:
        if data.get("fingerprint") != fingerprint or data.get("profile") != name:
            return None
        if data.get("code") != code_version():
            return None  # saved by another version of distill_lab: its numbers may not be what this code gives
        if isinstance(profile, Profile) and data.get("profile_sizes") != profile.to_dict():
            return None  # same profile name, different sizes (e.g. more distillation steps): recompute
        if input_digest is not None and data.get("input") != input_digest:
            return None  # made from another input model
    try:
        if data is None:
            raise DamagedFileError(f"{state}: unreadable")
        check_model_folder(folder)  # every weight file present, opens, and passes its checksum
    except DamagedFileError as err:
        if heal:
            _notice(f"saved step {folder} is damaged ({' '.join(str(err).split())[:160]}); removing it, "
                    f"it will be computed again")
            shutil.rmtree(folder, ignore_errors=True)
        return None
    return data


def _adopt_sibling(out_dir: Path, index: int, kind: str, fingerprint: str, profile: Profile,
                   input_digest: str | None = None) -> dict | None:
    """Copy a finished step with the same inputs (recipe prefix, input model, profile) from a sibling recipe folder."""
    name = f"{index:02d}_{kind}"
    for other in sorted(out_dir.parent.glob(f"*/steps/{name}")):
        if other.parent.parent == out_dir:
            continue
        state = _finished(other, fingerprint, profile, input_digest, heal=False)
        if state is None:
            continue
        final = _step_dir(out_dir, index, kind)
        tmp = make_tmp_dir(final.parent)
        try:
            for f in other.iterdir():
                try:
                    os.link(f, tmp / f.name)  # same file system: no copy
                except OSError:
                    shutil.copy2(f, tmp / f.name)
            replace_dir(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return state
    return None


def teacher_metrics(teacher: nn.Module, tokenizer, profile: Profile, windows=None,
                    cache: str | Path | None = None, progress: bool = True) -> dict:
    """Measure the teacher with the recipe harness; ``cache`` (JSON) keeps perplexity and size, never speed.

    Speed is measured again on every call, so the speed-ups computed against it compare two
    models timed in the same run (a cached speed from a busier or idler moment would skew them).
    The cache is read only when it holds the same profile and was written by the same code
    (``code_version()``).
    """
    cache = Path(cache) if cache is not None else None
    digest = model_digest(teacher)
    if cache is not None and cache.is_file():
        try:
            data = json.loads(cache.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("metrics", {}), dict):
                raise ValueError("not a teacher measurement")
        except (OSError, ValueError) as err:
            _notice(f"{cache} is damaged ({' '.join(str(err).split())[:120]}); measuring the teacher again")
            data = {}
        if data.get("profile") == profile.name and data.get("code") == code_version() \
                and data.get("profile_sizes") == profile.to_dict() and data.get("input") == digest:
            quality = {k: v for k, v in data["metrics"].items() if k not in SPEED_KEYS}
            return {**quality, **measure_speed(teacher, profile)}
    windows = windows if windows is not None else eval_windows(tokenizer, profile)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(teacher, None, tmp)  # size on disk measured from the file the teacher saves as
        metrics = measure(teacher, windows, profile, folder=tmp, progress=progress)
    if cache is not None:
        quality = {k: v for k, v in metrics.items() if k not in SPEED_KEYS}
        atomic_write_text(cache, json.dumps({"profile": profile.name, "code": code_version(),
                                              "profile_sizes": profile.to_dict(), "input": digest,
                                              "metrics": quality}, indent=2))
    return metrics


def run_recipe(teacher: nn.Module, tokenizer, recipe: Recipe, out_dir: str | Path,
               profile: Profile | str | None = None, seed: int = 0, windows=None,
               train_windows: torch.Tensor | None = None, teacher_stats: dict | None = None,
               progress: bool = True, resume: bool = True, keep_model: bool = True,
               cache_dir: str | Path | None = None, measure_steps: str = "all",
               share: bool = True) -> RecipeResult:
    """Apply ``recipe`` to a copy of ``teacher`` step by step, measuring and saving after each step.

    Every finished step is saved atomically under ``out_dir/steps/NN_kind/`` (model folder plus
    ``step.json`` with its metrics); a second call with the same recipe, profile and distill_lab
    code (``code_version()``) resumes after the last finished step, timing the reused steps again.
    ``windows`` (name -> (N, T) ids) overrides the test sets, and ``train_windows`` the training
    data (both needed for models that do not use the teacher's tokenizer). Raises ``QualityGuardError`` when a step's in-domain perplexity ratio exceeds
    ``recipe.max_ppl_ratio``; the offending step stays saved so the run can be inspected.
    ``measure_steps="last"`` measures only the final step (intermediate models are still saved);
    the quality guard then applies to the final step only. With ``share``, a step whose recipe prefix
    (same steps, same profile) was already finished by a sibling recipe in ``out_dir``'s parent folder
    is copied from there instead of recomputed (e.g. two recipes that start with the same prune step).
    """
    if measure_steps not in ("all", "last"):
        raise ValueError(f"measure_steps={measure_steps!r}; allowed: 'all', 'last'")
    from .profiles import set_seed

    profile = profile if isinstance(profile, Profile) else get_profile(profile)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for folder in {out_dir, out_dir / "steps", Path(cache_dir) if cache_dir is not None else out_dir}:
        clean_stale_tmp(folder)  # leftovers of an interrupted earlier run (distill_lab's own .tmp-dl-* only)
    recipe.save(out_dir / "recipe.yaml")
    input_digest = model_digest(teacher)  # a saved step is reused only for this very input model
    windows = windows if windows is not None else eval_windows(tokenizer, profile)
    if teacher_stats is None:
        teacher_stats = teacher_metrics(teacher, tokenizer, profile, windows, cache=out_dir / "teacher.json",
                                        progress=progress)
    ctx = StepContext(teacher=teacher, tokenizer=tokenizer, profile=profile, seed=seed,
                      progress=progress, train=train_windows, work_dir=out_dir,
                      cache_dir=Path(cache_dir) if cache_dir is not None else out_dir,
                      teacher_digest=input_digest)
    first_ppl_key = f"ppl_{next(iter(windows))}"

    # find the finished prefix (own folders first, then identical prefixes finished by sibling recipes)
    done: list[dict] = []
    for i, step in enumerate(recipe.steps):
        if not resume:
            break
        own = _step_dir(out_dir, i + 1, step.kind)
        state = _finished(own, recipe.fingerprint(i), profile, input_digest)
        if state is None and share:
            state = _adopt_sibling(out_dir, i + 1, step.kind, recipe.fingerprint(i), profile, input_digest)
        if state is None:
            break
        done.append(state)
    records = [StepRecord(index=i + 1, kind=s.kind, config=dict(s.config),
                          folder=str(_step_dir(out_dir, i + 1, s.kind)), metrics=done[i]["metrics"],
                          seconds=done[i].get("seconds", 0.0), resumed=True,
                          extras=done[i].get("extras", {}))
               for i, s in enumerate(recipe.steps[:len(done)])]
    if done:
        if progress:
            print(f"[{recipe.name}] resuming after step {len(done)} ({recipe.steps[len(done) - 1].kind}); "
                  f"steps 1..{len(done)} are reused from {len(done)} saved folder(s), their speed measured again")
        if records[-1].metrics:
            _check_guard(recipe, records[-1], first_ppl_key)
    device = next(teacher.parameters()).device
    model = None
    if len(done) < len(recipe.steps) or keep_model:
        if done:
            model, _ = load_saved(records[-1].folder, device=device)
        else:
            model = copy.deepcopy(teacher).eval()
    for record in records:  # the resumed steps: saved perplexity and size stand, speed is timed in this run
        if record.metrics:
            timed = model if record is records[-1] and model is not None else load_saved(record.folder, device)[0]
            record.metrics = {**record.metrics, **measure_speed(timed, profile)}
            record.metrics.update(relative(record.metrics, teacher_stats))
    bar = tqdm(total=len(recipe.steps), initial=len(done), desc=f"recipe {recipe.name}", unit="step",
               disable=not progress, leave=False)
    try:
        for i in range(len(done), len(recipe.steps)):
            step = recipe.steps[i]
            spec = STEPS[step.kind]
            set_seed(seed + i)
            bar.set_postfix_str(step.kind)
            start = time.perf_counter()
            ctx.extras = {}
            model = spec.apply(model, dict(step.config), ctx)
            model.eval()
            seconds = time.perf_counter() - start
            final = _step_dir(out_dir, i + 1, step.kind)
            tmp = make_tmp_dir(final.parent)
            try:
                save_model(model, tokenizer, tmp)
                metrics = {}
                if measure_steps == "all" or i == len(recipe.steps) - 1:
                    metrics = measure(model, windows, profile, folder=tmp, progress=False)
                    metrics.update(relative(metrics, teacher_stats))
                state = {"fingerprint": recipe.fingerprint(i), "input": input_digest, "code": code_version(),
                         "profile": profile.name, "profile_sizes": profile.to_dict(), "kind": step.kind,
                         "config": step.config, "metrics": metrics, "seconds": seconds,
                         "extras": ctx.extras}
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))  # save_model wrote the manifest
                share_permissions(tmp)
                replace_dir(tmp, final)  # atomic: a half-written step is never seen as finished
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            records.append(StepRecord(index=i + 1, kind=step.kind, config=dict(step.config),
                                      folder=str(final), metrics=metrics, seconds=seconds,
                                      extras=dict(ctx.extras)))
            # later steps of an older run are stale now
            for stale in (out_dir / "steps").glob(f"{i + 2:02d}_*"):
                if stale.name != final.name:
                    shutil.rmtree(stale, ignore_errors=True)
            bar.update(1)
            if progress and metrics:
                m = metrics
                print(f"[{recipe.name}] step {i + 1} {step.label}: ppl {m[first_ppl_key]:.2f} "
                      f"(×{m[f'ppl_ratio_{first_ppl_key[4:]}']:.2f}), {m['size_bytes'] / 2**20:.1f} MiB "
                      f"({m['size_reduction']:.1f}× smaller), {seconds:.0f} s")
            skipped = {k: v for k, v in ctx.extras.get("kept_in_float", {}).items() if "group_size" in str(v)}
            if skipped:  # printed even without progress: the user asked for these layers to be quantized
                _notice(f"[{recipe.name}] step {i + 1} {step.label}: {len(skipped)} layer(s) stayed in float "
                        f"because group_size does not divide their input width (e.g. {next(iter(skipped))}: "
                        f"{next(iter(skipped.values()))})")
            elif progress and ctx.extras.get("kept_in_float"):
                print(f"[{recipe.name}] step {i + 1}: {len(ctx.extras['kept_in_float'])} module(s) stayed in float "
                      f"(see the step's extras['kept_in_float'])")
            if metrics:
                _check_guard(recipe, records[-1], first_ppl_key)
    finally:
        bar.close()
    result = RecipeResult(recipe=recipe, teacher=teacher_stats, steps=records, out_dir=str(out_dir),
                          profile=profile.name, model=model if keep_model else None)
    atomic_write_text(out_dir / "result.json", json.dumps(result.to_dict(), indent=2))
    return result


HEALING_STEPS = ("distil", "qat")  # steps that recover quality: the guard skips the step just before them


def _check_guard(recipe: Recipe, rec: StepRecord, ppl_key: str) -> None:
    if recipe.max_ppl_ratio is None:
        return
    nxt = recipe.steps[rec.index] if rec.index < len(recipe.steps) else None
    if nxt is not None and nxt.kind in HEALING_STEPS:
        return  # e.g. prune -> distil: the pruned model is expected to be bad until it is healed
    ratio = rec.metrics[f"ppl_ratio_{ppl_key[4:]}"]
    if ratio > recipe.max_ppl_ratio:
        raise QualityGuardError(
            f"recipe {recipe.name!r} stopped after step {rec.index} ({rec.kind}): perplexity ratio "
            f"{ratio:.2f} > max_ppl_ratio {recipe.max_ppl_ratio:g} ({ppl_key[4:]} ppl "
            f"{rec.metrics[ppl_key]:.2f}); the model of that step is kept in {rec.folder}")


# ----------------------------------------------------------------------------------------------
# Built-in steps: student init, structured prune, distil (heal), quantize (PTQ), QAT
# ----------------------------------------------------------------------------------------------


@dataclass
class LayerDropStep:
    """Start a student from the teacher by keeping every ``keep_every``-th block (DistilBERT init)."""

    keep_every: int = 2  # keep blocks 0, k, 2k, ... (>= 1)
    layers: list | None = None  # explicit block indices instead of keep_every

    def __post_init__(self):
        if isinstance(self.keep_every, bool) or not isinstance(self.keep_every, int) or self.keep_every < 1:
            raise ValueError(f"keep_every={self.keep_every!r}; allowed: an int >= 1")
        if self.layers is not None and (not isinstance(self.layers, list) or not self.layers
                                        or not all(isinstance(i, int) and i >= 0 for i in self.layers)):
            raise ValueError(f"layers={self.layers!r}; allowed: null or a non-empty list of block indices")


def _validate_layer_drop(config: dict) -> None:
    _config_from(LayerDropStep, config, "step 'layer_drop'")


def _apply_layer_drop(model: nn.Module, config: dict, ctx: StepContext) -> nn.Module:
    from .models import make_student

    cfg = _config_from(LayerDropStep, config, "step 'layer_drop'")
    return make_student(model, "layer_drop", keep_every=cfg.keep_every, layers=cfg.layers, seed=ctx.seed)


def _prune_config(config: dict):
    from .pruning.structured import StructuredConfig

    return _config_from(StructuredConfig, config, "step 'prune'")


def _apply_prune(model: nn.Module, config: dict, ctx: StepContext) -> nn.Module:
    from .pruning.structured import prune_structured

    cfg = _prune_config(config)
    calibration = ctx.calibration() if cfg.needs_calibration else None
    return prune_structured(model, cfg, calibration=calibration, progress=False)


@dataclass
class DistilStep:
    """Distil the current model toward the teacher (healing after pruning), from cached top-k logits."""

    steps: int | None = None  # optimizer steps (null: profile.recipe_steps)
    batch_size: int | None = None  # windows per step (null: profile.recipe_batch)
    lr: float = 2e-4  # peak AdamW learning rate (warm-up, then cosine)
    temperature: float = 1.0  # distillation temperature T
    alpha: float = 1.0  # weight of the KD term (1 - alpha goes to cross-entropy on the labels)
    kind: str = "forward_kl"  # forward_kl, reverse_kl or jsd
    top_k: int | None = 64  # cached teacher logits per token (null: a live teacher, full vocabulary)
    bf16: bool | str = "auto"  # bf16 autocast for the student's forward (fp32 master weights); auto: if faster here

    def __post_init__(self):
        for name in ("steps", "batch_size", "top_k"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name}={v!r}; allowed: null or an int >= 1")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0 < self.lr <= 1:
            raise ValueError(f"lr={self.lr!r}; allowed: a number in (0, 1]")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r}; allowed: a number > 0")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha={self.alpha!r}; allowed: a number in [0, 1]")
        if self.kind not in ("forward_kl", "reverse_kl", "jsd"):
            raise ValueError(f"kind={self.kind!r}; allowed: forward_kl, reverse_kl, jsd")
        if not (isinstance(self.bf16, bool) or self.bf16 == "auto"):
            raise ValueError(f"bf16={self.bf16!r}; allowed: true, false or auto (measured on this machine)")


def _validate_distil(config: dict) -> None:
    _config_from(DistilStep, config, "step 'distil'")


def _teacher_cache(ctx: StepContext, windows: torch.Tensor, k: int):
    """Top-k teacher logits for ``windows``, computed once and cached on disk next to the recipe."""
    from .distillation import TeacherCache, cache_teacher_logits

    folder = ctx.cache_dir or ctx.work_dir
    digest = hashlib.sha256(windows.numpy().tobytes() + (ctx.teacher_digest or model_digest(ctx.teacher)).encode())
    path = Path(folder) / f"teacher_top{k}_{digest.hexdigest()[:12]}.safetensors" if folder is not None else None
    if path is not None and path.is_file():
        try:
            cache = TeacherCache.load(path)
            if cache.k != k or not torch.equal(cache.windows, windows):
                raise ValueError(f"holds k={cache.k} for other windows")
            return cache
        except Exception as err:  # SafetensorError (truncated), KeyError (a tensor missing), ValueError
            _notice(f"teacher logits cache {path} is damaged ({type(err).__name__}: "
                    f"{' '.join(str(err).split())[:120]}); removing it and computing it again")
            path.unlink(missing_ok=True)
    return cache_teacher_logits(ctx.teacher, windows, k=k, path=path, batch_size=ctx.profile.batch_size,
                                progress=ctx.progress)


def _distil_train(model: nn.Module, cfg: DistilStep, ctx: StepContext, before_train=None) -> dict:
    """Run the distillation trainer on ``model`` in place; return its history."""
    from .distillation import DistillationLoss, DistillationTrainer, TrainConfig

    steps = cfg.steps or ctx.profile.recipe_steps
    batch = cfg.batch_size or ctx.profile.recipe_batch
    windows = ctx.train_windows()
    windows = windows[:min(len(windows), steps * batch)]  # one pass at most; fewer teacher forwards
    batch = min(batch, len(windows))
    train = _teacher_cache(ctx, windows, cfg.top_k) if cfg.top_k else windows
    loss = DistillationLoss(temperature=cfg.temperature, alpha=cfg.alpha, kind=cfg.kind)
    tcfg = TrainConfig(steps=steps, batch_size=batch, lr=cfg.lr, warmup_steps=max(1, steps // 10),
                       bf16=cfg.bf16, seed=ctx.seed, progress=ctx.progress)
    trainer = DistillationTrainer(model, train, teacher=None if cfg.top_k else ctx.teacher,
                                  loss=loss, config=tcfg)
    history = trainer.train()
    model.eval()
    return history


def _apply_distil(model: nn.Module, config: dict, ctx: StepContext) -> nn.Module:
    cfg = _config_from(DistilStep, config, "step 'distil'")
    history = _distil_train(model, cfg, ctx)
    ctx.report("train_loss", [round(r["loss"], 5) for r in history["train"]])
    return model


QUANT_METHODS = ("int8", "w8a8", "int4")
QUANT_ALGORITHMS = {"rtn": QUANT_METHODS, "awq": ("int4",), "gptq": ("int4",), "smoothquant": ("w8a8",)}


@dataclass
class QuantizeStep:
    """Post-training quantization with real integer kernels (``distill_lab.quantization``)."""

    method: str = "int4"  # int8 (weight-only), w8a8 (dynamic activations) or int4 (weight-only, grouped)
    group_size: int = 64  # int4 only: weights per scale along the input dimension
    symmetric: bool = False  # int4 only: absmax grid (True) or min/max grid with zeros (False)
    embedding_bits: int | None = 8  # 8: embedding and tied head to int8; null: keep them in float
    algorithm: str = "rtn"  # rtn (round to nearest), awq or gptq (int4), smoothquant (w8a8); calibrated on pydoc train

    def __post_init__(self):
        if self.method not in QUANT_METHODS:
            raise ValueError(f"method={self.method!r}; allowed: {', '.join(QUANT_METHODS)}")
        if self.algorithm not in QUANT_ALGORITHMS:
            raise ValueError(f"algorithm={self.algorithm!r}; allowed: {', '.join(QUANT_ALGORITHMS)}")
        if self.method not in QUANT_ALGORITHMS[self.algorithm]:
            raise ValueError(f"algorithm={self.algorithm!r} with method={self.method!r}; allowed: algorithm "
                             f"{self.algorithm!r} needs method {' or '.join(QUANT_ALGORITHMS[self.algorithm])}")
        self.to_config()  # the quantize module checks the rest

    def to_config(self):
        """The ``distill_lab.quantization`` config this step stands for."""
        from .quantization import configs as q

        if self.method == "int8":
            return q.Int8WeightOnlyConfig(embedding_bits=self.embedding_bits)
        if self.method == "w8a8":
            return q.Int8DynamicConfig(embedding_bits=self.embedding_bits)
        return q.Int4WeightOnlyConfig(group_size=self.group_size, symmetric=self.symmetric,
                                      embedding_bits=self.embedding_bits)


def _quantized_kinds(model: nn.Module) -> dict:
    """Count the real quantized modules in ``model`` by kind."""
    from .quantization.modules import QuantizedModule

    kinds: dict = {}
    for m in model.modules():
        if isinstance(m, QuantizedModule):
            kinds[m.kind] = kinds.get(m.kind, 0) + 1
    return kinds


def _validate_quantize(config: dict) -> None:
    _config_from(QuantizeStep, config, "step 'quantize'")


def _apply_quantize(model: nn.Module, config: dict, ctx: StepContext) -> nn.Module:
    from .quantization.api import quantize_

    cfg = _config_from(QuantizeStep, config, "step 'quantize'")
    config = cfg.to_config()
    if cfg.algorithm in ("awq", "smoothquant"):
        from .quantization.awq import awq_
        from .quantization.configs import SmoothQuantConfig
        from .quantization.smoothquant import collect_activation_stats, smooth_

        stats = collect_activation_stats(model, ctx.calibration(), progress=False, seed=ctx.seed)
        if cfg.algorithm == "awq":
            ctx.report("awq_exponents", awq_(model, config, calibration=stats, progress=False))
        else:
            smooth_(model, SmoothQuantConfig(alpha=0.5), calibration=stats)
    if cfg.algorithm == "gptq":
        from .quantization.gptq import gptq_

        summary = gptq_(model, config, calibration=ctx.calibration(), progress=False)
    else:
        summary = quantize_(model, config)
    ctx.report("quantized", _quantized_kinds(model))
    ctx.report("kept_in_float", dict(summary.float_modules))
    return model


@dataclass
class QATStep(DistilStep):
    """Quantization-aware training: fake-quantize the Linears, distil toward the teacher, convert to real int modules."""

    method: str = "int4"  # int8, w8a8 or int4 (as in the quantize step)
    group_size: int = 64  # int4 only: weights per scale along the input dimension
    symmetric: bool = False  # int4 only: absmax grid (True) or min/max grid with zeros (False)
    embedding_bits: int | None = 8  # 8: embedding and tied head to int8 at convert; null: keep them in float

    def __post_init__(self):
        super().__post_init__()
        self.quantize_step()  # validates method, group_size, symmetric, embedding_bits

    def quantize_step(self) -> QuantizeStep:
        """The PTQ step with the same grid (what ``convert_`` produces)."""
        return QuantizeStep(self.method, self.group_size, self.symmetric, self.embedding_bits)

    def distil_step(self) -> DistilStep:
        """The distillation part of this step."""
        return DistilStep(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DistilStep)})


def _validate_qat(config: dict) -> None:
    _config_from(QATStep, config, "step 'qat'")


def _apply_qat(model: nn.Module, config: dict, ctx: StepContext) -> nn.Module:
    from .qat import convert_, prepare_qat_

    cfg = _config_from(QATStep, config, "step 'qat'")
    prepare_qat_(model, cfg.quantize_step().to_config())
    history = _distil_train(model, cfg.distil_step(), ctx)
    summary = convert_(model)
    ctx.report("train_loss", [round(r["loss"], 5) for r in history["train"]])
    ctx.report("quantized", dict(summary.replaced))
    ctx.report("kept_in_float", dict(summary.float_modules))
    return model


register_step("layer_drop", _apply_layer_drop, _validate_layer_drop,
              "student = every k-th block of the current model (DistilBERT init); knobs: keep_every, layers")
register_step("prune", _apply_prune, lambda c: _prune_config(c),
              "structured pruning of heads / MLP channels / layers (distill_lab.pruning.StructuredConfig)")
register_step("distil", _apply_distil, _validate_distil,
              "distil toward the teacher from cached top-k logits; knobs: steps, batch_size, lr, temperature, "
              "alpha, kind, top_k, bf16")
register_step("quantize", _apply_quantize, _validate_quantize,
              "post-training quantization with integer kernels; knobs: method (int8, w8a8, int4), group_size, "
              "symmetric, embedding_bits")
register_step("qat", _apply_qat, _validate_qat,
              "quantization-aware training with distillation, then real int modules; knobs: those of quantize "
              "and distil")


# ----------------------------------------------------------------------------------------------
# The seed's comparison table, measured
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedClaim:
    """One row of the seed's comparison table: size reduction, speed-up and quality loss, as ranges."""

    size: tuple  # (low, high) times smaller
    speed: tuple  # (low, high) times faster
    quality_loss_pct: tuple  # (low, high) percent worse (we measure Δ perplexity %)

    def text(self) -> str:
        """The claim as the seed writes it, e.g. ``4× / 2–3× / <1%``."""
        def rng(lo, hi, unit):
            return f"{lo:g}{unit}" if lo == hi else f"{lo:g}–{hi:g}{unit}"
        q = self.quality_loss_pct
        quality = f"<{q[1]:g}%" if q[0] == 0 else rng(q[0], q[1], "%")
        return f"{rng(*self.size, '×')} / {rng(*self.speed, '×')} / {quality}"


def combined_recipe(max_ppl_ratio: float | None = None) -> Recipe:
    """The course's combined recipe: structured prune → distil (heal) → int4 g64 blocks (AWQ) + int8 embedding."""
    return Recipe("combined", [
        Step("prune", {"heads_keep": 0.67, "channels_keep": 0.375, "layers_keep": 0.8, "method": "activation"}),
        Step("distil", {"top_k": 64, "lr": 3e-4}),
        Step("quantize", {"method": "int4", "group_size": 64, "embedding_bits": 8, "algorithm": "awq"}),
    ], max_ppl_ratio=max_ppl_ratio,
        description="prune heads and MLP channels and drop layers, heal by distillation from cached top-k "
                    "teacher logits, int4 g64 blocks (AWQ scaling) + int8 embedding")


def seed_rows() -> list[tuple[str, Recipe, SeedClaim]]:
    """The seed's five rows: (name, the recipe that measures it on the teacher, the seed's claim)."""
    return [
        ("INT8 quantization", Recipe("int8", [Step("quantize", {"method": "w8a8", "embedding_bits": 8,
                                                                 "algorithm": "smoothquant"})],
                                     description="W8A8 (torch._int_mm) blocks after SmoothQuant (alpha 0.5) "
                                                 "+ int8 embedding and head"),
         SeedClaim((4, 4), (2, 3), (0, 1))),
        ("INT4 quantization", Recipe("int4", [Step("quantize", {"method": "int4", "group_size": 64,
                                                                 "embedding_bits": 8, "algorithm": "awq"})],
                                     description="int4 g64 weight-only blocks (AWQ scaling) + int8 embedding "
                                                 "and head"),
         SeedClaim((8, 8), (3, 4), (1, 3))),
        ("Distillation", Recipe("distillation", [Step("layer_drop", {"keep_every": 2}),
                                                 Step("distil", {"top_k": 64, "lr": 3e-4})],
                                description="15-layer student (every 2nd block), distilled from top-64 logits"),
         SeedClaim((5, 10), (5, 10), (2, 5))),
        ("50% pruning", Recipe("pruning50", [Step("prune", {"heads_keep": 0.67, "channels_keep": 0.45,
                                                            "method": "activation"}),
                                             Step("distil", {"top_k": 64, "lr": 3e-4})],
                               description="structured: 1/3 of query heads and 55% of MLP channels removed "
                                           "(half the block parameters), healed by distillation"),
         SeedClaim((2, 2), (1.5, 1.5), (1, 2))),
        ("Combined", combined_recipe(), SeedClaim((10, 20), (5, 10), (3, 8))),
    ]


def verdict(measured: dict, claim: SeedClaim, tolerance: float = 0.9) -> dict:
    """Compare one measured row with the seed's claim: per-column booleans, an overall word and a reason."""
    size_ok = measured["size_reduction"] >= tolerance * claim.size[0]
    best_speed = max(measured["prefill_speedup"], measured["decode_speedup"])
    speed_ok = best_speed >= tolerance * claim.speed[0]
    quality_ok = measured["dppl_pct_pydoc"] <= claim.quality_loss_pct[1]
    held = [size_ok, speed_ok, quality_ok]
    word = "holds" if all(held) else "does not hold" if not any(held) else "partly holds"
    names = ("size", "speed", "quality")
    why = ", ".join(f"{n} {'✓' if ok else '✗'}" for n, ok in zip(names, held))
    return {"size": size_ok, "speed": speed_ok, "quality": quality_ok, "verdict": word, "why": why}


@dataclass
class ComparisonTable:
    """The measured comparison table: one row per technique, the teacher, the profile."""

    rows: list  # dicts: name, recipe, description, claim, metrics (with ratios), verdict
    teacher: dict  # the teacher's metrics
    profile: str
    env: dict = field(default_factory=dict)

    def markdown(self) -> str:
        """Markdown table: size, speed and quality measured, the seed's claim, a verdict."""
        t = self.teacher
        lines = [f"Measured on the teacher (SmolLM2-135M-Instruct, fp32: {t['size_bytes'] / 2**20:.0f} MiB, "
                 f"pydoc test ppl {t['ppl_pydoc']:.2f}, stdlib-code ppl {t['ppl_stdlib-code']:.2f}, prefill "
                 f"{t['prefill_tokens_per_s']:.0f} tok/s, decode {t['decode_tokens_per_s']:.1f} tok/s), "
                 f"{self.profile} profile.", "",
                 "| technique | size on disk | size reduction | prefill speed-up | decode speed-up | "
                 "Δppl pydoc | ppl ratio | Δppl stdlib-code | claimed (size / speed / loss) | verdict |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            m, v = r["metrics"], r["verdict"]
            lines.append(
                f"| {r['name']} | {m['size_bytes'] / 2**20:.1f} MiB | {m['size_reduction']:.1f}× | "
                f"{m['prefill_speedup']:.2f}× | {m['decode_speedup']:.2f}× | {m['dppl_pct_pydoc']:+.1f}% | "
                f"{m['ppl_ratio_pydoc']:.3f} | {m['dppl_pct_stdlib-code']:+.1f}% | {r['claim']} | "
                f"{v['verdict']} ({v['why']}) |")
        lines += ["", "What each row ran:", ""]
        lines += [f"- **{r['name']}**: {r['description']} (`{r['recipe_text']}`)" for r in self.rows]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        """Plain data for JSON."""
        return {"profile": self.profile, "teacher": self.teacher, "rows": self.rows, "env": self.env}

    def pareto_points(self) -> list[dict]:
        """Points for the Pareto plot: name, size MiB, ppl ratio, decode ms/token (teacher first)."""
        t = self.teacher
        pts = [{"name": "teacher (fp32)", "size_mib": t["size_bytes"] / 2**20, "ppl_ratio": 1.0,
                "decode_ms": t["decode_ms_per_token"]}]
        pts += [{"name": r["name"], "size_mib": r["metrics"]["size_bytes"] / 2**20,
                 "ppl_ratio": r["metrics"]["ppl_ratio_pydoc"], "decode_ms": r["metrics"]["decode_ms_per_token"]}
                for r in self.rows]
        return pts

    def save(self, folder: str | Path = "reports") -> list[Path]:
        """Write ``comparison.md``, ``comparison.json`` and ``comparison_pareto.png`` into ``folder``."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        from .plotting import plot_pareto

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        md, js, png = folder / "comparison.md", folder / "comparison.json", folder / "comparison_pareto.png"
        atomic_write_text(md, f"# The claims table (size, speed, quality), measured ({self.profile} profile)\n\n"
                               + self.markdown())
        atomic_write_text(js, json.dumps(self.to_dict(), indent=2))
        fig = plot_pareto(self.pareto_points())
        fig.savefig(png, dpi=110, bbox_inches="tight")
        plt.close(fig)
        return [md, js, png]


def comparison_table(teacher: nn.Module, tokenizer, profile: Profile | str | None = None,
                     work_dir: str | Path | None = None, rows=None, seed: int = 0,
                     progress: bool = True, results: dict | None = None,
                     measure_steps: str = "last") -> ComparisonTable:
    """Measure the seed's five rows on ``teacher`` (each a recipe; finished rows are reused from ``work_dir``).

    ``rows`` defaults to ``seed_rows()``; ``results`` maps a row name to a ``RecipeResult`` that was
    already run (e.g. the notebook's combined recipe) so it is not run again.
    """
    from .evaluate import environment_info
    from .models import cache_dir

    profile = profile if isinstance(profile, Profile) else get_profile(profile)
    work_dir = Path(work_dir) if work_dir is not None else cache_dir() / f"compare-{profile.name}"
    work_dir.mkdir(parents=True, exist_ok=True)
    rows = rows if rows is not None else seed_rows()
    results = dict(results or {})
    windows = eval_windows(tokenizer, profile)
    base = teacher_metrics(teacher, tokenizer, profile, windows, cache=work_dir / "teacher.json", progress=progress)
    out = []
    for name, recipe, claim in tqdm(rows, desc="comparison rows", unit="row", disable=not progress):
        result = results.get(name)
        if result is None:
            result = run_recipe(teacher, tokenizer, recipe, work_dir / recipe.name, profile=profile, seed=seed,
                                windows=windows, teacher_stats=base, progress=progress, keep_model=False,
                                cache_dir=work_dir, measure_steps=measure_steps)
        m = dict(result.final.metrics)
        m.update(relative(m, base))  # ratios against this table's teacher measurement
        out.append({"name": name, "recipe": recipe.to_dict(), "description": recipe.description,
                    "recipe_text": " → ".join(s.label for s in recipe.steps),
                    "claim": claim.text(), "claim_ranges": dataclasses.asdict(claim),
                    "metrics": m, "verdict": verdict(m, claim),
                    "steps": [{"stage": s.label, **s.metrics} for s in result.steps if s.metrics]})
    return ComparisonTable(rows=out, teacher=base, profile=profile.name, env=environment_info())


# the notebook panel's quantize choices: label -> (method, algorithm); None = no quantize step
QUANTIZE_KNOBS = {"none": None, "int8": ("int8", "rtn"), "w8a8": ("w8a8", "rtn"),
                  "w8a8 + SmoothQuant": ("w8a8", "smoothquant"), "int4": ("int4", "rtn"),
                  "int4 + AWQ": ("int4", "awq")}


def recipe_from_knobs(heads_keep: float = 1.0, channels_keep: float = 1.0, layers_keep: float = 1.0,
                      distil_steps: int = 0, quantize: str = "none", method: str = "activation",
                      max_ppl_ratio: float | None = None) -> Recipe:
    """Build a prune → distil → quantize recipe from the notebook panel's knobs (steps with no effect are left out)."""
    steps = []
    prune = {k: v for k, v in (("heads_keep", heads_keep), ("channels_keep", channels_keep),
                               ("layers_keep", layers_keep)) if v < 1.0}
    if prune:
        steps.append(Step("prune", {**prune, "method": method}))
    if distil_steps:
        steps.append(Step("distil", {"steps": int(distil_steps), "top_k": 64, "lr": 3e-4}))
    if quantize not in QUANTIZE_KNOBS:
        raise ValueError(f"quantize={quantize!r}; allowed: {', '.join(map(repr, QUANTIZE_KNOBS))}")
    if QUANTIZE_KNOBS[quantize] is not None:
        method, algorithm = QUANTIZE_KNOBS[quantize]
        q = {"method": method, "group_size": 64, "embedding_bits": 8} if method == "int4" else \
            {"method": method, "embedding_bits": 8}
        steps.append(Step("quantize", {**q, "algorithm": algorithm} if algorithm != "rtn" else q))
    if not steps:
        raise ValueError("the knobs select no step; allowed: at least one of heads/MLP/layers < 1, "
                         "distil steps > 0, or a quantize method")
    name = "panel-" + hashlib.sha256(json.dumps([s.to_dict() for s in steps]).encode()).hexdigest()[:8]
    return Recipe(name, steps, max_ppl_ratio=max_ppl_ratio, description="built from the notebook's knobs")
