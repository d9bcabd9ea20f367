"""Final-answer extraction and checking for math benchmarks.

Protocol (docs/science.md, section 8): take the model's final answer (the last `\\boxed{}`, else the text
after "the answer is", else the last number), then judge it with
`math_verify.verify(parse(gold), parse(pred))`, gold first (verify is not symmetric: the gold decides, for example, whether `x=2` may match `2`).

`math_verify.parse` only reads LaTeX inside an anchor (`$...$`, `\\boxed{}`), so a bare `\\frac12` parses
to nothing; we therefore parse every answer string as `\\boxed{<answer>}` after a light clean-up
(currency signs, thousands separators, trailing full stops, plain-word units), and fall back to a plain
parse when that yields nothing.
"""

from __future__ import annotations

import re
import threading
from typing import Any

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOXED_BARE = re.compile(r"\\boxed\s+([^\s${}]+)")
# "the answer is", "final answer:", "answer is:", "#### 42" (GSM8K style).
_ANSWER_IS = re.compile(r"(?:\banswer\s*(?:is\b|:|=)\s*:?|####)\s*(?P<rest>.+)", re.IGNORECASE)
# a number: optional sign (not a binary minus after a word/bracket), thousands groups, decimals, a fraction
_NUMBER = re.compile(r"(?:(?<![\w)\]}])-)?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+(?![\d.]))?")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_NUMBER_THEN_WORDS = re.compile(r"^(-?\d+(?:,\d{3})*(?:\.\d+)?)\s+[A-Za-z][A-Za-z\s.]*$")
_LEADING_WORD = re.compile(r"^[A-Za-z]{2,}\b")


def last_boxed(text: str) -> str | None:
    """Content of the last non-empty `\\boxed{...}` (balanced braces), else of `\\boxed 5`; None if absent."""
    for m in reversed(list(_BOXED.finditer(text))):
        depth = 1
        for i in range(m.end(), len(text)):
            c = text[i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    content = text[m.end() : i].strip()
                    if content:
                        return content
                    break
    bare = _BOXED_BARE.findall(text)
    return bare[-1] if bare else None


def _after_answer_is(text: str) -> str | None:
    """The phrase after the last "answer is"/"answer:"/"####", cut at the end of its sentence or line.

    A LaTeX span right after the phrase is taken whole; a phrase in words ("that Tom has 5 apples") is
    reduced to its last number.
    """
    for m in reversed(list(_ANSWER_IS.finditer(text))):
        rest = m.group("rest").split("\n", 1)[0].strip()
        if rest.startswith("$$") and rest.find("$$", 2) > 0:
            cand = rest[2 : rest.find("$$", 2)]
        elif rest.startswith("$") and rest.find("$", 1) > 0 and not re.match(r"\$\s*-?[\d.]", rest):
            cand = rest[1 : rest.find("$", 1)]
        else:
            # end of sentence: a full stop before a space or the end (not a decimal point), or ; ! ?
            cand = re.split(r"\.(?=\s|$)|[;!?]", rest, maxsplit=1)[0]
        cand = cand.strip().strip(",").strip()
        if _LEADING_WORD.match(cand) and not _NUMBER_THEN_WORDS.match(cand):
            cand = _last_number(cand) or ""
        if cand and re.search(r"[0-9A-Za-z\\]", cand):
            return cand
    return None


def _last_number(text: str) -> str | None:
    nums = _NUMBER.findall(text)
    return re.sub(r"\s+", "", nums[-1]) if nums else None


def extract_answer(text: str | None) -> str | None:
    """The model's final answer as a string, or None when the text holds no answer at all.

    Order: last `\\boxed{}`; else the phrase after the last "the answer is" (or "answer:", "####");
    else the last number in the text.
    """
    if not text:
        return None
    for finder in (last_boxed, _after_answer_is, _last_number):
        ans = finder(text)
        if ans is not None and ans.strip():
            return ans.strip()
    return None


def normalize_answer(answer: str) -> str:
    """Light clean-up before LaTeX parsing: math delimiters, currency, thousands commas, units in words."""
    s = str(answer).strip()
    if len(s) > 4 and s.startswith("$$") and s.endswith("$$"):
        s = s[2:-2].strip()
    elif len(s) > 2 and s.startswith("$") and s.endswith("$") and s.count("$") == 2:
        s = s[1:-1].strip()
    s = s.replace("\\$", "")
    s = re.sub(r"\$(?=\s*-?[\d.])", "", s)  # a currency sign before a number
    s = re.sub(r"(?<=\d)\\[,!;: ](?=\d)", "", s)  # LaTeX thin spaces inside numbers: 1\,000
    s = s.replace("{,}", ",").rstrip(".").strip()
    words = _NUMBER_THEN_WORDS.match(s)
    if words:  # "18 dollars", "5 apples": keep the number
        s = words.group(1)
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    return s


def _timeout() -> int | None:
    """math_verify's timeouts use SIGALRM, which only works in the main thread: disable them elsewhere."""
    return 5 if threading.current_thread() is threading.main_thread() else None


def parse_answer(answer: str) -> list[Any]:
    """Parse an answer string with math_verify (empty list when nothing parses)."""
    from math_verify import parse

    s = normalize_answer(answer)
    if not s:
        return []
    t = _timeout()
    parsed = parse("\\boxed{" + s + "}", parsing_timeout=t)
    if not parsed:
        parsed = parse(s, parsing_timeout=t)
    return parsed


def answers_match(gold: str, answer: str) -> bool:
    """True when the already-extracted `answer` equals `gold` under math_verify (gold first)."""
    from math_verify import verify

    g = parse_answer(gold)
    if not g:
        raise ValueError(f"gold answer {gold!r} does not parse; fix the benchmark's gold extractor")
    p = parse_answer(answer)
    if not p:
        return False
    return bool(verify(g, p, timeout_seconds=_timeout()))


def is_correct(prediction_text: str | None, gold: str) -> bool:
    """Judge a model's whole output against the gold answer: extract its final answer, then verify."""
    answer = extract_answer(prediction_text)
    if answer is None:
        return False
    return answers_match(gold, answer)
