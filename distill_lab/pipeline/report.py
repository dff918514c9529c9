"""The claims table: the course document's rows, each measured by a recipe
on the real teacher, with its verdict computed from the numbers.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
from torch import nn
from tqdm.auto import tqdm

from .._fs import atomic_write_text
from ..claims import MARKS
from ..claims import verdict as summarise
from ..evaluate import LM_EVAL_HINT, environment_info, require_lm_eval, task_accuracy
from ..models import cache_dir
from ..plotting import plot_pareto
from ..profiles import Profile, get_profile
from ..runtime import device_of
from ..serialization import load_saved
from .measure import eval_windows, relative, speedup
from .recipe import Recipe, Step
from .runner import run_recipe, teacher_metrics

__all__ = ["CLAIMS_TASK", "CLAIMS_TASK_LIMIT", "ComparisonTable", "STUDENT_DISTIL", "STUDENT_PRUNE", "SeedClaim",
           "combined_recipe", "comparison_table",
           "seed_rows", "verdict"]


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


# task accuracy beside perplexity (lm-evaluation-harness, an offline task): documents scored per model;
# the verdicts stay on the claims table's quality-loss column (Δ perplexity), accuracy is shown with its standard error
CLAIMS_TASK = "pydoc_mc"
CLAIMS_TASK_LIMIT = {"smoke": 16, "laptop": 150, "gpu": None}


def _accuracy(model: nn.Module, tokenizer, task: str, limit: int | None) -> dict:
    """``acc_<task>``, ``acc_stderr_<task>``, ``acc_n_<task>`` and ``acc_chance_<task>`` of one model."""
    r = task_accuracy(model, tokenizer, task, limit=limit, progress=False)[task]
    return {f"acc_{task}": r["acc"], f"acc_stderr_{task}": r["acc_stderr"], f"acc_n_{task}": r["n"],
            f"acc_chance_{task}": r.get("chance")}


# the student of notebook 01 (22 of 30 blocks by Block Influence, 19 of 24 groups of 64 MLP channels)
STUDENT_PRUNE = {"layers_keep": 0.7333, "channels_keep": 0.7917, "importance": "activation"}
STUDENT_DISTIL = {"top_k": 64, "lr": 3e-4, "alpha": 0.5}


def combined_recipe(max_ppl_ratio: float | None = None) -> Recipe:
    """The course's combined recipe: notebook 01's student, distilled, then int4 everywhere (embedding included).

    Prune 8 of 30 blocks (Block Influence) and 320 of the 1536 MLP channels (activation importance;
    notebook 01 keeps 1229, rounded here to 1216 = 19 whole groups of 64 so every down_proj can be int4),
    heal by distillation from cached top-64 teacher logits (KD + CE, alpha 0.5), then int4 g64 for every
    block Linear (AWQ scaling) and for the embedding with its tied head (``embedding_bits: 4``).
    """
    return Recipe("combined", [
        Step("prune", dict(STUDENT_PRUNE)),
        Step("distil", dict(STUDENT_DISTIL)),
        Step("quantize", {"format": "int4", "group_size": 64, "embedding_bits": 4, "algorithm": "awq"}),
    ], max_ppl_ratio=max_ppl_ratio,
        description="notebook 01's student with its MLP rounded to whole groups of 64: 22 of 30 blocks (Block "
                    "Influence) and 1216 of 1536 MLP channels (activation importance), distilled from cached "
                    "top-64 teacher logits (KD + CE, alpha 0.5), int4 g64 blocks (AWQ scaling) + int4 g64 "
                    "embedding and tied head")


def seed_rows() -> list[tuple[str, Recipe, SeedClaim]]:
    """The seed's five rows: (name, the recipe that measures it on the teacher, the seed's claim).

    The Distillation row is the combined recipe's first two steps (notebook 01's student, distilled):
    in a run that has the combined recipe's folder next to it, that row is adopted, not trained again.
    """
    combined = combined_recipe()
    return [
        ("INT8 quantization", Recipe("int8", [Step("quantize", {"format": "w8a8", "embedding_bits": 8,
                                                                 "algorithm": "smoothquant"})],
                                     description="W8A8 (torch._int_mm) blocks after SmoothQuant (alpha 0.5) "
                                                 "+ int8 embedding and head"),
         SeedClaim((4, 4), (2, 3), (0, 1))),
        ("INT4 quantization", Recipe("int4", [Step("quantize", {"format": "int4", "group_size": 64,
                                                                 "embedding_bits": 4, "algorithm": "awq"})],
                                     description="int4 g64 weight-only everywhere: blocks (AWQ scaling), embedding "
                                                 "and tied head"),
         SeedClaim((8, 8), (3, 4), (1, 3))),
        ("Distillation", Recipe("distillation", combined.steps[:2],
                                description="the combined recipe's student: notebook 01's, with 1216 instead of "
                                            "1229 MLP channels (whole groups of 64) and 22 of 30 blocks, 1.6x fewer "
                                            "block parameters; distilled for recipe_steps x recipe_batch windows "
                                            "of seq_len tokens (notebook 01: 128-token windows)"),
         SeedClaim((5, 10), (5, 10), (2, 5))),
        ("50% pruning", Recipe("pruning50", [Step("prune", {"heads_keep": 0.67, "channels_keep": 0.45,
                                                            "importance": "activation"}),
                                             Step("distil", {"top_k": 64, "lr": 3e-4})],
                               description="structured: 1/3 of query heads and 55% of MLP channels removed "
                                           "(half the block parameters), healed by distillation"),
         SeedClaim((2, 2), (1.5, 1.5), (1, 2))),
        ("Combined", combined, SeedClaim((10, 20), (5, 10), (3, 8))),
    ]


def verdict(measured: dict, claim: SeedClaim, tolerance: float = 0.9) -> dict:
    """Compare one measured row with the seed's claim: per-column checks, an overall word and a reason.

    Speed takes the better phase (prefill or decode, by median) and its spread: the check is ``None``
    ("within noise") when the interquartile range of that phase's speed-up crosses ``tolerance`` times
    the claim's lower end (``timing.SpeedRatio.holds``).
    """
    size_ok = measured["size_reduction"] >= tolerance * claim.size[0]
    best = max((speedup(measured, phase) for phase in ("prefill", "decode")), key=lambda r: r.median)
    speed_ok = best.holds(tolerance * claim.speed[0])
    quality_ok = measured["dppl_pct_pydoc"] <= claim.quality_loss_pct[1]
    checks = {"size": size_ok, "speed": speed_ok, "quality": quality_ok}
    word = summarise(checks)
    why = ", ".join(f"{n} {MARKS[ok]}" for n, ok in checks.items())
    return {**checks, "verdict": word.split(" (")[0], "why": why}


@dataclass
class ComparisonTable:
    """The measured comparison table: one row per technique, the teacher, the profile."""

    rows: list  # dicts: name, recipe, description, claim, metrics (with ratios), verdict
    teacher: dict  # the teacher's metrics
    profile: str
    env: dict = field(default_factory=dict)
    task: str | None = None  # the lm-eval task of the accuracy column (None: no column)

    def markdown(self) -> str:
        """Markdown table: size, speed and quality measured, the seed's claim, a verdict."""
        t, task = self.teacher, self.task
        acc = ""
        if task is not None:
            chance = t.get(f"acc_chance_{task}")
            acc = (f", {task} accuracy {t[f'acc_{task}']:.3f} ± {t[f'acc_stderr_{task}']:.3f} on "
                   f"{t[f'acc_n_{task}']} documents" + (f" (chance {chance:.2f})" if chance is not None else ""))
        lines = [f"Measured on the teacher (SmolLM2-135M-Instruct, fp32: {t['size_bytes'] / 2**20:.0f} MiB, "
                 f"pydoc test ppl {t['ppl_pydoc']:.2f}, stdlib-code ppl {t['ppl_stdlib-code']:.2f}{acc}, prefill "
                 f"{t['prefill_tokens_per_s']:.0f} tok/s, decode {t['decode_tokens_per_s']:.1f} tok/s), "
                 f"{self.profile} profile.", "",
                 "| technique | size on disk | size reduction | prefill speed-up (IQR) | decode speed-up (IQR) | "
                 "Δppl pydoc | ppl ratio | Δppl stdlib-code | "
                 + (f"{task} accuracy (± s.e.) | " if task else "")
                 + "claimed (size / speed / loss) | verdict |",
                 "|---|---|---|---|---|---|---|---|---|" + ("---|" if task else "") + "---|"]
        for r in self.rows:
            m, v = r["metrics"], r["verdict"]
            lines.append(
                f"| {r['name']} | {m['size_bytes'] / 2**20:.1f} MiB | {m['size_reduction']:.1f}× | "
                f"{speedup(m, 'prefill')} | {speedup(m, 'decode')} | {m['dppl_pct_pydoc']:+.2f}% | "
                f"{m['ppl_ratio_pydoc']:.3f} | {m['dppl_pct_stdlib-code']:+.1f}% | "
                + (f"{m[f'acc_{task}']:.3f} ± {m[f'acc_stderr_{task}']:.3f} | " if task else "")
                + f"{r['claim']} | {v['verdict']} ({v['why']}) |")
        if task:
            lines += ["", f"The verdicts judge quality by Δppl, the claims table's quality-loss column; the {task} "
                          f"accuracy (lm-evaluation-harness, an offline task of distill_lab) is shown beside it, with "
                          f"its standard error: two accuracies closer than about twice the standard error of their "
                          f"difference are not different on this evidence."]
        lines += ["", "What each row ran:", ""]
        lines += [f"- **{r['name']}**: {r['description']} (`{r['recipe_text']}`)" for r in self.rows]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        """Plain data for JSON."""
        return {"profile": self.profile, "teacher": self.teacher, "rows": self.rows, "env": self.env,
                "task": self.task}

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
        matplotlib.use("Agg", force=False)
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
                     measure_steps: str = "last", teacher_stats: dict | None = None,
                     task: str | None = "auto") -> ComparisonTable:
    """Measure the seed's five rows on ``teacher`` (each a recipe; finished rows are reused from ``work_dir``).

    ``rows`` defaults to ``seed_rows()``; ``results`` maps a row name to a ``RecipeResult`` that was
    already run (e.g. the notebook's combined recipe) so it is not run again; ``teacher_stats``, the
    teacher measured in this run on the same windows (``teacher_metrics``), so it is not measured again.
    ``task``: an lm-eval task scored on the teacher and on every row's final model (its saved folder),
    ``CLAIMS_TASK_LIMIT[profile]`` documents each; ``"auto"`` is ``CLAIMS_TASK`` when lm-eval is installed
    (else no accuracy column, with a notice), ``None`` none.
    """
    if task == "auto":
        try:
            require_lm_eval()
            task = CLAIMS_TASK
        except ImportError:
            task = None
            print(f"no task-accuracy column in the claims table: {LM_EVAL_HINT}")

    profile = profile if isinstance(profile, Profile) else get_profile(profile)
    work_dir = Path(work_dir) if work_dir is not None else cache_dir() / f"compare-{profile.name}"
    work_dir.mkdir(parents=True, exist_ok=True)
    rows = rows if rows is not None else seed_rows()
    results = dict(results or {})
    windows = eval_windows(tokenizer, profile)
    base = teacher_stats if teacher_stats is not None else \
        teacher_metrics(teacher, tokenizer, profile, windows, cache=work_dir / "teacher.json", progress=progress)
    limit = CLAIMS_TASK_LIMIT.get(profile.name)
    if task is not None and f"acc_{task}" not in base:
        base = {**base, **_accuracy(teacher, tokenizer, task, limit)}
    out = []
    for name, recipe, claim in tqdm(rows, desc="comparison rows", unit="row", disable=not progress):
        result = results.get(name)
        if result is None:
            result = run_recipe(teacher, tokenizer, recipe, work_dir / recipe.name, profile=profile, seed=seed,
                                windows=windows, teacher_stats=base, progress=progress, keep_model=False,
                                cache_dir=work_dir, measure_steps=measure_steps)
        m = dict(result.final.metrics)
        m.update(relative(m, base))  # ratios against this table's teacher measurement
        if task is not None:
            model = result.model if result.model is not None else load_saved(result.final.folder,
                                                                              device=device_of(teacher))[0]
            m.update(_accuracy(model, tokenizer, task, limit))
            m[f"dacc_{task}"] = 100.0 * (m[f"acc_{task}"] - base[f"acc_{task}"])  # points
            del model
        out.append({"name": name, "recipe": recipe.to_dict(), "description": recipe.description,
                    "recipe_text": " → ".join(s.label for s in recipe.steps),
                    "claim": claim.text(), "claim_ranges": dataclasses.asdict(claim),
                    "metrics": m, "verdict": verdict(m, claim),
                    "steps": [{"stage": s.label, **s.metrics} for s in result.steps if s.metrics]})
    return ComparisonTable(rows=out, teacher=base, profile=profile.name, env=environment_info(), task=task)
