"""Running a recipe: each step saved in its own folder, reused only when its inputs match,
measured, and stopped by the quality guard when it costs more than the recipe allows.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .._folder import check_model_folder
from .._fs import DamagedFileError, atomic_folder, atomic_write_text, clean_stale_tmp
from ..profiles import Profile, get_profile, set_seed
from ..runtime import device_of
from ..serialization import load_saved, save_model
from ..timing import stopwatch
from .context import StepContext, _notice, code_version, model_digest
from .measure import SPEED_KEYS, eval_windows, measure, measure_speed, relative
from .recipe import STEPS, Recipe
from .steps import group_size_skips
from .workdir import STATE_FILE, check_work_dir, record_work

__all__ = ["HEALING_STEPS", "QualityGuardError", "RecipeResult", "StepRecord", "run_recipe", "teacher_metrics"]


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
                         f"{r['size_reduction']:.2f}× | {_number(r.get('prefill_tokens_per_s'), '.0f')} | "
                         f"{_number(r.get('decode_tokens_per_s'), '.1f')} |")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        """Plain data for JSON."""
        return {"recipe": self.recipe.to_dict(), "profile": self.profile, "out_dir": self.out_dir,
                "teacher": self.teacher,
                "steps": [{k: v for k, v in dataclasses.asdict(s).items()} for s in self.steps]}


def _number(value, fmt: str) -> str:
    """``value`` formatted, or a dash for a step that was not timed."""
    return "—" if value is None else format(value, fmt)


def _step_dir(out_dir: Path, index: int, kind: str) -> Path:
    return out_dir / "steps" / f"{index:02d}_{kind}"


def _finished(folder: Path, fingerprint: str, profile, input_digest: str | None = None,
              heal: bool = True) -> dict | None:
    """Return the saved state of a finished step if it matches its inputs: recipe prefix, input model, profile, code.

    A step folder whose files fail to open or fail their checksum is removed (``heal``) with a
    one-line notice, so the step is computed again.
    """

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
        with atomic_folder(final, manifest=False, ours_only=False) as tmp:  # the step's own manifest comes along
            for f in other.iterdir():
                try:
                    os.link(f, tmp / f.name)  # same file system: no copy
                except OSError:
                    shutil.copy2(f, tmp / f.name)
        return state
    return None


def teacher_metrics(teacher: nn.Module, tokenizer, profile: Profile, windows=None,
                    cache: str | Path | None = None, progress: bool = True, speed: bool = True) -> dict:
    """Measure the teacher with the recipe harness; ``cache`` (JSON) keeps perplexity and size, never speed.

    Speed is measured again on every call (without ``speed``, not at all: for a caller that times the
    teacher in the same rounds as its models anyway), so the speed-ups computed against it compare two
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
            return {**quality, **(measure_speed(teacher, profile) if speed else {})}
    windows = windows if windows is not None else eval_windows(tokenizer, profile)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(teacher, None, tmp)  # size on disk measured from the file the teacher saves as
        metrics = measure(teacher, windows, profile, folder=tmp, progress=progress, speed=speed)
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
               share: bool = True, timing: str = "all") -> RecipeResult:
    """Apply ``recipe`` to a copy of ``teacher`` step by step, measuring and saving after each step.

    Every finished step is saved atomically under ``out_dir/steps/NN_kind/`` (model folder plus
    ``step.json`` with its metrics); a second call with the same recipe, profile and distill_lab
    code (``code_version()``) resumes after the last finished step, timing the reused steps again.
    ``windows`` (name -> (N, T) ids) overrides the test sets, and ``train_windows`` the training
    data (both needed for models that do not use the teacher's tokenizer). Raises ``QualityGuardError`` when a step's in-domain perplexity ratio exceeds
    ``recipe.max_ppl_ratio``; the offending step stays saved so the run can be inspected.
    ``measure_steps="last"`` measures only the final step (intermediate models are still saved);
    the quality guard then applies to the final step only. ``timing`` says which measured steps are
    also timed (prefill and decode against the teacher, in the same rounds): ``"all"``, ``"last"`` (the
    final step: quality after every step, speed where it matters) or ``"none"`` (a caller that times
    several recipes' models together, as ``comparison_table`` does). With ``share``, a step whose recipe prefix
    (same steps, same profile) was already finished by a sibling recipe in ``out_dir``'s parent folder
    is copied from there instead of recomputed (e.g. two recipes that start with the same prune step).
    ``out_dir`` must be new, empty or a folder an earlier run_recipe wrote and nobody added to
    (``check_work_dir``, marked by ``distill_lab_work.json``): anything else raises ``FileExistsError``.
    """
    if measure_steps not in ("all", "last"):
        raise ValueError(f"measure_steps={measure_steps!r}; allowed: 'all', 'last'")
    if timing not in ("all", "last", "none"):
        raise ValueError(f"timing={timing!r}; allowed: 'all', 'last', 'none'")

    profile = profile if isinstance(profile, Profile) else get_profile(profile)
    out_dir = Path(out_dir)
    check_work_dir(out_dir)  # before anything is written: a folder of someone else's files is never touched
    out_dir.mkdir(parents=True, exist_ok=True)
    for folder in {out_dir, out_dir / "steps", Path(cache_dir) if cache_dir is not None else out_dir}:
        clean_stale_tmp(folder)  # leftovers of an interrupted earlier run (distill_lab's own .tmp-dl-* only)
    record_work(out_dir, writing="recipe.yaml")
    recipe.save(out_dir / "recipe.yaml")
    record_work(out_dir)
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
    def is_timed(index: int) -> bool:  # 0-based step index
        return timing == "all" or (timing == "last" and index == len(recipe.steps) - 1)

    if done:
        if progress:
            n_timed = sum(is_timed(i) for i in range(len(done))
                          if measure_steps == "all" or i == len(recipe.steps) - 1)
            timed = "" if not n_timed else (", its speed is measured again" if n_timed == 1
                                            else ", their speed is measured again")
            reused = f"step {len(done)} is" if len(done) == 1 else f"steps 1..{len(done)} are"
            print(f"[{recipe.name}] resuming after step {len(done)} ({recipe.steps[len(done) - 1].kind}): "
                  f"{reused} reused from saved folders{timed}"
                  + (" (only the last step is measured)" if measure_steps == "last" and len(done) > 1 else ""))
        if records[-1].metrics:
            _check_guard(recipe, records[-1], first_ppl_key)
    device = device_of(teacher)
    model = None
    if len(done) < len(recipe.steps) or keep_model:
        if done:
            model, _ = load_saved(records[-1].folder, device=device)
        else:
            model = copy.deepcopy(teacher).eval()
    for record in records:  # the resumed steps: saved perplexity and size stand, speed is timed in this run
        if measure_steps == "last" and record is not records[-1]:
            record.metrics = {}  # measured by an earlier run that measured every step; here only the last counts
        if record.metrics:
            record.metrics = {k: v for k, v in record.metrics.items() if k not in SPEED_KEYS}  # never reused
            if is_timed(record.index - 1):
                timed = model if record is records[-1] and model is not None else load_saved(record.folder,
                                                                                               device)[0]
                record.metrics.update(measure_speed(timed, profile, against=teacher))
            record.metrics.update(relative(record.metrics, teacher_stats))
    bar = tqdm(total=len(recipe.steps), initial=len(done), desc=f"recipe {recipe.name}", unit="step",
               disable=not progress, leave=False)
    try:
        for i in range(len(done), len(recipe.steps)):
            step = recipe.steps[i]
            spec = STEPS[step.kind]
            set_seed(seed + i)
            bar.set_postfix_str(step.kind)
            elapsed = stopwatch()
            ctx.extras = {}
            model = spec.apply(model, dict(step.config), ctx)
            model.eval()
            seconds = elapsed()
            final = _step_dir(out_dir, i + 1, step.kind)
            # atomic: a half-written step is never seen as finished; a damaged one is replaced
            with atomic_folder(final, manifest=False, ours_only=False) as tmp:
                save_model(model, tokenizer, tmp)
                metrics = {}
                if measure_steps == "all" or i == len(recipe.steps) - 1:
                    metrics = measure(model, windows, profile, folder=tmp, progress=False, against=teacher,
                                      speed=is_timed(i))
                    metrics.update(relative(metrics, teacher_stats))
                    _check_finite(recipe, StepRecord(i + 1, step.kind, dict(step.config), "", metrics, seconds),
                                  first_ppl_key)  # a NaN model is never saved as a finished step
                state = {"fingerprint": recipe.fingerprint(i), "input": input_digest, "code": code_version(),
                         "profile": profile.name, "profile_sizes": profile.to_dict(), "kind": step.kind,
                         "config": step.config, "metrics": metrics, "seconds": seconds,
                         "extras": ctx.extras}
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))  # save_model wrote the manifest
            records.append(StepRecord(index=i + 1, kind=step.kind, config=dict(step.config),
                                      folder=str(final), metrics=metrics, seconds=seconds,
                                      extras=dict(ctx.extras)))
            # later steps of an older run are stale now
            for stale in (out_dir / "steps").glob(f"{i + 2:02d}_*"):
                if stale.name != final.name and (stale / STATE_FILE).is_file() and not stale.is_symlink():
                    shutil.rmtree(stale, ignore_errors=True)  # only a step folder run_recipe wrote
            bar.update(1)
            if progress and metrics:
                m = metrics
                print(f"[{recipe.name}] step {i + 1} {step.label}: ppl {m[first_ppl_key]:.2f} "
                      f"(×{m[f'ppl_ratio_{first_ppl_key[4:]}']:.2f}), {m['size_bytes'] / 2**20:.1f} MiB "
                      f"({m['size_reduction']:.1f}× smaller), {seconds:.0f} s")
            skipped = group_size_skips(ctx.extras)
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
    record_work(out_dir, writing="result.json")
    atomic_write_text(out_dir / "result.json", json.dumps(result.to_dict(), indent=2))
    record_work(out_dir)
    return result


HEALING_STEPS = ("distil", "qat")  # steps that recover quality: the guard skips the step just before them


def _check_finite(recipe: Recipe, rec: StepRecord, ppl_key: str) -> None:
    """Raise ``QualityGuardError`` when the step's perplexity (or its ratio) is NaN or infinite."""
    ratio, ppl = rec.metrics[f"ppl_ratio_{ppl_key[4:]}"], rec.metrics[ppl_key]
    if math.isfinite(ratio) and math.isfinite(ppl):
        return
    where = "it was not saved" if not rec.folder else f"its saved model in {rec.folder} is not exported"
    raise QualityGuardError(f"recipe {recipe.name!r} stopped after step {rec.index} ({rec.kind}): {ppl_key[4:]} "
                            f"perplexity is {ppl} (ratio {ratio}), not a finite number: the model's outputs hold "
                            f"NaN or Inf; {where}")


def _check_guard(recipe: Recipe, rec: StepRecord, ppl_key: str) -> None:
    """Raise ``QualityGuardError`` when the step's perplexity ratio is over ``max_ppl_ratio``, or not finite.

    A NaN or infinite perplexity fails with or without a limit, even before a healing step: the
    model's outputs are not numbers, and training from it cannot recover.
    """
    _check_finite(recipe, rec, ppl_key)
    ratio = rec.metrics[f"ppl_ratio_{ppl_key[4:]}"]
    if recipe.max_ppl_ratio is None:
        return
    nxt = recipe.steps[rec.index] if rec.index < len(recipe.steps) else None
    if nxt is not None and nxt.kind in HEALING_STEPS:
        return  # e.g. prune -> distil: the pruned model is expected to be bad until it is healed
    if ratio > recipe.max_ppl_ratio:
        raise QualityGuardError(
            f"recipe {recipe.name!r} stopped after step {rec.index} ({rec.kind}): perplexity ratio "
            f"{ratio:.2f} > max_ppl_ratio {recipe.max_ppl_ratio:g} ({ppl_key[4:]} ppl "
            f"{rec.metrics[ppl_key]:.2f}); the model of that step is kept in {rec.folder}")
