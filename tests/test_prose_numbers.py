"""Issue 30: no number in a lesson's prose that its own outputs do not print.

Every number in a solution notebook's markdown cells that has at least two significant digits, or a
``%``, ``×`` or ``x`` beside it, must appear in that notebook's text outputs (stream, ``text/plain``,
``text/markdown``) or among its code cells' numeric literals. ``ALLOWED`` holds the rest, each with the
reason it cannot be printed (a paper's figure, the seed's claims table, a measurement on another CPU).
A failure lists every such number with its notebook, cell index and sentence.

Matching, so that one value written two ways agrees:

* **The value as printed.** A prose number with ``d`` decimals matches a printed number that rounds to it
  at ``d`` decimals: "27 %" matches "+27.4 %", "1.8×" matches "1.84x", "1.80×" matches "1.8x"; "1.9×"
  does not match "1.84x", nor "2.61×" "2.6x". Signs and thousands separators are ignored (the prose says
  "worse" where a table prints "+").
* **The unit must be printed too.** A ratio ("1.8×", "3x") matches only a number printed with "x" or "×"
  ("4× smaller" does not match "4 layers"); a percentage only one printed with "%", or a code literal as a
  fraction ("20 %" matches ``BANDS = {"rep4": 0.20}``); a printed fraction is not a percentage.
* **k / M / B** after a prose number ("134.5 M parameters") also match a printed count (134,515,008).
* **Code cells** count with their numeric literals (``tokenize``: not comments, not strings), except integers
  below 10: ``range(4)`` or ``dim=1`` are in nearly every cell and vouch for nothing.

Not measurements, so never checked: numbers inside inline code spans and code blocks (identifiers and
arguments such as ``group_size=64``: the code runs, and its outputs are what the prose must agree with),
inside ``$math$``, HTML comments and link targets; the course map between ``<!-- run-times`` markers (its
run times are written from the cell timings by benchmarks/run_times.py and checked by
tests/test_run_times.py; its study times are estimates); numbers that are part of a name (SmolLM2-135M,
Q4_1, int8, W8A8, g64, top-64, c33), sparsity patterns (2:4), dates, years 1990–2035 without a unit (earlier citation years are allowed by name),
section / lesson / cell / exercise / issue numbers ("section 10", a heading's "## 10 ·"), and the factors
of a product of sizes ("4 × 8 matrix", "49,152 × 576": that "×" is not a ratio, and each factor is
checked only if it has two digits).

A number matches anywhere in its notebook's outputs, so a two-digit integer can match by coincidence
(about half of them would); the guard is strongest on numbers with decimals and on ratios and percentages.
"""

from __future__ import annotations

import bisect
import functools
import io
import json
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("0*.ipynb"))

# notebook stem -> {number as the checker names it (digits, then "%" or "×" if it has one): why it is allowed}.
# Only numbers that do not change when the notebook is executed again: figures from papers and docs, the
# seed's claims, model dimensions, settings the prose states and the code takes from the package.
_CLAIMS = "the seed's claims table (distill_lab/claims.py), quoted, not measured"
_EMBEDDING = "the teacher's embedding share, 21.0 % as 00 c5 prints it: a property of the model"
_VOCAB = "the teacher's vocabulary and width, 49,152 × 576 (its config; 00 c5 prints them)"
_EVAL_WINDOWS = "the laptop profile's eval_windows (distill_lab/profiles.py) that lesson 00 scores, (40, 256) in 00 c9"
_OTHER_VMS = "02 c14's table: two other 2-core VMs in earlier runs of the course (docs/results.md), not this run"
ALLOWED: dict[str, dict[str, str]] = {
    "00_baseline": {
        "20%": "how far one machine's run time moves between idle runs (docs/teaching.md: 01 took 8.7, 9.1 and "
               "10.5 min); about the course map, not this run",
        "79%": "100 % minus the embedding share c5 prints (21.0 %): a property of the model",
        "255": "an illustration of context length: the last token of a 256-token window sees 255 tokens",
        "63": "an illustration of context length: the last token of the shortest (64-token) window sees 63 tokens",
        "60": "the labs' length range, 15–60 lines of solution (tests/test_labs.py checks it), a course convention",
        "1967": "the year of Amdahl's paper (a citation, not a measurement)",
        "95%": "two standard errors as roughly a 95 % band: a property of the normal distribution, not a measurement",
    },
    "01_distillation": {
        "10": "30 - 20: the Block Influence candidate's definition drops 10 of the teacher's 30 blocks",
        "2%": _CLAIMS + " (Distillation: 2–5 % loss)",
        "5%": _CLAIMS + " (Distillation: 2–5 % loss)",
    },
    "02_quantization": {
        "4×": _CLAIMS + " (INT8: 4× smaller; INT4: 3–4× faster); also fp32's 32 bits over int8's 8",
        "8×": _CLAIMS + " (INT4: 8× smaller); also fp32's 32 bits over int4's 4",
        "2×": _CLAIMS + " (INT8: 2–3× faster)",
        "3×": _CLAIMS + " (INT8: 2–3× faster; INT4: 3–4× faster)",
        "1%": _CLAIMS + " (INT8: < 1 %; INT4: 1–3 %)",
        "3%": _CLAIMS + " (INT4: 1–3 %)",
        "21%": _EMBEDDING,
        "49,152": _VOCAB,
        "40": _EVAL_WINDOWS,
        "10": "a prediction prompt's choices (1? 10? 100? 1000?), not a measurement",
        "1000": "a prediction prompt's choices (1? 10? 100? 1000?), not a measurement",
        "2.13": "the torch version of 02 c14's earlier runs on two other VMs",
        **{n: _OTHER_VMS for n in ("2048", "1.22×", "1×", "3,081", "0.89", "3.2", "23,583", "5.7", "19", "1.2×",
                                   "3,500", "4,100×")},
    },
    "03_pruning": {
        "50%": _CLAIMS + " (50 % pruning); also the sparsity the lesson sets",
        "2×": _CLAIMS + " (50 % pruning: 2× smaller)",
        "1.5×": _CLAIMS + " (50 % pruning: 1.5× faster)",
        "1%": _CLAIMS + " (50 % pruning: 1–2 % loss)",
        "2%": _CLAIMS + " (50 % pruning: 1–2 % loss)",
        "21%": _EMBEDDING,
        "49": _VOCAB + ", written 49k",
        "1.1×": "the 2:4 speed-up PyTorch reports for large fp16 matrices on sm80+ GPUs (1.1–1.6×); no GPU here",
        "1.6×": "the 2:4 speed-up PyTorch reports for large fp16 matrices on sm80+ GPUs (1.1–1.6×); no GPU here",
    },
    "04_combined": {
        **{n: _CLAIMS for n in ("4×", "3×", "1%", "8×", "3%", "5×", "2%", "5%", "50%", "1.5×", "20×", "8%")},
        "2×": _CLAIMS + " (50 % pruning: 2× smaller; INT8: 2–3× faster)",
        "10×": _CLAIMS + " (Distillation 5–10×, Combined 10–20×); also the exercise's size budget and the gpu "
                         "profile's recipe_steps over the laptop's (300 / 30, distill_lab/profiles.py)",
        "10%": "the claims table's tolerance on size and speed (verdict(tolerance=0.9), "
               "distill_lab/pipeline/report.py)",
        "45%": "the 50 % pruning row's recipe keeps 45 % of the MLP channels (channels_keep=0.45, "
               "distill_lab/pipeline/report.py)",
        "80%": "lesson 01's student keeps 80 % of the MLP channels (1229 of 1536, as 01 prints); 1216 of 1536 is "
               "about 80 %",
        "40": _EVAL_WINDOWS + " (lessons 00–03)",
        "49,152": _VOCAB,
        "576": _VOCAB,
    },
}

_UNIT_AFTER = re.compile(r"[ \u00a0\u2009\u202f]?(%|×|x(?![A-Za-z]))")
_UNIT_BEFORE = re.compile(r"(×|(?<![A-Za-z])x)$")
_SCALE = re.compile(r"[ \u00a0\u2009\u202f]?([kMBG])(?![A-Za-z])")
_UNIT_WORD = re.compile(r"(?:MiB|GiB|KiB|MB|GB|KB|kB|ms|µs|us|s|dB|nd|rd|th|st)(?![A-Za-z])")
_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?")
_SKIP_WORDS = re.compile(r"(?:sections?|lessons?|notebooks?|cells?|exercises?|issues?|figures?|chapters?|§)"
                         r"[ \u00a0]*(?:\d+[ ,–-]*(?:and|or)?[ ]*)*$", re.IGNORECASE)
_MASKS = [re.compile(p, re.DOTALL | re.MULTILINE) for p in (
    r"<!-- run-times.*?<!-- /run-times -->", r"```.*?```", r"`[^`\n]*`", r"\$\$.*?\$\$", r"(?<!\\)\$[^$\n]+\$",
    r"<!--.*?-->", r"<[^>\n]*>",
    r"\]\([^)\s]*\)", r"\d{4}-\d{2}-\d{2}", r"\d+:\d+", r"^#{1,6}[ \t]+\d+(?:\.\d+)*[ \t]*·")]
# a printed number and its "%", "x" or "×" ("2.6x"; not the "x" of "8 x 256", a product of sizes)
_OUT_NUMBER = re.compile(r"(\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?)"
                         r"(?:[ \u00a0\u2009\u202f]?(%|×(?!\s?\d)|x(?![A-Za-z0-9]|\s?\d)))?")
_BREAK = re.compile(r"[.!?][)*]*\s+|\n\s*\n|\n\s*(?:[*-]|\d+\.)\s|\n\|")


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def masked(text: str) -> str:
    """``text`` with everything that is not prose (code, math, comments, names like 2:4) blanked, same length."""
    for pattern in _MASKS:
        text = pattern.sub(lambda m: re.sub(r"\S", " ", m.group(0)), text)
    return text


def _significant(digits: str) -> int:
    return len(digits.replace(",", "").replace(".", "").lstrip("0"))


def prose_numbers(text: str) -> list[dict]:
    """The numbers of one markdown cell that must be printed: text, value, decimals, unit, position."""
    prose, found = masked(text), []
    for m in _NUMBER.finditer(prose):
        start, end, digits = m.start(), m.end(), m.group(0)
        before, after = prose[max(0, start - 40):start], prose[end:end + 12]
        prev = before[-1:]
        if prev.isalpha() or (prev and prev in "_.,'") or (prev == "-" and before[-2:-1].isalnum()):
            continue  # part of a name (int8, Q4_1, SmolLM2-135M, top-64) or of a version
        if after[:1] == "_" or (after[:1].isalpha() and not (
                _UNIT_AFTER.match(after) or _SCALE.match(after) or _UNIT_WORD.match(after))):
            continue  # int8's "int" is before, this is "4bit", "8B-instruct" and the like
        if _UNIT_WORD.match(after) and after[:2] in ("nd", "rd", "th", "st"):
            continue  # an ordinal
        if _SKIP_WORDS.search(before):
            continue  # section 10, lessons 01 and 03, issue 16
        value = float(digits.replace(",", ""))
        unit_after, unit_before = _UNIT_AFTER.match(after), _UNIT_BEFORE.search(before)
        # "4 × 8 matrix", "49,152 × 576": a product of sizes, not a ratio
        product = (unit_after and unit_after.group(1) in "×x" and re.match(r"\s*[×x]\s*\d", after)) or \
            (unit_before and re.search(r"\d[kMB]?\s*[×x]$", before))
        unit = "" if product else (unit_after.group(1) if unit_after else unit_before.group(1) if unit_before else "")
        if not unit and re.match(r"[–-]\d+(?:\.\d+)?\s?[%×x]", after):
            unit = re.match(r"[–-]\d+(?:\.\d+)?\s?([%×x])", after).group(1)  # "2–3×": both ends are ratios
        unit = "×" if unit == "x" else unit
        decimals = len(digits.split(".")[1]) if "." in digits else 0
        if not unit and (_significant(digits) < 2 or (decimals == 0 and 1990 <= value <= 2035)):
            continue
        scale = _SCALE.match(after)
        found.append({"text": digits + unit, "value": value, "decimals": decimals, "unit": unit,
                      "scale": scale.group(1) if scale else "", "start": start})
    return found


def sentence(text: str, pos: int) -> str:
    """The sentence, list item or table row of ``text`` around ``pos``, on one line."""
    line_start, line_end = text.rfind("\n", 0, pos) + 1, text.find("\n", pos)
    line = text[line_start:line_end if line_end >= 0 else len(text)]
    if line.lstrip().startswith("|"):
        return " ".join(line.split())  # a table row
    start = max((m.end() for m in _BREAK.finditer(text, 0, pos)), default=0)
    end = _BREAK.search(text, pos)
    return " ".join(re.sub(r"<!--.*?-->", " ", text[start:end.start() + 1 if end else len(text)]).split())


def printed_values(nb: dict) -> dict[str, list[float]]:
    """Sorted absolute values in the text outputs of ``nb``: all of them (""), those printed with "%" and
    those with "x" or "×"; each list also holds every numeric literal of the code cells."""
    values = {"": set(), "%": set(), "×": set(), "code": set()}
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            for text in (out.get("text", ""), data.get("text/plain", ""), data.get("text/markdown", "")):
                for m in _OUT_NUMBER.finditer(_text(text)):
                    value = float(m.group(1).replace(",", ""))
                    values[""].add(value)
                    values[""].update(float(part) for part in m.group(1).split(",") if part.isdigit())
                    if m.group(2):
                        values["×" if m.group(2) in "x×" else "%"].add(value)
        literals = _code_literals(_text(cell["source"]))
        for found in values.values():
            found.update(literals)
    return {unit: sorted(found) for unit, found in values.items()}


def _code_literals(source: str) -> set[float]:
    """The numeric literals of a code cell, but for integers below 10: ``range(4)``, ``dim=1`` and ``2 ** bits``
    are in nearly every cell and vouch for nothing (a float such as ``6.0`` or ``0.2`` counts)."""
    code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
    found = set()
    try:
        for tok in tokenize.generate_tokens(io.StringIO(code).readline):
            if tok.type != tokenize.NUMBER or tok.string[-1] in "jJ":
                continue
            text = tok.string.replace("_", "")
            value = float(text) if re.fullmatch(r"[\d.]+(?:[eE][-+]?\d+)?", text) else float(int(text, 0))
            if value >= 10 or not re.fullmatch(r"\d+", text):
                found.add(value)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass  # a cell that does not tokenize contributes what it had so far
    return found


def _near(values: list[float], target: float, half: float) -> bool:
    i = bisect.bisect_left(values, target - half)
    return i < len(values) and values[i] <= target + half


def matches(number: dict, values: dict[str, list[float]]) -> bool:
    """Whether a printed value rounds to ``number`` at its decimals.

    A number with "%" is looked for among values printed with "%", and among all printed values as a
    fraction (20 % = 0.20); one with "×" among values printed with "x" or "×"; either also among the code's
    literals. With k / M / B after it, also among all values as a count (134.5 M = 134,500,000 +- 50,000).
    """
    value, half = number["value"], 0.5 * 10 ** -number["decimals"] * (1 + 1e-9)
    tries = [(values[number["unit"]], 1.0)]
    if number["unit"] == "%":
        tries.append((values["code"], 0.01))
    if number["scale"]:
        tries.append((values[""], {"k": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}[number["scale"]]))
    return any(_near(found, value * scale, half * scale) for found, scale in tries)


def violations(nb: dict, allowed: dict[str, str] | None = None) -> list[tuple[int, str, str]]:
    """(cell index, number, sentence) of every prose number of ``nb`` that no output or literal holds."""
    allowed, values, found = allowed or {}, printed_values(nb), []
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "markdown":
            continue
        text = _text(cell["source"])
        for number in prose_numbers(text):
            if number["text"] not in allowed and not matches(number, values):
                found.append((index, number["text"], sentence(text, number["start"])))
    return found


def report(name: str, found: list[tuple[int, str, str]]) -> str:
    return "\n".join(f"{name} c{index}: {number!r} in: {text}" for index, number, text in found)


@functools.lru_cache(maxsize=None)
def _committed(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _load(path: Path) -> dict:
    """A fresh copy of a committed notebook (tests may change it in memory)."""
    return json.loads(_committed(path))


def _notebook(markdown: str, output: str = "", code: str = "x = 1") -> dict:
    """A two-cell notebook: one code cell printing ``output``, one markdown cell."""
    return {"cells": [{"cell_type": "code", "source": code, "outputs": [{"output_type": "stream", "text": output}]},
                      {"cell_type": "markdown", "source": markdown}]}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_prose_number_is_printed_or_allowed(path):
    found = violations(_load(path), ALLOWED.get(path.stem))
    assert not found, (f"{len(found)} number(s) in {path.name}'s prose that its outputs and code do not hold "
                       f"(print them, fix them, or allow them in ALLOWED with a reason):\n" + report(path.stem, found))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_allowed_number_is_still_in_the_prose(path):
    nb = _load(path)
    written = {n["text"] for c in nb["cells"] if c["cell_type"] == "markdown"
               for n in prose_numbers(_text(c["source"]))}
    stale = sorted(set(ALLOWED.get(path.stem, {})) - written)
    assert not stale, f"ALLOWED[{path.stem!r}] lists numbers its prose no longer has: {stale}"
    assert all(reason.strip() for reason in ALLOWED.get(path.stem, {}).values()), "every allowed number needs a reason"


def test_the_notebooks_are_found():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["00", "01", "02", "03", "04"], NOTEBOOKS
    assert set(ALLOWED) <= {p.stem for p in NOTEBOOKS}, sorted(set(ALLOWED) - {p.stem for p in NOTEBOOKS})


def _unprinted(values: dict, start: float, step: float, unit: str = "") -> float:
    """The first of start, start + step, ... that no printed value rounds to (2 decimals)."""
    value = start
    while matches({"value": value, "decimals": 2, "unit": unit, "scale": ""}, values):
        value = round(value + step, 2)
    return value


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_a_planted_sentence_with_an_unprinted_number_is_flagged(path):
    nb = _load(path)
    value = _unprinted(printed_values(nb), 7.31, 0.06, "×")
    planted = f"On this machine decode is {value:.2f}x faster than fp32."
    nb["cells"].insert(3, {"cell_type": "markdown", "metadata": {}, "source": [planted]})
    found = violations(nb, ALLOWED.get(path.stem))
    assert (3, f"{value:.2f}×", planted) in found, found
    assert f"{path.stem} c3: '{value:.2f}×' in: {planted}" in report(path.stem, found)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_a_prose_number_changed_against_its_output_is_flagged(path):
    nb, allowed = _load(path), ALLOWED.get(path.stem, {})
    values = printed_values(nb)
    # a number the prose shares with the outputs (not by allowance): a ratio or percentage with decimals if
    # there is one, else one with decimals, else one with at least 3 digits
    shared = [(not n["unit"], n["decimals"] == 0, i, n) for i, c in enumerate(nb["cells"])
              if c["cell_type"] == "markdown" for n in prose_numbers(_text(c["source"]))
              if n["text"] not in allowed and (n["decimals"] or _significant(n["text"].rstrip("%×")) >= 3)]
    *_, index, number = min(shared, key=lambda s: s[:3])
    assert matches(number, values), number
    step = 10.0 ** -number["decimals"]
    new = number["value"] + step * 37
    while matches({**number, "value": new}, values):
        new += step * 37
    digits = f"{new:.{number['decimals']}f}"
    text = _text(nb["cells"][index]["source"])
    start, end = number["start"], number["start"] + len(number["text"].rstrip("%×"))
    nb["cells"][index]["source"] = text[:start] + digits + text[end:]
    assert (index, digits + number["unit"]) in [(i, n) for i, n, _ in violations(nb, allowed)], (index, digits)


@pytest.mark.parametrize("prose, output, code", [
    ("decode is 1.80× faster", "decode 1.8x", ""),             # the value as printed, either way round
    ("decode is 1.8× faster", "decode 1.84x", ""),             # the output rounded to the prose's decimals
    ("27 % worse", "Δppl +27.4 %", ""),                        # sign and spacing do not matter
    ("at most 20 % of its 4-grams", "", "BANDS = {'rep4': 0.20}"),  # a percentage as a code constant's fraction
    ("The teacher has 134.5 M parameters", "134,515,008 parameters", ""),  # M: a count
    ("we keep 1,216 channels", "channels kept: 1216", ""),
])
def test_the_same_value_written_two_ways_matches(prose, output, code):
    assert violations(_notebook(prose, output, code or "x = 1")) == []


@pytest.mark.parametrize("prose, output, number", [
    ("decode is 1.9× faster", "decode 1.84x", "1.9×"),         # rounds to 1.8, not 1.9
    ("decode is 2.61× faster", "decode 2.6x", "2.61×"),        # the prose claims a digit the output lacks
    ("4× smaller", "4 layers", "4×"),                          # a ratio must be printed as a ratio
    ("27 % worse", "0.27 of the mass", "27%"),                 # a printed fraction is not a percentage
    ("perplexity 15.9", "perplexity 15.71", "15.9"),
    ("a 4 × 8 matrix has 32 values", "a matrix", "32"),        # the product's factors are sizes, its result is not
])
def test_a_different_value_is_flagged(prose, output, number):
    assert [n for _, n, _ in violations(_notebook(prose, output))] == [number]


@pytest.mark.parametrize("prose", [
    "**SmolLM2-135M** stored as Q4_1, run in int8, W8A8 or INT4 g64 with top-64 logits",
    "2:4 sparsity, cells c33 and c34, issue 16, section 12, sections 10 and 11, lesson 04",
    "## 10 · Lab: write it yourself",
    "Hinton et al. (2015) and Men et al., 2024, on 2026-12-07",
    "`group_size=64` and `Int4WeightOnlyConfig(128)` in code, $2^{16}$ and $$10\\log_{10} 42$$ in math",
    "<!-- run-times -->\n| 00 | 3.7 min |\n<!-- /run-times --> and [docs](results.md#section-42)",
    "a 4 × 8 matrix, 4 bits and 3 heads",
])
def test_names_references_code_and_math_are_not_measurements(prose):
    assert prose_numbers(prose) == [], prose_numbers(prose)


def test_a_failure_names_notebook_cell_number_and_sentence():
    nb = _notebook("First sentence. Decode is 3.17× faster here. Last one.", "decode 2.00x")
    assert report("00_x", violations(nb)) == "00_x c1: '3.17×' in: Decode is 3.17× faster here."
