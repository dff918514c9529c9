"""Command line: ``python -m distill_lab <command>`` (also installed as ``distill-lab``).

  course    execute every notebook headless and write a report (``make run``)
  eval      print a model's card: perplexity in- and out-of-domain, size on disk, speed (--tasks: task accuracy)
  compress  apply a recipe (prune -> distil -> quantize ...) and export the compressed model
  report    measure the seed's comparison table (INT8, INT4, distillation, pruning, combined)
  doctor    this machine: CPU, ISA flags, threads, the measured bf16 choice and int8 / int4 kernel paths
  export    write a model as a GGUF file that llama.cpp (Ollama, LM Studio) runs, or as a
            compressed-tensors folder that vLLM serves
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
import sys
from pathlib import Path

from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError

from . import hardware
from ._fs import clean_stale_tmp, folder_lock
from .course import run_course
from .evaluate import check_tasks, format_accuracy, generate_samples, task_accuracy
from .export import check_exportable, to_gguf
from .export_ct import to_compressed_tensors
from .hardware import check_env
from .models import TEACHER_CACHE_NAME, cache_dir, load_model, load_teacher
from .pipeline import (STEPS, Recipe, check_work_dir, comparison_table, eval_windows, group_size_skips, measure,
                       relative, run_recipe, teacher_metrics)
from .pipeline.publish import check_out, publish_export
from .profiles import get_profile
from .quantization import dispatch
from .quantization.dispatch import check_env as check_kernels_env

__all__ = ["build_parser", "EXPORT_FORMATS", "INTERRUPTED", "main", "PROFILE_HELP"]

PROFILE_HELP = ("smoke, laptop or gpu (default: $DISTILL_LAB_PROFILE, else gpu with CUDA, laptop without)")


def _profile(name):
    return get_profile(name)  # ValueError names the allowed profiles


def _load(model: str, device=None):
    """Load ``teacher`` (the offline default) or a model folder / hub id."""
    if model == "teacher":
        return load_teacher(device=device)
    if not Path(model).expanduser().exists() and ("/" not in model or model.startswith((".", "/", "~"))):
        raise FileNotFoundError(f"model {model!r} does not exist; give 'teacher', a saved model folder "
                                f"or a hub id such as HuggingFaceTB/SmolLM2-135M")
    return load_model(model, device=device)


def _model_path(model: str) -> Path | None:
    """The folder or file ``model`` is read from (the teacher's cache for ``teacher``); None for a hub id."""
    if model == "teacher":
        return (cache_dir() / TEACHER_CACHE_NAME).resolve()
    path = Path(model).expanduser()
    return path.resolve() if path.exists() else None


def _teacher_on(windows: dict, tokenizer, profile) -> dict | None:
    """The teacher's perplexity on ``windows`` (cached per profile), or None when the model's tokenizer is not
    the teacher's (then its perplexities are not comparable, and no ratio is printed)."""
    teacher, teacher_tok = load_teacher()
    if len(tokenizer) != len(teacher_tok) or tokenizer("def f(x):").input_ids != teacher_tok("def f(x):").input_ids:
        print("no ratio to the teacher: this model's tokenizer is not the teacher's", file=sys.stderr)
        return None
    return teacher_metrics(teacher, teacher_tok, profile, windows, progress=False, speed=False,
                           cache=cache_dir() / f"eval-teacher-{profile.name}.json")


def _cmd_course(args) -> int:
    _profile(args.profile)
    out = run_course(args.out, profile=args.profile, overwrite=args.overwrite)
    print(f"report written to {out}/ (results.md, results.json, executed notebooks in notebooks/)")
    return 0


def _cmd_eval(args) -> int:
    profile = _profile(args.profile)
    if args.limit is not None and (not args.tasks or args.limit < 1):
        raise ValueError(f"--limit {args.limit}" + (" without --tasks" if not args.tasks else "")
                         + "; allowed: --limit N (N >= 1) with --tasks NAME[,NAME]")
    tasks = check_tasks(args.tasks) if args.tasks else []  # before the load: a bad name or no lm-eval fails fast
    model, tokenizer = _load(args.model)
    folder = cache_dir() / TEACHER_CACHE_NAME if args.model == "teacher" else Path(args.model)
    print(f"measuring {args.model} ({profile.name} profile: {profile.recipe_eval_windows} pydoc and "
          f"{profile.recipe_ood_windows} stdlib-code windows of {profile.seq_len} tokens)", file=sys.stderr)
    windows = eval_windows(tokenizer, profile)
    m = measure(model, windows, profile, folder=folder if folder.is_dir() else None, progress=False)
    base = _teacher_on(windows, tokenizer, profile) if args.model != "teacher" else None
    if base is not None:
        m.update(relative(m, base))
    sample = generate_samples(model, tokenizer, [args.prompt], max_new_tokens=profile.gen_tokens)[0]
    accuracy = {}
    if tasks:
        print(f"task accuracy through lm-evaluation-harness: {', '.join(tasks)}"
              + (f" (first {args.limit} documents each)" if args.limit else ""), file=sys.stderr)
        accuracy = task_accuracy(model, tokenizer, tasks, limit=args.limit, progress=sys.stderr.isatty())
    if args.json:
        extra = {"task_accuracy": accuracy} if tasks else {}
        print(json.dumps({"model": args.model, "profile": profile.name, **m, "sample": sample, **extra}, indent=2))
        return 0
    print(f"model            {args.model}")
    print(f"parameters       {m['params'] / 1e6:.1f} M")
    print(f"size on disk     {m['size_bytes'] / 2**20:.1f} MiB (weights)")
    about = {}  # per corpus: how many windows, and the ratio to the teacher on the same windows
    for corpus in ("pydoc", "stdlib-code"):
        n = m.get(f"eval_windows_{corpus}")
        ratio = (f"ratio {m[f'ppl_ratio_{corpus}']:.3f} to the teacher's {base[f'ppl_{corpus}']:.2f}"
                 if base is not None and f"ppl_ratio_{corpus}" in m else None)
        about[corpus] = "".join(f", {part}" for part in (f"{n} windows" if n else None, ratio) if part)
    print(f"ppl pydoc        {m['ppl_pydoc']:.2f}   (in-domain, test split{about['pydoc']})")
    print(f"ppl stdlib-code  {m['ppl_stdlib-code']:.2f}   (out-of-domain{about['stdlib-code']})")
    for line in format_accuracy(accuracy):  # acc ± stderr, chance: one line per task
        print(line)
    print(f"prefill          {m['prefill_tokens_per_s']:.0f} tokens/s  (batch {profile.recipe_latency_batch} x "
          f"{profile.latency_seq})")
    print(f"decode           {m['decode_tokens_per_s']:.1f} tokens/s  (batch 1, the Hugging Face forward)")
    if "decode_lean_tokens_per_s" in m:
        print(f"decode, lean     {m['decode_lean_tokens_per_s']:.1f} tokens/s  (batch 1, distill_lab.decode.StaticDecoder)")
    print(f"sample           {args.prompt!r} ->{sample!r}")
    return 0


def _cmd_compress(args) -> int:
    profile = _profile(args.profile)
    recipe = Recipe.load(args.recipe)  # before loading anything: bad recipes fail fast
    if args.max_ppl_ratio is not None:
        recipe.max_ppl_ratio = Recipe(recipe.name, recipe.steps, args.max_ppl_ratio).max_ppl_ratio
    out = Path(args.out).expanduser().resolve()
    work = Path(args.work).expanduser().resolve() if args.work else out.with_name(out.name + ".steps")
    if work == out or out in work.parents or work in out.parents:
        raise ValueError(f"--work {work} and --out {out} must not lie inside one another")
    check_out(out, args.overwrite)  # before any work: nothing is computed for a refused folder
    check_work_dir(work)  # the same rule for --work: only a folder an earlier run wrote (and nobody added to)
    out.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(out.parent / f".{out.name}.distill-lab.lock", f"--out {out}"):
        check_out(out, args.overwrite)  # again under the lock: a run that just finished may have exported
        clean_stale_tmp(out.parent)
        teacher, tokenizer = _load(args.teacher)
        result = run_recipe(teacher, tokenizer, recipe, work, profile=profile, seed=args.seed,
                            progress=not args.quiet, keep_model=False)
        for rec in result.steps:  # layers a resumed quantize step left in float: said even with --quiet
            skipped = list(group_size_skips(rec.extras))
            if rec.resumed and skipped:
                print(f"distill-lab compress: step {rec.index} ({rec.kind}) left {len(skipped)} layer(s) in float: "
                      f"group_size does not divide their input width (e.g. {skipped[0]})", file=sys.stderr)
        publish_export(result.final.folder, out, recipe.name, args.overwrite)
    print(result.markdown())
    m = result.final.metrics
    print(f"compressed model: {out} ({m['size_bytes'] / 2**20:.1f} MiB of weights, {m['size_reduction']:.1f}x "
          f"smaller than the teacher, ppl ratio {m['ppl_ratio_pydoc']:.2f}); intermediate steps in {work}")
    model, tok = load_model(out)  # prove the export reloads and generates
    text = generate_samples(model, tok, [args.prompt], max_new_tokens=profile.gen_tokens)[0]
    print(f"reloaded with distill_lab.load_model and generated: {args.prompt!r} ->{text!r}")
    return 0


def _cmd_report(args) -> int:
    profile = _profile(args.profile)

    teacher, tokenizer = load_teacher()
    table = comparison_table(teacher, tokenizer, profile=profile, work_dir=args.work, progress=not args.quiet)
    paths = table.save(args.out)
    print(table.markdown())
    print("written: " + ", ".join(str(p) for p in paths))
    return 0


def _cmd_doctor(args) -> int:
    entry = hardware.machine_profile(refresh=args.refresh)
    kernels = dispatch.kernel_profile(refresh=args.refresh)
    if args.json:
        print(json.dumps({"bf16": entry, "kernels": kernels}, indent=1, sort_keys=True))
        return 0
    print(hardware.format_profile(entry))
    print("\nint8 / int4 kernel paths, one Linear at the teacher's shapes (every path that passed its probe):")
    print(dispatch.format_kernel_profile(kernels))
    forced = os.environ.get(hardware.ENV_BF16)
    stored = not (entry.get("busy") or kernels.get("busy"))
    where = f"stored in {hardware.cache_path()}" if stored else "not stored (busy machine)"
    print(f"\n{where} under {entry['key']!r}, measured {entry.get('measured_at')} in "
          f"{entry.get('measured_s', float('nan')) + kernels.get('measured_s', float('nan')):.2f} s "
          f"(--refresh measures again)"
          + (f"\n{hardware.ENV_BF16}={forced} is set: it decides bf16='auto' in this shell" if forced else ""))
    return 0


EXPORT_FORMATS = ("gguf", "compressed-tensors")


def _cmd_export(args) -> int:
    if args.format not in EXPORT_FORMATS:  # checked before the (slow) load
        raise ValueError(f"--format {args.format!r}; allowed: {', '.join(EXPORT_FORMATS)}")
    out = Path(args.out)
    source = _model_path(args.model)
    target = out.expanduser().resolve()
    if source is not None and (target == source or source in target.parents):
        raise ValueError(f"--out {out} lies inside the model being exported ({source}); allowed: a path outside it")
    if args.format == "compressed-tensors":
        return _export_compressed_tensors(args, target)
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; allowed: a .gguf file path")
    if out.exists() and not args.overwrite:  # never replace a user's file unasked
        raise FileExistsError(f"--out {out} exists; pass --overwrite to replace it")

    model, tokenizer = _load(args.model)
    check_exportable(model)
    report = to_gguf(model, tokenizer, args.out, float_type=args.float_type)
    print(report.summary())
    print(f"run it: llama-cli -m {report.path}   (or python benchmarks/deploy.py --gguf {report.path})")
    return 0


def _export_compressed_tensors(args, target: Path) -> int:
    """``export --format compressed-tensors``: a folder, under compress's ``--out`` rules (``check_out``)."""
    check_out(target, args.overwrite)  # before the (slow) load: new, empty, or an earlier export with --overwrite
    model, tokenizer = _load(args.model)
    report = to_compressed_tensors(model, tokenizer, target, overwrite=args.overwrite)
    print(report.summary())
    for note in report.notes:
        print(f"  {note}")
    print(f"serve it on a CUDA GPU: vllm serve {report.folder} --dtype bfloat16   "
          f"(or load it with transformers: AutoModelForCausalLM.from_pretrained('{report.folder}'))")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with one sub-command per job."""
    parser = argparse.ArgumentParser(prog="distill-lab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    course = sub.add_parser("course", help="execute every notebook headless and write a report")
    course.add_argument("--out", default="reports",
                        help="report folder (default: reports); an earlier report there is kept in "
                             "OUT/earlier-<date>/, and a failed or interrupted run leaves it unchanged")
    course.add_argument("--overwrite", action="store_true",
                        help="replace the earlier report instead of keeping it (only if it holds just what the "
                             "course wrote)")
    course.add_argument("--profile", default=None, help=PROFILE_HELP)
    course.set_defaults(func=_cmd_course)

    ev = sub.add_parser("eval", help="print a model's card: perplexity, size on disk, speed, task accuracy",
                        description="Measure one model with the course's harness: test perplexity on pydoc "
                                    "(in-domain) and stdlib code (out-of-domain), size of its weight files, "
                                    "prefill and decode speed, and a greedy sample; with --tasks, also task "
                                    "accuracy through EleutherAI's lm-evaluation-harness (pip install lm-eval): "
                                    "the offline tasks pydoc_mc (4-way multiple choice, chance 0.25) and "
                                    "pydoc_cloze, or any harness task name when online.")
    ev.add_argument("model", help="'teacher' (the offline SmolLM2-135M-Instruct), a saved model folder "
                                  "(for example the output of `compress`), or a hub id when online")
    ev.add_argument("--profile", default=None, help=PROFILE_HELP)
    ev.add_argument("--prompt", default="The Python `with` statement is used to", help="prompt for the sample")
    ev.add_argument("--json", action="store_true", help="print the card as JSON")
    ev.add_argument("--tasks", default=None, metavar="NAME[,NAME]",
                    help="also measure task accuracy (acc ± stderr, chance) on these tasks: pydoc_mc, pydoc_cloze "
                         "(offline) or lm-eval harness tasks (online)")
    ev.add_argument("--limit", type=int, default=None, metavar="N",
                    help="score only the first N documents of each task (default: all)")
    ev.set_defaults(func=_cmd_eval)

    kinds = "\n".join(f"  {k:<11} {STEPS[k].doc}" for k in sorted(STEPS))
    co = sub.add_parser("compress", help="apply a recipe to the teacher and export the compressed model",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Apply a recipe (YAML or JSON, see recipes/) step by step, measuring "
                                    "quality, size and speed after every step. Intermediate models are saved "
                                    "atomically and a re-run resumes after the last finished step. The final "
                                    "model is written to --out as safetensors + config, loadable with "
                                    "distill_lab.load_model(OUT).\n\nstep kinds:\n" + kinds)
    co.add_argument("--recipe", required=True, help="recipe file (.yaml, .yml or .json)")
    co.add_argument("--out", required=True,
                    help="folder for the compressed model: new or empty, or an earlier export with --overwrite "
                         "(a folder holding anything else is never touched)")
    co.add_argument("--overwrite", action="store_true",
                    help="replace --out when it holds an earlier distill-lab export (and nothing else)")
    co.add_argument("--work", default=None, help="folder for intermediate steps (default: OUT.steps): new, empty, "
                                                 "or one an earlier compress wrote (a folder holding anything "
                                                 "else is never touched)")
    co.add_argument("--teacher", default="teacher", help="model to compress (default: the offline teacher)")
    co.add_argument("--profile", default=None, help=PROFILE_HELP)
    co.add_argument("--max-ppl-ratio", type=float, default=None,
                    help="stop when a step's perplexity ratio to the teacher exceeds this (overrides the recipe)")
    co.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    co.add_argument("--prompt", default="The Python `with` statement is used to",
                    help="prompt for the generation check after reloading")
    co.add_argument("--quiet", action="store_true", help="no progress bars")
    co.set_defaults(func=_cmd_compress)

    rep = sub.add_parser("report", help="measure the seed's comparison table and write reports/",
                         description="Measure INT8, INT4, distillation, 50%% pruning and the combined recipe on "
                                     "the teacher in the current profile; write comparison.md, comparison.json "
                                     "and comparison_pareto.png. Finished rows are reused on a re-run.")
    rep.add_argument("--out", default="reports", help="report folder (default: reports)")
    rep.add_argument("--work", default=None,
                     help="folder for the rows' models (default: $DISTILL_LAB_CACHE/compare-<profile>)")
    rep.add_argument("--profile", default=None, help=PROFILE_HELP)
    rep.add_argument("--quiet", action="store_true", help="no progress bars")
    rep.set_defaults(func=_cmd_report)

    doc = sub.add_parser("doctor", help="this machine's CPU, ISA flags, threads and measured speed choices",
                         description="Print the CPU, its ISA flags and threads, and a short micro-benchmark "
                                     "that decides bf16='auto' (fp32 vs bf16 autocast at prefill and at decode) "
                                     "and the path each quantized format takes per phase (the int8 / int4 kernels "
                                     "vs oneDNN and vs dequantizing, at the teacher's shapes). The result is "
                                     "cached per CPU model, torch version and thread count in "
                                     "$DISTILL_LAB_CACHE/hardware.json; DISTILL_LAB_BF16 and DISTILL_LAB_KERNELS "
                                     "override it.")
    doc.add_argument("--refresh", action="store_true", help="measure again instead of reading the cache")
    doc.add_argument("--json", action="store_true", help="print the stored entry as JSON")
    doc.set_defaults(func=_cmd_doctor)

    ex = sub.add_parser("export", help="write a model as a GGUF file (llama.cpp / Ollama / LM Studio) or a "
                                       "compressed-tensors folder (vLLM)",
                        description="Export 'teacher' or a saved model folder (float, quantized or pruned Llama) "
                                    "to GGUF: int4 g32/64/128/256 -> Q4_1 and int8 per-channel -> Q8_0 with the "
                                    "same codes, float -> F32/F16; tokenizer and chat template from the teacher's "
                                    "GGUF. Other families exit with status 2. With --format compressed-tensors: a "
                                    "quantized model (int8, W8A8 or symmetric int4) as the Hugging Face folder "
                                    "llm-compressor writes and vLLM serves, with the same codes and scales; what "
                                    "that format cannot hold exactly (asymmetric int4, ...) exits with status 2.")
    ex.add_argument("model", help="'teacher' or a saved model folder (for example the output of `compress`)")
    ex.add_argument("--format", default="gguf", help="output format: gguf (default) or compressed-tensors")
    ex.add_argument("--out", required=True,
                    help="gguf: the .gguf file to write (an existing file needs --overwrite); compressed-tensors: "
                         "a new or empty folder, or an earlier export with --overwrite (a folder holding anything "
                         "else is never touched)")
    ex.add_argument("--overwrite", action="store_true",
                    help="replace --out if it exists (a folder: only an earlier distill-lab export)")
    ex.add_argument("--float-type", default="f32", choices=["f32", "f16"],
                    help="gguf only: type for weights left in float (default: f32)")
    ex.set_defaults(func=_cmd_export)
    return parser


INTERRUPTED = {  # what Ctrl-C leaves behind, per command
    "compress": "finished steps are kept and a re-run resumes after them",
    "report": "finished rows are kept and a re-run reuses them",
    "course": "the report in --out is unchanged",
    "eval": "nothing was written",
    "export": "--out is unchanged (the file or folder is written whole or not at all)",
    "doctor": "nothing was stored",
}


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse arguments, run the command, turn expected errors into one-line messages."""
    args = build_parser().parse_args(argv)
    try:
        _check_env()
        return args.func(args)
    except KeyboardInterrupt as err:
        detail = " ".join(str(err).split()) or INTERRUPTED.get(args.command, "nothing was changed")
        print(f"distill-lab {args.command}: interrupted; {detail}", file=sys.stderr)
        return 130
    except _expected_errors() as err:
        message = _disk_full(err) or " ".join(str(err).split()) or type(err).__name__
        print(f"distill-lab {args.command}: error: {message}", file=sys.stderr)
        return 2


def _disk_full(err: BaseException) -> str | None:
    """One plain line when ``err`` means the disk (or quota) is full, else None.

    ``shutil.copytree`` reports it as a list of every file it could not copy, numpy's ``tofile`` (the
    GGUF writer) as "N requested and M written", plain writes as ENOSPC / EDQUOT.
    """
    text = str(err)
    full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in text \
        or "Disk quota exceeded" in text or bool(re.search(r"\d+ requested and \d+ written", text))
    if not full:
        return None
    where = getattr(err, "filename", None)
    if where is None and isinstance(err, shutil.Error) and err.args and isinstance(err.args[0], list) \
            and err.args[0] and isinstance(err.args[0][0], tuple) and len(err.args[0][0]) > 1:
        where = err.args[0][0][1]  # (src, dst, why) of the first file it could not copy
    at = f" while writing {where}" if where else ""
    return (f"the disk is full{at}; what was written is not used and earlier files are unchanged: free some "
            f"space (df -h shows where) and run it again")


def _check_env() -> None:
    """The environment variables that steer choices, read before any work (ValueError: one line, exit 2)."""
    check_env()
    check_kernels_env()


def _expected_errors() -> tuple:
    """Exceptions that mean a bad path, value or file, or a missing optional package (one line, exit 2), not a
    bug (traceback). The package imports its own modules at the top only, so an ImportError at run time is an
    optional package (lm-eval for ``eval --tasks``) that is not installed."""
    return (ValueError, FileNotFoundError, RuntimeError, OSError, ImportError, SafetensorError, StrictDataclassError)


if __name__ == "__main__":
    sys.exit(main())
