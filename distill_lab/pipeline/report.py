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
from .measure import SPEED_KEYS, eval_windows, measure_speeds, relative, speedup
from .recipe import Recipe, Step
from .runner import run_recipe, teacher_metrics

__all__ = ["CLAIMS_TASK", "CLAIMS_TASK_LIMIT", "ComparisonTable", "HEAL_QUANT", "INT4_EVERYWHERE", "STUDENT_DISTIL",
           "STUDENT_PRUNE", "SeedClaim",
           "LLAMACPP_COLUMNS", "SPEED_COLUMNS", "VERDICT_PHASES",
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
CLAIMS_TASK_LIMIT = {"smoke": 16, "laptop": 100, "gpu": None}


def _accuracy(model: nn.Module, tokenizer, task: str, limit: int | None) -> dict:
    """``acc_<task>``, ``acc_stderr_<task>``, ``acc_n_<task>`` and ``acc_chance_<task>`` of one model."""
    r = task_accuracy(model, tokenizer, task, limit=limit, progress=False)[task]
    return {f"acc_{task}": r["acc"], f"acc_stderr_{task}": r["acc_stderr"], f"acc_n_{task}": r["n"],
            f"acc_chance_{task}": r.get("chance")}


# the combined recipe's student: all 30 blocks, half of every block's MLP channels (768 of 1536, 12 whole groups
# of 64). Lesson 01's levers table measured this width-only student ahead of its own 22-block student at equal
# parameters, and so did the recipe harness on 40 test windows (distilled: perplexity ratio 1.33 against 1.61)
STUDENT_PRUNE = {"channels_keep": 0.5, "importance": "activation"}
STUDENT_DISTIL = {"top_k": 64, "lr": 3e-4, "alpha": 0.5}
# int4 g64 everywhere: every block Linear, and the embedding with its tied head (the file is 10x smaller)
INT4_EVERYWHERE = {"format": "int4", "group_size": 64, "embedding_bits": 4}
# the combined recipe's last step: quantization-aware distillation from lesson 02's best one-shot int4 (AWQ + GPTQ),
# the embedding's rounding trained through too, then the real int4 modules
HEAL_QUANT = {**INT4_EVERYWHERE, "start": "awq+gptq", "steps": 10, "top_k": 64, "lr": 5e-5, "alpha": 0.5}


def combined_recipe(max_ppl_ratio: float | None = None) -> Recipe:
    """The course's combined recipe: prune to the width student, distil, then quantization-aware distillation to int4.

    Prune half of every block's MLP channels (activation importance; all 30 blocks kept), heal by
    distillation from cached top-64 teacher logits (KD + CE, alpha 0.5), then quantize every block
    Linear to int4 g64 with AWQ scaling and GPTQ rounding, and the embedding with its tied head to int4
    g64, and heal that rounding with 10 steps of quantization-aware distillation (the fake-quantized
    model, embedding and head included, trained toward the same cached teacher logits; Liu et al., 2023,
    LLM-QAT, arXiv:2305.17888) before the real int4 modules are built.
    """
    return Recipe("combined", [
        Step("prune", dict(STUDENT_PRUNE)),
        Step("distil", dict(STUDENT_DISTIL)),
        Step("qat", dict(HEAL_QUANT)),
    ], max_ppl_ratio=max_ppl_ratio,
        description="the width student, all 30 blocks, 768 of 1536 MLP channels (activation importance), "
                    "distilled from cached top-64 teacher logits (KD + CE, alpha 0.5), then int4 g64 blocks "
                    "(AWQ scaling + GPTQ rounding) and int4 g64 embedding and tied head, healed by 10 steps of "
                    "quantization-aware distillation from that grid")


def seed_rows() -> list[tuple[str, Recipe, SeedClaim]]:
    """The seed's five rows: (name, the recipe that measures it on the teacher, the seed's claim).

    The Distillation row is the combined recipe's first two steps (the width student, distilled):
    in a run that has the combined recipe's folder next to it, that row is adopted, not trained again.
    """
    combined = combined_recipe()
    return [
        ("INT8 quantization", Recipe("int8", [Step("quantize", {"format": "w8a8", "embedding_bits": 8,
                                                                 "algorithm": "smoothquant"})],
                                     description="W8A8 (torch._int_mm) blocks after SmoothQuant (alpha 0.5) "
                                                 "+ int8 embedding and head"),
         SeedClaim((4, 4), (2, 3), (0, 1))),
        ("INT4 quantization", Recipe("int4", [Step("quantize", {**INT4_EVERYWHERE, "embedding_bits": 8,
                                                                 "algorithm": "awq+gptq"})],
                                     description="lesson 02's best one-shot variant: int4 g64 weight-only blocks (AWQ "
                                                 "scaling + GPTQ rounding), int8 embedding and tied head (an int4 "
                                                 "embedding gives 7.1x at +13 % perplexity, docs/results.md)"),
         SeedClaim((8, 8), (3, 4), (1, 3))),
        ("Distillation", Recipe("distillation", combined.steps[:2],
                                description="the combined recipe's student: all 30 blocks with half of their MLP "
                                            "channels (768 of 1536), 1.6x fewer block parameters; distilled for "
                                            "recipe_steps x recipe_batch windows of seq_len tokens"),
         SeedClaim((5, 10), (5, 10), (2, 5))),
        ("50% pruning", Recipe("pruning50", [Step("prune", {"heads_keep": 0.67, "channels_keep": 0.45,
                                                            "importance": "activation"}),
                                             Step("distil", {"top_k": 64, "lr": 3e-4})],
                               description="structured: 1/3 of query heads and 55% of MLP channels removed "
                                           "(half the block parameters), healed by distillation"),
         SeedClaim((2, 2), (1.5, 1.5), (1, 2))),
        ("Combined", combined, SeedClaim((10, 20), (5, 10), (3, 8))),
    ]


# the table's speed-up columns: label -> phase (measure.SPEED_PHASES)
SPEED_COLUMNS = {"prefill": "prefill", "decode, HF forward": "decode", "decode, lean vs lean fp32": "decode_lean",
                 "decode, lean vs HF fp32": "decode_lean_hf", "decode, llama.cpp vs llama.cpp fp32": "decode_llamacpp",
                 "decode, llama.cpp vs HF fp32": "decode_llamacpp_hf"}
# the llama.cpp columns appear only where llama-cpp-python is installed (``comparison_table(llama_cpp=...)``)
LLAMACPP_COLUMNS = ("decode, llama.cpp vs llama.cpp fp32", "decode, llama.cpp vs HF fp32")
# the speed-ups a verdict may use: each compares a model with the fp32 teacher in the same engine
VERDICT_PHASES = ("prefill", "decode", "decode_lean", "decode_llamacpp")


def verdict(measured: dict, claim: SeedClaim, tolerance: float = 0.9) -> dict:
    """Compare one measured row with the seed's claim: per-column checks, an overall word and a reason.

    Speed takes the best like-for-like speed-up (by median) and its spread: prefill, decode through the
    Hugging Face forward against the fp32 teacher's, decode through the lean decoder against the fp32
    teacher's lean decode, and (where timed) llama.cpp against the fp32 teacher's F32 GGUF in llama.cpp
    (``VERDICT_PHASES``; never one engine against another). The check is ``None`` ("within noise") when the interquartile range of that speed-up crosses
    ``tolerance`` times the claim's lower end (``timing.SpeedRatio.holds``).
    """
    size_ok = measured["size_reduction"] >= tolerance * claim.size[0]
    ratios = [r for r in (speedup(measured, phase) for phase in VERDICT_PHASES) if r is not None]
    best = max(ratios, key=lambda r: r.median)
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
        lean, cpp = t.get("decode_lean_tokens_per_s"), t.get("decode_llamacpp_tokens_per_s")
        columns = self.speed_columns()
        windows = f" on {t['eval_windows_pydoc']} windows" if "eval_windows_pydoc" in t else ""
        engines = [f"{lean:.1f} tok/s in the lean decoder"] if lean else []
        engines += [f"{cpp:.1f} tok/s in llama.cpp (F32 GGUF)"] if cpp else []
        decode = (f"decode {t['decode_tokens_per_s']:.1f} tok/s in the Hugging Face forward"
                  + "".join(f", {e}" for e in engines[:-1]) + (f" and {engines[-1]}" if engines else ""))
        baselines = {0: "", 1: "the two fp32 baselines", 2: "the three fp32 baselines"}[len(engines)]
        lines = [f"Measured on the teacher (SmolLM2-135M-Instruct, fp32: {t['size_bytes'] / 2**20:.0f} MiB, "
                 f"pydoc test ppl {t['ppl_pydoc']:.2f}{windows}, stdlib-code "
                 f"ppl {t['ppl_stdlib-code']:.2f}{acc}, prefill {t['prefill_tokens_per_s']:.0f} tok/s, {decode}"
                 + (f": {baselines}" if baselines else "") + f"), {self.profile} profile.", "",
                 "| technique | size on disk | size reduction | "
                 + "".join(f"{c} (IQR) | " if c != "prefill" else "prefill speed-up (IQR) | " for c in columns)
                 + "Δppl pydoc | ppl ratio | Δppl stdlib-code | "
                 + (f"{task} accuracy (± s.e.) | " if task else "")
                 + "claimed (size / speed / loss) | verdict |",
                 "|---|---|---|" + "---|" * len(columns) + "---|---|---|" + ("---|" if task else "") + "---|---|"]
        for r in self.rows:
            m, v = r["metrics"], r["verdict"]
            speeds = "".join(f"{speedup(m, SPEED_COLUMNS[c]) or '—'} | " for c in columns)
            lines.append(
                f"| {r['name']} | {m['size_bytes'] / 2**20:.1f} MiB | {m['size_reduction']:.1f}× | {speeds}"
                f"{m['dppl_pct_pydoc']:+.2f}% | "
                f"{m['ppl_ratio_pydoc']:.3f} | {m['dppl_pct_stdlib-code']:+.1f}% | "
                + (f"{m[f'acc_{task}']:.3f} ± {m[f'acc_stderr_{task}']:.3f} | " if task else "")
                + f"{r['claim']} | {v['verdict']} ({v['why']}) |")
        lines += ["", "Decode engines: *HF forward* is the Hugging Face model's own `forward` with its KV cache, "
                      "against the fp32 teacher in the same forward; *lean* is `distill_lab.decode.StaticDecoder` "
                      "(static KV cache, fused projections, the int4 kernel called directly: a deployment in "
                      "PyTorch), against the fp32 teacher in the same lean decoder (like for like) and against the "
                      "fp32 teacher's HF forward (the gain over the plain model)"
                      + ("; *llama.cpp* is the row's model exported by `distill_lab.export.to_gguf` (int4 as Q4_1, "
                         "int8 as Q8_0, float as F32) and decoded by llama.cpp through llama-cpp-python on the same "
                         "threads, against the fp32 teacher's F32 GGUF in llama.cpp and against its HF forward"
                         if LLAMACPP_COLUMNS[0] in columns else "")
                      + ". The speed verdict takes the best like-for-like column (prefill, HF decode, lean decode"
                      + (", llama.cpp decode" if LLAMACPP_COLUMNS[0] in columns else "") + ")"
                      + ("; a dash: that engine does not serve that model (the reason is in comparison.json)."
                         if any(f"{p}_skipped" in r["metrics"] for r in self.rows
                                for p in ("decode_lean", "decode_llamacpp")) else ".")]
        if LLAMACPP_COLUMNS[0] not in columns and t.get("decode_llamacpp_skipped"):
            lines += ["", f"No llama.cpp columns: {t['decode_llamacpp_skipped']}."]
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

    def speed_columns(self) -> list[str]:
        """The labels of ``SPEED_COLUMNS`` this table has: the llama.cpp ones only where llama.cpp was timed."""
        timed = any(speedup(r["metrics"], "decode_llamacpp_hf") is not None for r in self.rows)
        return [c for c in SPEED_COLUMNS if timed or c not in LLAMACPP_COLUMNS]

    def speed_bars(self) -> dict[str, dict[str, tuple | None]]:
        """Per row, each speed-up column as ``(median, low, high)`` (None where not measured), for ``plot_speedups``."""
        out = {}
        for r in self.rows:
            ratios = {label: speedup(r["metrics"], SPEED_COLUMNS[label]) for label in self.speed_columns()}
            out[r["name"].replace(" quantization", "")] = {label: None if x is None else (x.median, x.low, x.high)
                                                           for label, x in ratios.items()}
        return out

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
                     task: str | None = "auto", llama_cpp: bool = True) -> ComparisonTable:
    """Measure the seed's five rows on ``teacher`` (each a recipe; finished rows are reused from ``work_dir``).

    ``rows`` defaults to ``seed_rows()``; ``results`` maps a row name to a ``RecipeResult`` that was
    already run (e.g. the notebook's combined recipe) so it is not run again; ``teacher_stats``, the
    teacher measured in this run on the same windows (``teacher_metrics``), so it is not measured again.
    ``task``: an lm-eval task scored on the teacher and on every row's final model (its saved folder),
    ``CLAIMS_TASK_LIMIT[profile]`` documents each; ``"auto"`` is ``CLAIMS_TASK`` when lm-eval is installed
    (else no accuracy column, with a notice), ``None`` none.
    Speed: every row's final model and the teacher are timed together, in the same rounds (``measure_speeds``:
    the Hugging Face forward at prefill and decode, and the lean decoder at decode), after all rows ran;
    a row's own earlier timing (a ``results`` entry's) is not used. With ``llama_cpp`` and llama-cpp-python
    installed, every row and the teacher are also exported to GGUF and decoded by llama.cpp in those rounds
    (two more columns); without it the table says llama.cpp was not timed, and why.
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
        teacher_metrics(teacher, tokenizer, profile, windows, cache=work_dir / "teacher.json", progress=progress,
                        speed=False)  # timed below, in the same rounds as every row
    limit = CLAIMS_TASK_LIMIT.get(profile.name)
    if task is not None and f"acc_{task}" not in base:
        base = {**base, **_accuracy(teacher, tokenizer, task, limit)}
    results_of, models = {}, {}
    for name, recipe, claim in tqdm(rows, desc="comparison rows", unit="row", disable=not progress):
        result = results.get(name)
        if result is None:
            result = run_recipe(teacher, tokenizer, recipe, work_dir / recipe.name, profile=profile, seed=seed,
                                windows=windows, teacher_stats=base, progress=progress, keep_model=False,
                                cache_dir=work_dir, measure_steps=measure_steps, timing="none")
        results_of[name] = result
        models[name] = result.model if result.model is not None else load_saved(result.final.folder,
                                                                                device=device_of(teacher))[0]
    # every row's final model and the teacher, timed in the same rounds (the teacher once per round)
    speeds = measure_speeds(models, profile, against=teacher, llama_cpp=llama_cpp, tokenizer=tokenizer)
    base = {**base, **speeds.pop("__against__")}  # the two fp32 baselines (HF forward, lean) of these rounds
    out = []
    for name, recipe, claim in rows:
        result = results_of[name]
        m = {k: v for k, v in result.final.metrics.items() if k not in SPEED_KEYS}
        m.update(speeds[name])
        m.update(relative(m, base))  # ratios against this table's teacher measurement
        if task is not None:
            m.update(_accuracy(models[name], tokenizer, task, limit))
            m[f"dacc_{task}"] = 100.0 * (m[f"acc_{task}"] - base[f"acc_{task}"])  # points
        out.append({"name": name, "recipe": recipe.to_dict(), "description": recipe.description,
                    "recipe_text": " → ".join(s.label for s in recipe.steps),
                    "claim": claim.text(), "claim_ranges": dataclasses.asdict(claim),
                    "metrics": m, "verdict": verdict(m, claim),
                    "steps": [{"stage": s.label, **s.metrics} for s in result.steps if s.metrics]})
    del models
    return ComparisonTable(rows=out, teacher=base, profile=profile.name, env=environment_info(), task=task)
