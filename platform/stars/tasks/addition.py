"""Multi-digit addition: the STARS diagnostic task (docs/science.md, section 5).

Sequence layout, with reversed answers so the model emits the least significant digit first (the order
in which carries are computed): `1750+4733= 3846<EOS>`. Loss falls on the space, the answer digits and
EOS only. A problem is solved when the whole answer, EOS included, is right.

Two scorers with one definition of correctness:
- `score_teacher_forced`: argmax at every supervised position equals the target; all depths from one
  `model.forward_depths` pass (the cheap way to get a 1..16 depth curve);
- `score_greedy`: `model.generate_greedy` from the prompt `1750+4733=` must produce ` 3846<EOS>`.
Greedy decoding only ever conditions on its own previous tokens, so it reproduces the target exactly
when, and only when, every teacher-forced argmax is right: the two must agree problem by problem.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stars.tasks.registry import EvalInputError, TeacherForcedTask, TrainingData, TrainingTask, register

if TYPE_CHECKING:
    import torch

    from stars.spec import JobSpec

IGNORE_INDEX = -100
_SYMBOLS = "0123456789+= "


@dataclass(frozen=True)
class AdditionProblem:
    num1: int
    num2: int
    answer: int

    @classmethod
    def of(cls, num1: int, num2: int) -> AdditionProblem:
        return cls(num1, num2, num1 + num2)

    @property
    def key(self) -> tuple[int, int]:
        """Identity used for train/test disjointness (ordered operands)."""
        return (self.num1, self.num2)


class AdditionTokenizer:
    """Character tokenizer: digits 0-9 (ids 0-9), `+` 10, `=` 11, space 12, PAD 13, EOS 14.

    `digits` is the operand length the task is built for; it sets `max_length` (the longest sequence,
    used to size position embeddings) but encoding accepts operands of any length, so a model trained
    on 4 digits can be probed on longer ones.
    """

    vocab_size = 15
    pad_token_id = 13
    eos_token_id = 14
    space_token_id = 12

    def __init__(self, digits: int = 4) -> None:
        if digits < 1:
            raise ValueError(f"digits must be >= 1, got {digits}")
        self.digits = digits
        self._ids = {c: i for i, c in enumerate(_SYMBOLS)}

    @property
    def max_length(self) -> int:
        """Longest example: 2*digits operands, `+`, `=`, space, digits+1 answer digits, EOS."""
        return 3 * self.digits + 5

    @property
    def prompt_length(self) -> int:
        return 2 * self.digits + 2

    def _encode_text(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the addition vocabulary") from None

    def encode_prompt(self, num1: int, num2: int) -> list[int]:
        """Tokens of `"{num1}+{num2}="`."""
        if num1 < 0 or num2 < 0:
            raise ValueError(f"operands must be non-negative, got {num1}, {num2}")
        return self._encode_text(f"{num1}+{num2}=")

    def encode_answer(self, answer: int) -> list[int]:
        """Tokens the model must produce: space, the answer's digits reversed, EOS."""
        if answer < 0:
            raise ValueError(f"answer must be non-negative, got {answer}")
        return [self.space_token_id, *self._encode_text(str(answer)[::-1]), self.eos_token_id]

    def encode_example(self, num1: int, num2: int, answer: int | None = None) -> list[int]:
        """Prompt followed by the answer tokens; `answer` defaults to `num1 + num2`."""
        return self.encode_prompt(num1, num2) + self.encode_answer(num1 + num2 if answer is None else answer)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; PAD is dropped, EOS shows as `§` unless `skip_special_tokens`."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.pad_token_id:
                continue
            if i == self.eos_token_id:
                if not skip_special_tokens:
                    out.append("§")
                continue
            if not 0 <= i < len(_SYMBOLS):
                raise ValueError(f"token id {i} is outside the addition vocabulary (0..{self.vocab_size - 1})")
            out.append(_SYMBOLS[i])
        return "".join(out)


# ---------------------------------------------------------------------------------------------- data
def _operand_range(digits: int) -> tuple[int, int]:
    return 10 ** (digits - 1), 10**digits - 1


def generate_problems(
    n: int, digits: int = 4, seed: int = 0, exclude: Iterable[tuple[int, int]] = ()
) -> list[AdditionProblem]:
    """`n` distinct problems with operands uniform over `digits`-digit numbers, none of them in `exclude`.

    Deterministic for a given (n, digits, seed, exclude).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    lo, hi = _operand_range(digits)
    banned = set(exclude)
    available = (hi - lo + 1) ** 2 - sum(1 for a, b in banned if lo <= a <= hi and lo <= b <= hi)
    if n > available:
        raise ValueError(f"asked for {n} distinct {digits}-digit problems but only {available} exist")
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    out: list[AdditionProblem] = []
    while len(out) < n:
        key = (rng.randint(lo, hi), rng.randint(lo, hi))
        if key in seen or key in banned:
            continue
        seen.add(key)
        out.append(AdditionProblem.of(*key))
    return out


def split_problems(
    n_train: int, n_test: int, digits: int = 4, seed: int = 0
) -> tuple[list[AdditionProblem], list[AdditionProblem]]:
    """Disjoint (train, test) sets. The test set depends only on (n_test, digits, seed), so changing the
    training size never changes the test set; the training set excludes every test problem."""
    test = generate_problems(n_test, digits, seed=seed)
    train = generate_problems(n_train, digits, seed=seed + 1, exclude={p.key for p in test})
    return train, test


def remove_overlap(
    train: Sequence[AdditionProblem], test: Sequence[AdditionProblem]
) -> list[AdditionProblem]:
    """`train` without any problem whose operands (in order) appear in `test`."""
    banned = {p.key for p in test}
    return [p for p in train if p.key not in banned]


def write_jsonl(path: str | Path, problems: Iterable[AdditionProblem]) -> None:
    """Write the reference format: num1, num2, sum, expression, answer."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for p in problems:
            row = {
                "num1": p.num1,
                "num2": p.num2,
                "sum": p.answer,
                "expression": f"{p.num1} + {p.num2}",
                "answer": p.answer,
            }
            f.write(json.dumps(row) + "\n")


def _as_int(value: Any, path: Path, line: int, field: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{path}:{line}: field {field!r} must be an integer, got {value!r}")
    try:
        as_int = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{path}:{line}: field {field!r} must be an integer, got {value!r}") from None
    if isinstance(value, float) and value != as_int:
        raise ValueError(f"{path}:{line}: field {field!r} must be an integer, got {value!r}")
    return as_int


def read_jsonl(path: str | Path, limit: int | None = None) -> list[AdditionProblem]:
    """Read problems from jsonl (`num1`, `num2`, `answer`; `sum` accepted when `answer` is absent; other
    fields ignored). Errors name the file, the line and the field; a wrong answer is an error too."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"addition data file {str(path)!r} does not exist")
    out: list[AdditionProblem] = []
    with path.open() as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            for field in ("num1", "num2"):
                if field not in row:
                    raise ValueError(
                        f"{path}:{line_no}: missing field {field!r} (fields present: {sorted(row)})"
                    )
            ans_field = "answer" if "answer" in row else "sum" if "sum" in row else None
            if ans_field is None:
                raise ValueError(
                    f"{path}:{line_no}: missing field 'answer' (or 'sum'); fields present: {sorted(row)}"
                )
            num1 = _as_int(row["num1"], path, line_no, "num1")
            num2 = _as_int(row["num2"], path, line_no, "num2")
            answer = _as_int(row[ans_field], path, line_no, ans_field)
            if num1 < 0 or num2 < 0:
                raise ValueError(f"{path}:{line_no}: operands must be non-negative, got {num1}, {num2}")
            if answer != num1 + num2:
                raise ValueError(f"{path}:{line_no}: {ans_field} {answer} != {num1} + {num2}")
            out.append(AdditionProblem(num1, num2, answer))
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise ValueError(f"addition data file {str(path)!r} has no problems")
    return out


@dataclass
class AdditionTask:
    """Everything a run needs: tokenizer, training and test problems (disjoint)."""

    tokenizer: AdditionTokenizer
    train: list[AdditionProblem]
    test: list[AdditionProblem]
    dropped_overlap: int = 0

    def train_data(self) -> AdditionData:
        return AdditionData(self.train, self.tokenizer)


def _check_fits(problems: Sequence[AdditionProblem], tokenizer: AdditionTokenizer, source: str) -> None:
    """Operands wider than `digits` make sequences longer than the model's positions are sized for."""
    limit = 10**tokenizer.digits
    for i, p in enumerate(problems):
        if p.num1 >= limit or p.num2 >= limit:
            raise ValueError(
                f"{source}: problem {i + 1} ({p.num1}+{p.num2}) has operands longer than digits="
                f"{tokenizer.digits}; set the task's digits to the widest operand"
            )


def build_addition_task(
    train_size: int | None = 100_000,
    test_size: int | None = 1_000,
    digits: int = 4,
    seed: int = 0,
    train_file: str | Path | None = None,
    test_file: str | Path | None = None,
) -> AdditionTask:
    """Build the task from a spec: generated sets, or the published jsonl files when given.

    A file is used whole (its size argument is ignored, as the spec documents), so scores on a
    published test set are comparable. Training rows that also occur in the test set are dropped
    (counted in `dropped_overlap`); a generated training set always excludes the test set, whether
    the test set was generated or read. The test set depends only on (test_size or test_file, digits,
    seed), never on the training size. Operands wider than `digits` are an error.
    """
    tokenizer = AdditionTokenizer(digits)
    if test_file is not None:
        test = read_jsonl(test_file)
        _check_fits(test, tokenizer, str(test_file))
    else:
        if test_size is None:
            raise ValueError("test_size must be set when no test_file is given")
        test = generate_problems(test_size, digits, seed=seed)
    dropped = 0
    if train_file is not None:
        raw = read_jsonl(train_file)
        _check_fits(raw, tokenizer, str(train_file))
        train = remove_overlap(raw, test)
        dropped = len(raw) - len(train)
        if not train:
            raise ValueError(f"every problem of {str(train_file)!r} is also in the test set")
    else:
        if train_size is None:
            raise ValueError("train_size must be set when no train_file is given")
        train = generate_problems(train_size, digits, seed=seed + 1, exclude={p.key for p in test})
    return AdditionTask(tokenizer, train, test, dropped)


class AdditionData:
    """Training data (docs/interfaces.md contract): `len()` and `batch(indices)` -> right-padded tensors.

    labels follow the HF convention: same shape as input_ids, the token id at the space, answer digits
    and EOS, -100 on the prompt and on padding (the model shifts internally).
    """

    def __init__(self, problems: Sequence[AdditionProblem], tokenizer: AdditionTokenizer) -> None:
        import torch

        if len(problems) == 0:
            raise ValueError("AdditionData needs at least one problem")
        self.problems = list(problems)
        self.tokenizer = tokenizer
        pad = tokenizer.pad_token_id
        rows, label_rows, lengths = [], [], []
        for p in self.problems:
            prompt = tokenizer.encode_prompt(p.num1, p.num2)
            answer = tokenizer.encode_answer(p.answer)
            rows.append(prompt + answer)
            label_rows.append([IGNORE_INDEX] * len(prompt) + answer)
            lengths.append(len(prompt) + len(answer))
        width = max(lengths)
        self.input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)
        self.labels = torch.tensor(
            [r + [IGNORE_INDEX] * (width - len(r)) for r in label_rows], dtype=torch.long
        )
        self.lengths = torch.tensor(lengths, dtype=torch.long)
        self.attention_mask = (torch.arange(width)[None, :] < self.lengths[:, None]).long()

    def __len__(self) -> int:
        return len(self.problems)

    def batch(self, indices: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows `indices`, trimmed to the longest row among them."""
        import torch

        idx = torch.as_tensor(indices, dtype=torch.long)
        width = int(self.lengths[idx].max())
        return {
            "input_ids": self.input_ids[idx, :width],
            "attention_mask": self.attention_mask[idx, :width],
            "labels": self.labels[idx, :width],
        }


# ------------------------------------------------------------------------------------------- scoring
def _device_of(model: Any) -> torch.device:
    import torch

    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


class _EvalMode:
    """no_grad + eval() for the duration, restoring the model's previous training flag."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __enter__(self) -> None:
        import torch

        self.was_training = bool(getattr(self.model, "training", False))
        self.model.eval()
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.no_grad.__exit__(*exc)
        if self.was_training:
            self.model.train()


def teacher_forced_correct(
    model: Any,
    problems: Sequence[AdditionProblem],
    tokenizer: AdditionTokenizer,
    depths: Iterable[int] = range(1, 17),
    batch_size: int = 1024,
    on_readout: Callable[[Any, torch.Tensor], None] | None = None,
) -> dict[int, torch.Tensor]:
    """Per depth, a bool tensor [len(problems)]: argmax right at every supervised position (incl. EOS).

    `on_readout(readout, attention_mask)` sees each batch's `DepthReadout` (e.g. to collect the
    trajectory diagnostics from the same pass)."""
    import torch

    depths = list(depths)
    data = AdditionData(problems, tokenizer)
    device = _device_of(model)
    out: dict[int, list[torch.Tensor]] = {d: [] for d in depths}
    with _EvalMode(model):
        for start in range(0, len(data), batch_size):
            b = data.batch(range(start, min(start + batch_size, len(data))))
            ids, mask, labels = (b[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
            ro = model.forward_depths(ids, depths=depths, attention_mask=mask)
            if on_readout is not None:
                on_readout(ro, mask)
            target = labels[:, 1:]
            supervised = target != IGNORE_INDEX
            for d, logits in zip(ro.depths, ro.logits, strict=True):
                pred = logits[:, :-1].argmax(dim=-1)
                out[int(d)].append(((pred == target) | ~supervised).all(dim=1).cpu())
    return {d: torch.cat(v) for d, v in out.items()}


def score_teacher_forced(
    model: Any,
    problems: Sequence[AdditionProblem],
    tokenizer: AdditionTokenizer,
    depths: Iterable[int] = range(1, 17),
    batch_size: int = 1024,
) -> dict[int, float]:
    """Exact-match accuracy per depth by teacher-forced argmax, one `forward_depths` pass per batch."""
    correct = teacher_forced_correct(model, problems, tokenizer, depths, batch_size)
    return {d: float(c.float().mean()) for d, c in correct.items()}


def _greedy(
    model: Any,
    problems: Sequence[AdditionProblem],
    tokenizer: AdditionTokenizer,
    depths: list[int],
    batch_size: int,
    shared_prefill: bool,
) -> dict[int, torch.Tensor]:
    import torch

    device = _device_of(model)
    result = {d: torch.zeros(len(problems), dtype=torch.bool) for d in depths}
    prompts = [tokenizer.encode_prompt(p.num1, p.num2) for p in problems]
    groups: dict[int, list[int]] = {}
    for i, pr in enumerate(prompts):
        groups.setdefault(len(pr), []).append(i)
    many = getattr(model, "generate_greedy_depths", None) if shared_prefill else None
    with _EvalMode(model):
        for members in groups.values():
            for start in range(0, len(members), batch_size):
                idx = members[start : start + batch_size]
                ids = torch.tensor([prompts[i] for i in idx], dtype=torch.long, device=device)
                targets = [tokenizer.encode_answer(problems[i].answer) for i in idx]
                kwargs = {
                    "max_new_tokens": max(len(t) for t in targets),
                    "attention_mask": torch.ones_like(ids),
                    "eos_token_id": tokenizer.eos_token_id,
                }
                if many is not None:
                    new = many(ids, depths, **kwargs)
                else:
                    new = {d: model.generate_greedy(ids, depth=d, **kwargs) for d in depths}
                for d in depths:
                    for row, i, t in zip(new[d].cpu().tolist(), idx, targets, strict=True):
                        result[d][i] = row[: len(t)] == t
    return result


def greedy_correct_depths(
    model: Any,
    problems: Sequence[AdditionProblem],
    tokenizer: AdditionTokenizer,
    depths: Iterable[int] = range(1, 17),
    batch_size: int = 1024,
) -> dict[int, torch.Tensor]:
    """Per depth, a bool tensor [len(problems)]: greedy decoding from `num1+num2=` yields exactly
    ` <reversed answer><EOS>`.

    Uses `model.generate_greedy_depths` (one prompt prefill shared by all depths) when the model has
    it, else one `generate_greedy` call per depth. Problems are batched by prompt length, so no prompt
    is ever padded (with fixed-width operands, as in the standard task, that is a single group).
    """
    return _greedy(model, problems, tokenizer, sorted({int(d) for d in depths}), batch_size, True)


def greedy_correct(
    model: Any,
    problems: Sequence[AdditionProblem],
    tokenizer: AdditionTokenizer,
    depth: int,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Bool tensor [len(problems)]: greedy decoding at `depth` solves the problem (as in
    `greedy_correct_depths`), always through `model.generate_greedy`."""
    return _greedy(model, problems, tokenizer, [int(depth)], batch_size, False)[int(depth)]


def score_greedy(
    model: Any,
    problems: Sequence[AdditionProblem],
    tokenizer: AdditionTokenizer,
    depth: int,
    batch_size: int = 1024,
) -> float:
    """Exact-match accuracy of greedy decoding at `depth` (whole answer including EOS)."""
    return float(greedy_correct(model, problems, tokenizer, depth, batch_size).float().mean())


def score_greedy_depths(
    model: Any,
    problems: Sequence[AdditionProblem],
    tokenizer: AdditionTokenizer,
    depths: Iterable[int] = range(1, 17),
    batch_size: int = 1024,
) -> dict[int, float]:
    """Exact-match accuracy of greedy decoding at each depth (shares the prompt prefill when it can)."""
    correct = greedy_correct_depths(model, problems, tokenizer, depths, batch_size)
    return {d: float(c.float().mean()) for d, c in correct.items()}


# ---- registration (stars.tasks.registry) ---------------------------------------------------------------
def build_training(spec: JobSpec) -> TrainingData:
    """The training data of a job whose `data.task` is addition, and the description saved with its
    checkpoints (enough to rebuild exactly the held-out test set: `held_out_problems`)."""
    data = spec.data
    task = build_addition_task(
        train_size=data.num_train, test_size=data.num_test, digits=data.digits, seed=data.seed,
        train_file=data.train_file, test_file=data.test_file,
    )
    tok = task.tokenizer
    description = {"task": "addition", "digits": data.digits, "num_test": data.num_test, "seed": data.seed,
                   "test_file": data.test_file}
    return TrainingData(task.train_data(), tok.vocab_size, tok.pad_token_id, tok.eos_token_id, None, description)


def held_out_problems(
    description: Mapping[str, Any], limit: int | None = None
) -> tuple[list[AdditionProblem], AdditionTokenizer]:
    """(test problems, tokenizer) of the addition task a checkpoint describes (its `stars_task.json`):
    exactly the test set training held out (same digits/seed/num_test or test file), first `limit`."""
    if description.get("task") != "addition":
        raise EvalInputError(
            f"task 'addition' needs an addition checkpoint (its stars_task.json says task="
            f"{description.get('task')!r}); addition uses its own 15-token vocabulary"
        )
    digits = int(description.get("digits", 4))
    tokenizer = AdditionTokenizer(digits)
    if description.get("test_file"):
        if not Path(description["test_file"]).is_file():
            raise EvalInputError(
                f"the checkpoint's addition test file {description['test_file']!r} does not exist here"
            )
        return read_jsonl(description["test_file"], limit=limit), tokenizer
    problems = generate_problems(int(description.get("num_test", 1000)), digits, seed=int(description.get("seed", 0)))
    return (problems[:limit] if limit else problems), tokenizer


def rho_sequences(problems: Sequence[AdditionProblem], tokenizer: AdditionTokenizer) -> list[list[int]]:
    """Whole sequences (prompt and answer) for the spectral-radius batch."""
    return [tokenizer.encode_example(p.num1, p.num2, p.answer) for p in problems]


register(TrainingTask("addition", build_training))
register(TeacherForcedTask("addition", trained_on="addition", load=held_out_problems,
                           correct=teacher_forced_correct, rho_sequences=rho_sequences))
