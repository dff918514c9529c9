"""Task accuracy through EleutherAI's lm-evaluation-harness, offline: ``task_accuracy`` and its printout.

Perplexity says how well a model predicts text; task accuracy says how often it picks the right answer,
the number compression papers report next to it. ``task_accuracy`` runs the harness (Gao et al., 2023)
on any model the package loads: the offline tasks of ``evaluate/tasks`` (``OFFLINE_TASKS``, reached
through the harness's ``include_path``) need nothing but this package; any other name is handed to the
harness as it is (``hellaswag``, ``arc_easy``, ...), whose data comes from the Hugging Face hub, so
online only. lm-eval itself is optional: ``pip install 'distill_lab[eval]'``.

Accuracy is the share of documents where the right choice has the highest log-likelihood (``acc``) or the
highest log-likelihood per byte (``acc_norm``); for a cloze task, where greedy decoding writes the target
exactly. ``acc_stderr`` is the harness's standard error of that mean, sqrt(p (1 - p) / (n - 1)).

Reference: L. Gao et al., "The Language Model Evaluation Harness", Zenodo, 2023,
https://github.com/EleutherAI/lm-evaluation-harness
"""

from __future__ import annotations

import contextlib
import functools
import logging

from torch import nn

from .harness import harness_lm, require_lm_eval
from .tasks import OFFLINE_TASKS, TASKS_DIR

__all__ = ["check_tasks", "format_accuracy", "task_accuracy"]

BOOTSTRAP_ITERS = 1000  # only for metrics without a closed-form stderr (harness tasks' F1, perplexity); ours have one
_HUB_HINT = ("any other name must be an lm-eval harness task (e.g. hellaswag, arc_easy), whose data the "
             "harness downloads from the Hugging Face hub (online only)")


def check_tasks(tasks: str | list[str] | tuple[str, ...]) -> list[str]:
    """The task names in ``tasks`` (``"a,b"`` or a list), checked before any model runs.

    ValueError for no name, a repeated one or one neither offline nor the harness's (naming the offline
    tasks); ImportError when lm-eval is missing. Only a non-offline name makes the harness index its own
    ~15k task files (~7 s, once per process).
    """
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks)]
    if not names or not all(names):
        raise ValueError(f"tasks={tasks!r}; allowed: one or more task names, e.g. {','.join(OFFLINE_TASKS)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"task {repeated[0]!r} is named twice in tasks={tasks!r}; allowed: each task once")
    require_lm_eval()
    online = [n for n in names if n not in OFFLINE_TASKS]
    unknown = [n for n in online if n not in _task_manager(bool(online)).all_tasks]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; offline tasks: {', '.join(OFFLINE_TASKS)}; {_HUB_HINT}")
    return names


def task_accuracy(model: nn.Module, tokenizer, tasks: str | list[str], limit: int | None = None,
                  batch_size: int = 8, progress: bool = True, seed: int = 0) -> dict[str, dict]:
    """Accuracy of ``model`` on harness ``tasks``: ``{task: {"acc", "acc_stderr", "n", "chance", ...}}``.

    ``tasks``: names or ``"a,b"``; ``OFFLINE_TASKS`` need no network, other names go to the harness as they
    are. ``limit``: score only the first ``limit`` documents of each task (an int), for a quick look.
    ``chance``: the accuracy of guessing uniformly among a multiple-choice document's choices (mean over the
    documents scored), None for other task types. Also ``acc_norm`` (and its stderr) where the task has it,
    and any other metric the task reports. Deterministic: the harness's seeds are set to ``seed``.
    """
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit={limit!r}; allowed: None (every document) or an int >= 1")
    names = check_tasks(tasks)
    from lm_eval import evaluator  # optional dependency: check_tasks made sure it is there

    online = [n for n in names if n not in OFFLINE_TASKS]
    lm = harness_lm(model, tokenizer, batch_size=batch_size, progress=progress)
    with _quiet_harness(progress):
        try:
            results = evaluator.simple_evaluate(
                model=lm, tasks=names, task_manager=_task_manager(bool(online)), limit=limit,
                bootstrap_iters=BOOTSTRAP_ITERS, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                fewshot_random_seed=seed)
        except OSError as err:  # datasets: ConnectionError, DatasetNotFoundError (no hub)
            if not online:
                raise
            raise OSError(f"harness task(s) {', '.join(online)} could not be loaded ({type(err).__name__}: "
                          f"{' '.join(str(err).split())[:200]}); they need the Hugging Face hub; offline tasks: "
                          f"{', '.join(OFFLINE_TASKS)}") from err
    return {name: _summary(results, name) for name in results["results"]}


@functools.cache
def _task_manager(harness_tasks: bool):
    """lm-eval's ``TaskManager`` over our task folder, and over the harness's own tasks when asked (slow: once)."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager  # optional dependency, checked just above

    with _quiet_harness(progress=True):
        return TaskManager(include_path=str(TASKS_DIR), include_defaults=harness_tasks)


def _number(value):
    return float(value) if isinstance(value, (int, float)) else None  # the harness writes "N/A" for none


def _summary(results: dict, name: str) -> dict:
    """One task's metrics without the harness's filter suffix (``acc,none`` -> ``acc``), plus n and chance."""
    metrics = {key.split(",")[0]: _number(value) for key, value in results["results"][name].items()
               if "," in key}
    samples = results.get("samples", {}).get(name)
    multiple_choice = results.get("configs", {}).get(name, {}).get("output_type") == "multiple_choice"
    chance = (sum(1 / len(s["arguments"]) for s in samples) / len(samples)) if samples and multiple_choice else None
    n = results.get("n-samples", {}).get(name, {}).get("effective")
    return {"acc": metrics.pop("acc", None), "acc_stderr": metrics.pop("acc_stderr", None), "n": n,
            "chance": chance, **metrics}


def format_accuracy(results: dict[str, dict]) -> list[str]:
    """One line per task, ``acc pydoc_mc     0.390 ± 0.028  (n 300, chance 0.250; acc_norm 0.403)``."""
    lines = []
    for name, r in results.items():
        acc = "n/a" if r.get("acc") is None else f"{r['acc']:.3f}"
        err = "" if r.get("acc_stderr") is None else f" ± {r['acc_stderr']:.3f}"
        chance = "" if r.get("chance") is None else f", chance {r['chance']:.3f}"
        norm = "" if r.get("acc_norm") is None else f"; acc_norm {r['acc_norm']:.3f}"
        lines.append(f"{'acc ' + name:<16} {acc}{err}  (n {r.get('n')}{chance}{norm})")
    return lines


@contextlib.contextmanager
def _quiet_harness(progress: bool):
    """lm-eval's INFO/WARNING logs off (errors still show), its request-building bar only with ``progress``, and
    no ``git describe`` (it records the commit of the working directory, printing "fatal: ..." outside a repo)."""
    from lm_eval import evaluator  # optional dependency: imported after require_lm_eval()
    from lm_eval.api import task as task_module

    logger = logging.getLogger("lm_eval")
    level, bar, git_hash = logger.level, task_module.tqdm, evaluator.get_git_commit_hash
    logger.setLevel(logging.ERROR)
    evaluator.get_git_commit_hash = lambda: None
    if not progress:
        task_module.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        logger.setLevel(level)
        task_module.tqdm, evaluator.get_git_commit_hash = bar, git_hash
