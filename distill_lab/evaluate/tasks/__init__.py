"""Offline task-accuracy tasks, in lm-evaluation-harness's own YAML task format (Gao et al., 2023).

Each task is a YAML file here (``pydoc_mc.yaml``, ``pydoc_cloze.yaml``) and its documents are the JSONL
file beside it, built from text every CPython ships by ``python -m distill_lab.evaluate.tasks.build``
(run twice, it writes the same bytes; ``source.json`` records the Python that built them). The folder
is an lm-eval ``include_path``: ``distill_lab.task_accuracy`` passes it to the harness, and so can the
harness's own command line (``lm_eval --include_path <this folder> --tasks pydoc_mc ...``).

* ``pydoc_mc``: multiple choice, 4 names: which standard-library function or class has this docstring?
* ``pydoc_cloze``: the word that ends a sentence or clause of the Python documentation (greedy match,
  LAMBADA-style).

References: L. Gao et al., "The Language Model Evaluation Harness", Zenodo, 2023
(https://github.com/EleutherAI/lm-evaluation-harness); D. Paperno et al., "The LAMBADA dataset", ACL 2016.
"""

from .catalog import OFFLINE_TASKS, TASKS_DIR, task_docs

__all__ = ["OFFLINE_TASKS", "TASKS_DIR", "task_docs"]
