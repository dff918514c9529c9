"""Algorithm lab of notebook 04: a recipe runner with a quality guard, written by the learner.

The course document's practice "monitor quality after every step" as code: apply the steps of a
recipe (prune → distil → quantize) one after the other, measure the perplexity ratio to the teacher
after each, and stop as soon as a step pushes the ratio past the guard, handing back the last model
that passed (never the one that failed). A step followed by a healing step (``distil``, ``qat``) is
not judged: a pruned model is expected to be bad until it is healed (``pipeline.run_recipe`` does the
same, with saved steps and resume); a ratio that is not finite (NaN, Inf) fails any step. The learner writes the loop:

    run_guarded(model, steps, ratio, max_ratio) -> (model, history)

``steps`` is a list of ``(label, step)`` where ``step(model) -> model`` may change its input;
``ratio(model) -> float`` is the perplexity ratio to the teacher. ``history`` holds one
``{"step", "ratio", "judged", "kept"}`` row per step run.
"""

from __future__ import annotations

import copy
import math

from ._check import label_of, not_attempted, yours_or_reference
from ._package import HEALING_STEPS

__all__ = ["check_run_guarded", "guarded_recipe_lab", "run_guarded_reference"]


def run_guarded_reference(model, steps, ratio, max_ratio: float):
    """Apply ``steps`` in order; stop at the first judged step over ``max_ratio``; return the last model that passed."""
    history, good = [], model
    for i, (label, step) in enumerate(steps):
        model = step(copy.deepcopy(model))  # a step may change its input: the last good model stays intact
        r = float(ratio(model))
        judged = not (i + 1 < len(steps) and steps[i + 1][0] in HEALING_STEPS) or not math.isfinite(r)
        kept = math.isfinite(r) and (not judged or r <= max_ratio)
        history.append({"step": label, "ratio": r, "judged": judged, "kept": kept})
        if not kept:
            break
        if judged:
            good = model
    return good, history


class _Box:
    """A stand-in model for the check: a value the steps change in place."""

    def __init__(self, value: float):
        self.value = value

    def __deepcopy__(self, memo):
        return _Box(self.value)


def _scale(f):
    def step(box):
        box.value *= f  # in place, as real steps (prune_, quantize_) change their model
        return box
    return step


def _cases():
    steps = [("prune", _scale(3.0)), ("distil", _scale(0.4)), ("quantize", _scale(1.3)), ("requantize", _scale(1.2))]
    no_heal = [("prune", _scale(3.0)), ("quantize", _scale(1.3))]
    broken = [("prune", _scale(float("nan"))), ("distil", _scale(0.4))]
    return [(steps, 2.0, "prune 3.0 (not judged: distil follows), distil 1.2, quantize 1.56, requantize 1.87: all pass"),
            (steps, 1.5, "distil 1.2 passes, quantize 1.56 does not: the distilled model comes back"),
            (steps, 1.1, "distil 1.2 already fails: the input model comes back"),
            (steps, 1.56, "quantize 1.56 passes (at most the guard), requantize 1.87 does not"),
            (no_heal, 2.0, "no healing step follows prune, so prune 3.0 is judged and fails"),
            (broken, 2.0, "prune gives NaN: broken outputs fail even before a healing step")]


def check_run_guarded(fn) -> bool:
    """Check ``fn(model, steps, ratio, max_ratio) -> (model, history)`` on stand-in models whose ratio is their value."""
    for i, (steps, guard, why) in enumerate(_cases()):
        try:
            got_model, got_history = fn(_Box(1.0), steps, lambda m: m.value, guard)
        except NotImplementedError:
            return not_attempted("recipe runner with a quality guard")
        want_model, want_history = run_guarded_reference(_Box(1.0), steps, lambda m: m.value, guard)
        where = f"case {i} (guard {guard}: {why})"
        ran, want_ran = [h.get("step") for h in got_history], [h["step"] for h in want_history]
        if ran != want_ran:
            if len(ran) > len(want_ran) and not all(math.isfinite(h["ratio"]) for h in want_history):
                hint = ("a NaN ratio was let through: a ratio that is not a finite number fails the step, even one "
                        "followed by a healing step (math.isfinite)")
            elif len(ran) > len(want_ran):
                hint = "the runner did not stop: after the first judged step whose ratio exceeds the guard, stop"
            elif ran and ran[-1] == "prune" and "distil" in want_ran:
                hint = ("the pruned model was judged before healing: skip the guard for a step followed by a "
                        f"healing step ({', '.join(HEALING_STEPS)})")
            else:
                hint = "the runner stopped too early: a step passes when its ratio is at most max_ratio (<=)"
            raise AssertionError(f"recipe runner: {where}: ran {ran}, expected {want_ran}\n  likely mistake: {hint}")
        if any(not math.isclose(float(g.get("ratio", 0.0)), w["ratio"], abs_tol=1e-9) and math.isfinite(w["ratio"])
               for g, w in zip(got_history, want_history)):
            raise AssertionError(f"recipe runner: {where}: the history's ratios {[g.get('ratio') for g in got_history]} "
                                 f"are not {[w['ratio'] for w in want_history]}\n  likely mistake: measure each "
                                 "step's result after the step, not the model before it")
        if abs(got_model.value - want_model.value) > 1e-9:
            raise AssertionError(f"recipe runner: {where}: returned a model with ratio {got_model.value:.3g}, "
                                 f"expected {want_model.value:.3g}\n  likely mistake: hand back the last model that "
                                 "passed a judged step; the steps change their model in place, so run each on a copy "
                                 "(copy.deepcopy) or the last good model is gone")
    print(f"recipe runner with a quality guard: correct on all {len(_cases())} recipes.")
    return True


def guarded_recipe_lab(teacher, steps, ratio, run_guarded, max_ratio: float) -> dict:
    """Run the learner's guarded runner on the real teacher, then the package's loop on the same steps.

    Returns ``{"history", "package_history", "by", "model"}`` (the learner's final model).
    """
    run = yours_or_reference(run_guarded, run_guarded_reference, "my_run_guarded")
    model, history = run(copy.deepcopy(teacher), steps, ratio, max_ratio)
    if run.fell_back:  # the reference ran already: its history is the package's
        return {"history": history, "package_history": history, "by": label_of(run), "model": model}
    _, package_history = run_guarded_reference(copy.deepcopy(teacher), steps, ratio, max_ratio)
    return {"history": history, "package_history": package_history, "by": label_of(run), "model": model}
