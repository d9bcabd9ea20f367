"""Throughput of the math SFT data path (clean + shuffle, then chat-format + tokenize). Prints JSON.

    python benchmarks/bench_tokenize.py [--rows 20000] [--num-proc 1 2] [--vocab-size 4000]

Data: a synthetic NuminaMath-like jsonl (problem ~300 chars, solution ~1,200 chars of words, numbers
and LaTeX, plus the other NuminaMath-1.5 fields), written to a temp folder so it is file-backed like
the real data. Tokenizer: a byte-level BPE trained here (no hub access) with a ChatML template; a real
49K-vocab tokenizer is somewhat slower per character, so treat the numbers as an upper bound.

Each run is a fresh interpreter reading its own copy of the file (a cold cache, and no tokenizer
thread-pool state carried over), interleaved across num_proc values; the fastest of `--repeats` is kept.
- `tokenize_by_num_proc[n]`: `tokenize_sft` seconds, rows/s, tokens/s and projected minutes for 400K
  rows; `load_rows_s` is `load_sft_rows` (jsonl -> arrow, drop empty rows, seeded shuffle);
  `cached_reload_s` is the same `tokenize_sft` call again, served from the `datasets` cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "let the number of apples be such that we find sum product total each remaining therefore since "
    "hence consider integer value equation solve substitute gives both sides divide multiply subtract "
    "add positive real triangle area circle radius angle probability ways choose sequence term"
).split()
LATEX = ("\\frac{{{a}}}{{{b}}}", "{a}^{{{b}}}", "\\sqrt{{{a}}}", "{a} \\cdot {b}", "{a} + {b} = {c}", "x_{{{a}}}")


def _sentence(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(6, 16)):
        r = rng.random()
        if r < 0.15:
            a, b = rng.randint(1, 999), rng.randint(1, 99)
            parts.append("$" + rng.choice(LATEX).format(a=a, b=b, c=a + b) + "$")
        elif r < 0.25:
            parts.append(str(rng.randint(0, 10_000)))
        else:
            parts.append(rng.choice(WORDS))
    return " ".join(parts).capitalize() + "."


def _text(rng: random.Random, n_chars: int) -> str:
    out = []
    while sum(len(s) + 1 for s in out) < n_chars:
        out.append(_sentence(rng))
    return " ".join(out)


def write_synthetic(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(rows):
            answer = str(rng.randint(0, 1000))
            row = {
                "problem": _text(rng, max(50, int(rng.gauss(300, 100)))),
                "solution": _text(rng, max(100, int(rng.gauss(1200, 400)))) + f" The answer is $\\boxed{{{answer}}}$.",
                "answer": answer,
                "problem_type": rng.choice(["Algebra", "Geometry", "Number Theory", "Combinatorics"]),
                "question_type": "math-word-problem",
                "source": rng.choice(["olympiads", "cn_k12", "synthetic_math", "orca_math"]),
                "synthetic": rng.random() < 0.5,
            }
            if i % 500 == 0:  # a few empty rows to drop, as in the real data
                row["solution"] = ""
            f.write(json.dumps(row) + "\n")


def measure(src: Path, tok_dir: Path, num_proc: int, max_seq_len: int) -> dict:
    """One cold-cache tokenization of `src` (run in a fresh interpreter by `main`)."""
    import datasets

    from stars.tasks.math_sft import load_sft_rows, load_tokenizer, tokenize_sft

    datasets.disable_progress_bars()
    tok = load_tokenizer(tok_dir)
    start = time.perf_counter()
    rows = load_sft_rows(src, seed=74, num_proc=1)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    out = tokenize_sft(rows, tok, max_seq_len=max_seq_len, num_proc=num_proc)
    secs = time.perf_counter() - start
    start = time.perf_counter()
    tokenize_sft(rows, tok, max_seq_len=max_seq_len, num_proc=num_proc)
    cached_s = time.perf_counter() - start
    tokens = int(sum(out["length"]))
    return {
        "load_rows_s": round(load_s, 2),
        "seconds": round(secs, 2),
        "rows_per_s": round(len(rows) / secs),
        "tokens_per_s": round(tokens / secs),
        "projected_minutes_400k_rows": round(400_000 / (len(rows) / secs) / 60, 1),
        "rows_in": len(rows),
        "rows_kept": len(out),
        "mean_tokens_per_row": round(tokens / len(out), 1),
        "cached_reload_s": round(cached_s, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2, help="runs per num_proc (interleaved; best kept)")
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--worker", nargs=3, metavar=("SRC", "TOK", "NUM_PROC"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        src, tok_dir, n = args.worker
        print(json.dumps(measure(Path(src), Path(tok_dir), int(n), args.max_seq_len)))
        return

    from stars.tasks.testing import build_tiny_chat_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench_tokenize_"))
    # every arrow/cache file of the benchmark stays in `work` and is deleted at the end
    env = dict(os.environ, HF_DATASETS_CACHE=str(work / "hf_cache"), HF_DATASETS_OFFLINE="1")
    try:
        src = work / "numina.jsonl"
        write_synthetic(src, args.rows)
        sample = [json.loads(line) for line in src.read_text().splitlines()[:2000]]
        corpus = [r["problem"] for r in sample] + [r["solution"] for r in sample]
        tok_dir = build_tiny_chat_tokenizer(work / "tok", corpus, vocab_size=args.vocab_size)
        runs: dict[str, list[dict]] = {str(n): [] for n in args.num_proc}
        for r in range(args.repeats):
            for n in args.num_proc:
                copy = work / f"run_{r}_{n}" / "numina.jsonl"  # own file: a cold cache for every run
                copy.parent.mkdir()
                shutil.copy(src, copy)
                cmd = [sys.executable, __file__, "--max-seq-len", str(args.max_seq_len),
                       "--worker", str(copy), str(tok_dir), str(n)]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                runs[str(n)].append(json.loads(done.stdout.strip().splitlines()[-1]))
        best = {n: min(rs, key=lambda x: x["seconds"]) | {"all_seconds": [x["seconds"] for x in rs]}
                for n, rs in runs.items()}
        print(json.dumps({
            "rows": args.rows,
            "tokenizer": f"byte-level BPE, vocab {args.vocab_size}, ChatML",
            "max_seq_len": args.max_seq_len,
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "tokenize_by_num_proc": best,
        }, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
