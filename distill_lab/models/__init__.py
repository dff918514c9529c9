"""Models of the course, in three modules: the teacher, loading any model, and building students.

* ``teacher``: ``load_teacher`` (SmolLM2-135M-Instruct from its GGUF file, converted once), ``cache_dir``.
* ``loading``: ``load_model`` (a folder, a .gguf file or a hub id), ``load_gguf``, ``open_gguf``.
* ``students``: ``make_student``, ``tiny_llama``, ``check_vocab_compatible``.

Parameters are counted by ``arch.parameter_count``. Every public name is re-exported here.
"""

from .._hf import quiet_transformers
from .loading import OFFLINE_HINT, HubUnavailableError, load_gguf, load_model, open_gguf
from .students import check_vocab_compatible, make_student, tiny_llama
from .teacher import (TEACHER_CACHE_NAME, TEACHER_GGUF, TEACHER_NAME, TEACHER_PACKAGE, cache_dir, load_teacher,
                      teacher_gguf_path)

__all__ = ["OFFLINE_HINT", "TEACHER_CACHE_NAME", "TEACHER_GGUF", "TEACHER_NAME", "TEACHER_PACKAGE",
           "HubUnavailableError", "cache_dir", "check_vocab_compatible", "load_gguf", "load_model", "load_teacher",
           "make_student", "open_gguf", "quiet_transformers", "teacher_gguf_path", "tiny_llama"]
