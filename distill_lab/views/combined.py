"""Notebook 04's recipe panel: its knobs, and the recipe they build (the panel itself is ``widgets.recipe_panel``).

The knobs are plain values (fractions kept, distillation steps, a quantize choice, the embedding's
bits); ``recipe_from_knobs`` turns them into a ``pipeline.Recipe`` that ``pipeline.run_recipe`` runs
like any YAML recipe.
"""

from __future__ import annotations

import hashlib
import json

from ..pipeline import Recipe, Step
from ..pipeline.report import HEAL_QUANT, STUDENT_DISTIL
from ..quantization import formats  # noqa: F401  the built-in formats register their knobs
from ..quantization.registry import quantize_knobs

__all__ = ["QUANTIZE_KNOBS", "recipe_from_knobs"]

# the notebook panel's quantize choices: label -> (format, algorithm), as each format registers them
# (quantization/formats.py); None = no quantize step; "qat": the combined recipe's last step (a qat step
# that starts from AWQ + GPTQ's int4 grid, pipeline.report.HEAL_QUANT)
QUANTIZE_KNOBS = {"none": None, **quantize_knobs(), "int4 QAT from AWQ + GPTQ": ("int4", "qat")}


def recipe_from_knobs(heads_keep: float = 1.0, channels_keep: float = 1.0, layers_keep: float = 1.0,
                      distil_steps: int = 0, quantize: str = "none", embedding_bits: int | None = 4,
                      importance: str = "activation", alpha: float = STUDENT_DISTIL["alpha"],
                      max_ppl_ratio: float | None = None) -> Recipe:
    """Build a prune → distil → quantize recipe from the notebook panel's knobs (steps with no effect are left out).

    ``importance`` ranks heads and channels (``StructuredConfig.importance``); ``quantize`` picks a format
    and algorithm from ``QUANTIZE_KNOBS``; ``embedding_bits`` (4, 8 or None for float) is the embedding's
    and tied head's format when there is a quantize step; ``alpha`` weighs KD against CE in the distil step.
    """
    steps = []
    prune = {k: v for k, v in (("heads_keep", heads_keep), ("channels_keep", channels_keep),
                               ("layers_keep", layers_keep)) if v < 1.0}
    if prune:
        steps.append(Step("prune", {**prune, "importance": importance}))
    if distil_steps:
        steps.append(Step("distil", {"steps": int(distil_steps), **STUDENT_DISTIL, "alpha": alpha}))
    if quantize not in QUANTIZE_KNOBS:
        raise ValueError(f"quantize={quantize!r}; allowed: {', '.join(map(repr, QUANTIZE_KNOBS))}")
    if QUANTIZE_KNOBS[quantize] is not None:
        fmt, algorithm = QUANTIZE_KNOBS[quantize]
        q = {"format": fmt, "group_size": 64, "embedding_bits": embedding_bits} if fmt == "int4" else \
            {"format": fmt, "embedding_bits": embedding_bits}
        if algorithm == "qat":
            steps.append(Step("qat", {**HEAL_QUANT, **q, "alpha": alpha}))
        else:
            steps.append(Step("quantize", {**q, "algorithm": algorithm} if algorithm != "rtn" else q))
    if not steps:
        raise ValueError("the knobs select no step; allowed: at least one of heads/MLP/layers < 1, "
                         "distil steps > 0, or a quantize format")
    name = "panel-" + hashlib.sha256(json.dumps([s.to_dict() for s in steps]).encode()).hexdigest()[:8]
    return Recipe(name, steps, max_ppl_ratio=max_ppl_ratio, description="built from the notebook's knobs")
