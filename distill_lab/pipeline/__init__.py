"""Combined compression: a recipe of steps (layer_drop, prune, distil, quantize, qat) run on the teacher.

* ``recipe``: the YAML recipe and the registry of step kinds;
* ``context``: what a step may use, and the digests that decide whether saved work is reused;
* ``steps``: the built-in kinds (importing this package registers them);
* ``measure``: perplexity, size and speed of a model, relative to the teacher;
* ``runner``: ``run_recipe``, with saved steps, reuse and the quality guard;
* ``report``: the course document's claims table, measured.
"""

from .context import *  # noqa: F401,F403
from .context import __all__ as _context_all
from .measure import *  # noqa: F401,F403
from .measure import __all__ as _measure_all
from .recipe import *  # noqa: F401,F403
from .recipe import __all__ as _recipe_all
from .report import *  # noqa: F401,F403
from .report import __all__ as _report_all
from .runner import *  # noqa: F401,F403
from .runner import __all__ as _runner_all
from .steps import *  # noqa: F401,F403
from .steps import __all__ as _steps_all
from .workdir import *  # noqa: F401,F403
from .workdir import __all__ as _workdir_all

__all__ = [*_recipe_all, *_context_all, *_steps_all, *_measure_all, *_runner_all, *_report_all, *_workdir_all]
