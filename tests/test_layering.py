"""The package is a stack of layers: a module imports only from its own layer or below, and nothing cycles.

The import graph is read from the source (``ast``), counting imports inside functions too, so a cycle
cannot hide behind a function-level import. ``LAYERS`` is the rule written down; docs/architecture.md
explains it. A new module must be given a layer here, which is the moment to decide where it belongs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "distill_lab"

# Lower numbers are closer to torch. The longest matching prefix of a module's dotted name (relative
# to distill_lab) gives its layer; "" is the package's __init__.
LAYERS = {
    # 0: foundations that know nothing of models
    "_startup": 0, "_fs": 0, "_lazy": 0, "claims": 0, "profiles": 0, "hardware": 0, "tensors": 0, "timing": 0,
    "summary": 0,  # what an in-place technique did: the one return type of every *_ function
    # 1: devices, timers, families, data
    "runtime": 1, "arch": 1, "data": 1, "_folder": 1, "_hf": 1,
    "plotting": 1,  # draws plain data with matplotlib; imports no model code, so recipes' reports can use it
    # 2: numeric primitives and layer types of the techniques (no model-level logic)
    "quantization.primitives": 2, "quantization.kernels": 2, "quantization.int4_kernels": 2, "quantization.configs": 2, "quantization.dispatch": 2,
    "quantization.registry": 2, "quantization.ggml": 2,  # the format table (knows no format); ggml's block layouts
    "pruning.masks": 2, "pruning.selection": 2,
    "quantization.modules": 3, "quantization.embeddings": 3, "quantization.serialization": 3, "pruning.sparse_storage": 3,
    "quantization.formats": 3,  # the built-in formats, registered
    # 4: saving and loading every kind of model the package writes
    "serialization": 4,
    "decode": 4,  # the lean batch-1 decode loop: the engine evaluate times beside the HF forward
    "llamacpp": 4,  # llama.cpp on a GGUF file (optional llama-cpp-python): the third engine evaluate times
    # 5: models and measurements
    "models": 5, "evaluate": 5, "calibration": 5,
    # 6: distillation (its trainer is the one training loop; pruning and QAT use it)
    "distillation": 6,
    # 7: the techniques that transform a model
    "quantization": 7, "pruning": 7,
    # 8: what combines or ships techniques
    "pipeline": 8, "export": 8, "export_ct": 8,
    # 9: what a lesson shows
    "views": 9, "speed": 9, "exercises": 9, "course": 9, "support": 9,
    "widgets": 10,
    # 11: entry points
    "__main__": 11, "": 11,
}

# A subpackage whose __init__ re-exports lazily (distill_lab/_lazy.py) runs none of its modules when it
# is imported, so the __init__ itself sits low; ``from .quantization import quantize_`` is then read as an
# import of the submodule that defines ``quantize_`` (its _EXPORTS table says which).
LAZY_INIT_LAYER = 2


def _lazy_exports(module: str) -> dict[str, str] | None:
    """{name: submodule} of a lazily re-exporting package ``module``, else None."""
    path = PACKAGE.joinpath(*module.split("."), "__init__.py") if module else None
    if path is None or not path.is_file():
        return None
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_EXPORTS" for t in node.targets):
            table = ast.literal_eval(node.value)
            return {name: f"{module}.{sub}" for sub, names in table.items() for name in names}
    return None


# Function-level imports of package modules are allowed nowhere. Not even in the CLI: ``python -m
# distill_lab`` imports the package (torch, transformers) before ``__main__`` runs, so importing a
# subcommand's modules late would not make ``--help`` any lighter (issue 32).
LAZY_OK: set[str] = set()


def _module_names() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom | ast.Import, modules) -> list[str]:
    """Package-relative modules ``node`` imports (``from . import x`` yields ``x`` if it is a module)."""
    names = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name == "distill_lab" or alias.name.startswith("distill_lab."):
                names.append(alias.name[len("distill_lab."):] if "." in alias.name else "")
        return names
    if node.level == 0:
        if node.module and (node.module == "distill_lab" or node.module.startswith("distill_lab.")):
            base = node.module[len("distill_lab."):] if "." in node.module else ""
        else:
            return []
    else:
        here = module.split(".") if module else []
        if not is_package:
            here = here[:-1]
        up = node.level - 1
        here = here[:len(here) - up] if up else here
        base = ".".join(here + ([node.module] if node.module else []))
    lazy = _lazy_exports(base) or {}
    for alias in node.names:  # from . import quantization -> the submodule itself, else the package
        sub = f"{base}.{alias.name}" if base else alias.name
        names.append(sub if sub in modules else lazy.get(alias.name, base))
    return names


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    """{module: modules it imports} and {module: 'line: statement' of function-level package imports}."""
    modules = _module_names()
    graph, lazy = {}, {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        deps = set()
        function_level = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        function_level.add(id(node))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            found = [m for m in _resolve(name, path.name == "__init__.py", node, modules) if m in modules and m != name]
            found += [p for m in found for p in _parents(m) if p in modules and p != name
                      and not name.startswith(p + ".")]  # importing a.b.c runs a/__init__ and a/b/__init__ first
            deps.update(found)
            if found and id(node) in function_level:
                lazy.setdefault(name, []).append(f"{node.lineno}: {ast.unparse(node)}")
        graph[name] = deps
    return graph, lazy


def layer_of(module: str) -> int:
    if module and _lazy_exports(module) is not None:
        return LAZY_INIT_LAYER
    best = None
    for prefix in LAYERS:
        if module == prefix or (prefix and module.startswith(prefix + ".")) or (prefix == "" and module == ""):
            if best is None or len(prefix) > len(best):
                best = prefix
    if best is None:
        raise KeyError(module)
    return LAYERS[best]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    missing = []
    for m in _module_names():
        try:
            layer_of(m)
        except KeyError:
            missing.append(m)
    assert not missing, f"give these modules a layer in tests/test_layering.py LAYERS: {missing}"


def test_no_import_cycle():
    graph, _ = import_graph()
    cycles = _cycles(graph)
    assert not cycles, f"import cycles among distill_lab modules: {cycles}"


def test_lower_layers_never_import_higher_ones():
    graph, _ = import_graph()
    bad = []
    for module, deps in graph.items():
        for dep in deps:
            if module.startswith(dep + ".") or (dep == "" and module):
                bad.append(f"{module} imports its own package {dep or 'distill_lab'} (import the module instead)")
            elif dep.startswith(module + ".") if module else False:
                continue  # a package's __init__ re-exports its submodules
            elif layer_of(dep) > layer_of(module):
                bad.append(f"{module} (layer {layer_of(module)}) imports {dep} (layer {layer_of(dep)})")
    assert not bad, "\n".join(sorted(bad))


def test_function_level_imports_only_for_optional_dependencies():
    _, lazy = import_graph()
    bad = {m: lines for m, lines in lazy.items() if m not in LAZY_OK}
    assert not bad, f"package modules imported inside functions (move them to the top): {bad}"


@pytest.mark.parametrize("source, expected", [
    ("from .quantization.api import quantize_", {"quantization.api"}),
    ("from . import runtime", {"runtime"}),
    ("from ..runtime import device_of", {"runtime"}),
])
def test_resolver_reads_relative_imports(source, expected):
    node = ast.parse(source).body[0]
    module = "pruning.structured" if source.startswith("from ..") else "evaluate"
    modules = set(_module_names()) | {"quantization.api"}
    assert {m for m in _resolve(module, False, node, modules) if m in modules} == expected


def test_importing_a_submodule_counts_as_importing_its_package():
    assert _parents("quantization.modules") == ["quantization"]
    graph, _ = import_graph()
    assert "quantization" in graph["serialization"]  # so an eager quantization/__init__ would be caught


def test_a_name_from_a_lazy_package_counts_as_its_submodule():
    node = ast.parse("from .quantization import quantize_").body[0]
    assert _resolve("serialization", False, node, set(_module_names())) == ["quantization.api"]


def test_the_checker_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


# ---------------------------------------------------------------- one of each (issues 13, 32): the old copies stay gone

ONE_PLACE = {  # pattern -> the only module(s) that may contain it
    "os.replace(": {"_fs"},  # atomic writes: _fs.atomic_file / atomic_write_text / replace_dir
    "tempfile.mkstemp(": {"_fs"},
    "parameters()).device": set(),  # the device of a module: runtime.device_of
    "untyped_storage().data_ptr()": {"tensors"},  # storage identity: tensors.storage_key
    # the one loop; the labs where the learner writes a step (01's training step and GKD step, 02's STE
    # compared with the package's in the same few steps) drive it with their own optimizer
    "torch.optim.": {"distillation.trainer", "exercises.distillation", "exercises.gkd", "exercises.ste"},
}


@pytest.mark.parametrize("pattern", sorted(ONE_PLACE))
def test_one_implementation_of_each_idea(pattern):
    found = {m for m, path in _module_names().items() if pattern in path.read_text()}
    assert found <= ONE_PLACE[pattern], f"{pattern!r} written again in {sorted(found - ONE_PLACE[pattern])}"


# A behavioural guard: a function whose name says it does a concept's job, or whose body does it (the calls
# below), may live only in the concept's home. A rewrite under a new name passes a string grep; this reads
# every function of the package. HOMES: concept -> (the home to use, name patterns, modules allowed).
HOMES = {
    "parameter count": ("arch.parameter_count", ("*param*count*", "*count*param*", "n_params", "*num_param*"), {"arch"}),
    "bytes in memory": ("tensors.memory_bytes", ("*memory_bytes*", "*model_size*", "*size_bytes*", "*model_bytes*"),
                        {"tensors"}),
    "bytes on disk": ("serialization.weights_bytes", ("*disk*bytes*", "*bytes*disk*", "*dense_bytes*", "*folder_size*",
                                                      "*weights_bytes*", "*saved*bytes*", "*file*bytes*"),
                      {"serialization"}),
    "device": ("profiles.default_device", ("*default_device*", "*pick_device*", "*best_device*"), {"profiles"}),
    "CPU name": ("hardware.cpu_model", ("*cpu_name*", "*cpu_model*"), {"hardware"}),
    "timer": ("timing.median_seconds / interleaved_medians / stopwatch",
              ("*median*", "*latency*", "timed", "*stopwatch*", "*timer*", "*time_it*"),
              {"timing", "evaluate.cost"}),  # evaluate.cost.latency times through timing.interleaved_medians
    "atomic folder": ("_fs.atomic_folder", ("*atomic*folder*", "*atomic*dir*", "*replace_dir*"), {"_fs"}),
    "model loading": ("serialization.load_saved (a folder) / models.load_model",
                      ("load_model*", "load_saved*", "load_gguf*", "load_pretrained*", "*load*folder*"),
                      {"serialization", "models.loading"}),
}
# (module, function) -> why it is not a rewrite
HOME_ALLOW = {
    ("pruning.sparse_storage", "sparse_bytes_on_disk"): "the size of its own sparse format (save_sparse), not of a dense folder",
}


def _called(fn: ast.AST) -> set[str]:
    return {ast.unparse(n.func) for n in ast.walk(fn) if isinstance(n, ast.Call)}


def _cuda_or_cpu(fn: ast.AST) -> bool:
    return any(isinstance(n, ast.IfExp) and "cuda.is_available" in ast.unparse(n.test)
               and isinstance(n.body, ast.Constant) and n.body.value == "cuda" for n in ast.walk(fn))


# what a function body does -> (concept, modules allowed to do it)
DOES = [
    (lambda fn: any(c.endswith("perf_counter") for c in _called(fn)), "timer", {"timing", "hardware"}),
    (lambda fn: "statistics.median" in _called(fn), "timer", {"timing"}),
    (lambda fn: {"make_tmp_dir", "replace_dir"} <= {c.rsplit(".", 1)[-1] for c in _called(fn)}, "atomic folder", {"_fs"}),
    (_cuda_or_cpu, "device", {"profiles"}),
    (lambda fn: any(isinstance(n, ast.Constant) and n.value == "/proc/cpuinfo" for n in ast.walk(fn)), "CPU name",
     {"hardware"}),
    (lambda fn: "AutoModelForCausalLM.from_pretrained" in _called(fn), "model loading",
     {"serialization", "models.loading"}),
]


def one_place_violations(trees: dict[str, ast.Module]) -> list[str]:
    """'module.function: <what> (use <home>)' for every function that redoes a concept outside its home."""
    from fnmatch import fnmatch

    bad = set()
    for module, tree in trees.items():
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or (module, fn.name) in HOME_ALLOW:
                continue
            for concept, (home, patterns, allowed) in HOMES.items():
                if module not in allowed and any(fnmatch(fn.name.lower(), p) for p in patterns):
                    bad.add(f"{module}.{fn.name}: its name says {concept} (use {home})")
            for does, concept, allowed in DOES:
                if module not in allowed and does(fn):
                    bad.add(f"{module}.{fn.name}: its body does {concept} (use {HOMES[concept][0]})")
    return sorted(bad)


def test_each_concept_has_one_home():
    trees = {m: ast.parse(path.read_text(), str(path)) for m, path in _module_names().items()}
    bad = one_place_violations(trees)
    assert not bad, "a concept written again outside its home:\n" + "\n".join(bad)


@pytest.mark.parametrize("source, found", [
    ("def count_params(model):\n    return sum(p.numel() for p in model.parameters())", "count_params: its name says parameter count"),
    ("def save_dense_bytes(model):\n    pass", "save_dense_bytes: its name says bytes on disk"),
    ("def model_size_bytes(model):\n    pass", "model_size_bytes: its name says bytes in memory"),
    ("import time\ndef step():\n    start = time.perf_counter()\n    return time.perf_counter() - start",
     "step: its body does timer"),
    ("import statistics\ndef speed(ts):\n    return statistics.median(ts)", "speed: its body does timer"),
    ("def publish(tmp, dst):\n    tmp = make_tmp_dir(dst.parent)\n    replace_dir(tmp, dst)", "publish: its body does atomic folder"),
    ("import torch\ndef pick():\n    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
     "pick: its body does device"),
    ("def name():\n    return open('/proc/cpuinfo').read()", "name: its body does CPU name"),
    ("def get(p):\n    return AutoModelForCausalLM.from_pretrained(p)", "get: its body does model loading"),
])
def test_the_one_place_check_catches_a_planted_rewrite(source, found):
    bad = one_place_violations({"views.planted": ast.parse(source)})
    assert any(b.startswith("views.planted." + found) for b in bad), bad
    assert one_place_violations({"views.planted": ast.parse("def unrelated(x):\n    return x")}) == []


# ---------------------------------------------------------------- conventions (issue 32)

MAX_LINES = 450


def test_every_module_declares_all_and_every_name_in_it_exists():
    import importlib

    missing, ghosts = [], []
    for name, path in _module_names().items():
        tree = ast.parse(path.read_text())
        declares = any(isinstance(n, (ast.Assign, ast.AnnAssign)) and "__all__" in ast.unparse(n).split("=")[0]
                       for n in tree.body)
        if not declares:
            missing.append(name)
            continue
        if name == "__main__":
            continue  # importing it is running the command line's module top; its names are checked by test_cli
        module = importlib.import_module(f"distill_lab.{name}" if name else "distill_lab")
        ghosts += [f"{name}.{n}" for n in module.__all__ if not hasattr(module, n)]
    assert not missing, f"modules without __all__: {missing}"
    assert not ghosts, f"names in __all__ that the module does not define: {ghosts}"


def test_no_module_is_longer_than_the_house_limit():
    long = {m: n for m, p in _module_names().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by idea): {long}"


# Required dependencies (pyproject's [project] dependencies) are imported at the top of the file. The few
# function-level imports left name an optional package, a platform module, or one that costs a second to import.
REQUIRED = {"transformers", "gguf", "safetensors", "yaml", "nbformat", "nbclient", "matplotlib", "numpy", "IPython",
            "accelerate", "tqdm", "ipywidgets", "torch"}
FUNCTION_LEVEL_OK = {("pruning.sparse_storage", "torch"),  # torch.sparse's 2:4 type exists only on some builds
                     ("speed.pruning", "torch"),
                     # nbformat's schema validator costs ~1 s of import (measured: python -X importtime -m
                     # distill_lab --help), paid by every command; only executing a notebook needs it
                     ("course", "nbformat"), ("course", "nbclient")}


def test_required_dependencies_are_imported_at_the_top():
    bad = []
    for name, path in _module_names().items():
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and getattr(node, "level", 0) == 0:
                    root = (node.names[0].name if isinstance(node, ast.Import) else node.module).split(".")[0]
                    if root in REQUIRED and (name, root) not in FUNCTION_LEVEL_OK:
                        bad.append(f"{name}:{node.lineno} {ast.unparse(node)}")
    assert not bad, f"required dependencies imported inside functions (move them to the top): {bad}"
