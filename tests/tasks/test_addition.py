"""Addition task: tokenizer, generator, jsonl I/O, training batches, and the two exact-match scorers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stars.tasks.addition import (
    IGNORE_INDEX,
    AdditionData,
    AdditionProblem,
    AdditionTokenizer,
    build_addition_task,
    generate_problems,
    greedy_correct,
    greedy_correct_depths,
    read_jsonl,
    remove_overlap,
    score_greedy,
    score_greedy_depths,
    score_teacher_forced,
    split_problems,
    teacher_forced_correct,
    write_jsonl,
)

# ------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_layout_matches_the_reference() -> None:
    tok = AdditionTokenizer()
    assert tok.vocab_size == 15
    assert len({tok.pad_token_id, tok.eos_token_id, tok.space_token_id}) == 3
    assert tok.encode_prompt(1750, 4733) == [1, 7, 5, 0, 10, 4, 7, 3, 3, 11]
    ids = tok.encode_example(1750, 4733)
    assert tok.decode(ids) == "1750+4733= 3846§"
    assert tok.decode(ids, skip_special_tokens=True) == "1750+4733= 3846"
    assert ids[-1] == tok.eos_token_id and max(ids) < tok.vocab_size


def test_answers_have_variable_length_and_fit_max_length() -> None:
    tok = AdditionTokenizer(4)
    five = tok.encode_example(9999, 9999)
    four = tok.encode_example(1000, 1000)
    assert tok.decode(five) == "9999+9999= 89991§"
    assert len(five) == tok.max_length == 17
    assert len(four) == 16
    assert AdditionTokenizer(7).max_length == 26


def test_tokenizer_rejects_bad_input() -> None:
    tok = AdditionTokenizer()
    with pytest.raises(ValueError, match="non-negative"):
        tok.encode_prompt(-1, 5)
    with pytest.raises(ValueError, match="outside the addition vocabulary"):
        tok.decode([15])
    with pytest.raises(ValueError, match="digits"):
        AdditionTokenizer(0)


# ------------------------------------------------------------------------------------------ problems


def test_generate_problems_is_seeded_distinct_and_in_range() -> None:
    a = generate_problems(500, digits=4, seed=3)
    assert a == generate_problems(500, digits=4, seed=3)
    assert a != generate_problems(500, digits=4, seed=4)
    assert len({p.key for p in a}) == 500
    assert all(1000 <= p.num1 <= 9999 and 1000 <= p.num2 <= 9999 and p.answer == p.num1 + p.num2 for p in a)
    assert {len(str(p.answer)) for p in a} == {4, 5}


def test_generate_problems_exclude_and_exhaustion() -> None:
    all_one_digit = generate_problems(81, digits=1, seed=0)  # every pair of 1..9
    assert len({p.key for p in all_one_digit}) == 81
    some = generate_problems(70, digits=1, seed=1, exclude={(1, 1), (2, 3)})
    assert not {(1, 1), (2, 3)} & {p.key for p in some}
    with pytest.raises(ValueError, match="only 79 exist"):
        generate_problems(80, digits=1, seed=0, exclude={(1, 1), (2, 3)})


def test_split_never_overlaps_and_test_set_ignores_train_size() -> None:
    train, test = split_problems(3000, 500, digits=2, seed=7)  # 8100 pairs: collisions would be likely
    assert len(train) == 3000 and len(test) == 500
    assert not {p.key for p in train} & {p.key for p in test}
    _, test_again = split_problems(10, 500, digits=2, seed=7)
    assert test_again == test


# --------------------------------------------------------------------------------------------- jsonl


def test_jsonl_round_trip_in_reference_format(tmp_path: Path) -> None:
    problems = generate_problems(20, seed=0)
    path = tmp_path / "sub" / "train.jsonl"
    write_jsonl(path, problems)
    first = json.loads(path.read_text().splitlines()[0])
    assert set(first) == {"num1", "num2", "sum", "expression", "answer"}
    assert first["expression"] == f"{first['num1']} + {first['num2']}"
    assert read_jsonl(path) == problems
    assert read_jsonl(path, limit=5) == problems[:5]


def test_read_jsonl_tolerates_extra_fields_and_reads_fixture(fixtures_dir: Path, tmp_path: Path) -> None:
    assert read_jsonl(fixtures_dir / "addition" / "test.jsonl")[0] == AdditionProblem(2718, 2818, 5536)
    path = tmp_path / "odd.jsonl"
    path.write_text('{"num1": "12", "num2": 30, "sum": 42, "note": "x"}\n\n{"num1": 1, "num2": 2, "answer": 3.0}\n')
    assert read_jsonl(path) == [AdditionProblem(12, 30, 42), AdditionProblem(1, 2, 3)]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"num2": 4733, "answer": 6483}', r"bad\.jsonl:2: missing field 'num1'"),
        ('{"num1": 1750, "num2": 4733}', r"bad\.jsonl:2: missing field 'answer'"),
        ('{"num1": 1750, "num2": 4733, "answer": 6484}', r"bad\.jsonl:2: answer 6484 != 1750 \+ 4733"),
        ('{"num1": "abc", "num2": 4733, "answer": 6483}', r"bad\.jsonl:2: field 'num1' must be an integer"),
        ("not json", r"bad\.jsonl:2: not valid JSON"),
    ],
)
def test_read_jsonl_errors_name_file_line_and_field(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"num1": 1, "num2": 2, "answer": 3}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_jsonl(path)


def test_build_task_from_files_drops_overlap(fixtures_dir: Path) -> None:
    task = build_addition_task(
        train_size=2,  # sizes are ignored when files are given: files are used whole
        test_size=1,
        train_file=fixtures_dir / "addition" / "train.jsonl",
        test_file=fixtures_dir / "addition" / "test.jsonl",
    )
    assert len(task.test) == 3
    assert task.dropped_overlap == 1  # 1750+4733 is in both files
    assert len(task.train) == 4
    assert not {p.key for p in task.train} & {p.key for p in task.test}


def test_build_task_generated_train_excludes_a_file_test_set(fixtures_dir: Path) -> None:
    task = build_addition_task(train_size=200, test_file=fixtures_dir / "addition" / "test.jsonl", seed=1)
    assert len(task.train) == 200 and len(task.test) == 3
    assert not {p.key for p in task.train} & {p.key for p in task.test}
    generated = build_addition_task(train_size=100, test_size=50, seed=1)
    assert remove_overlap(generated.train, generated.test) == generated.train
    assert build_addition_task(train_size=10, test_size=50, seed=1).test == generated.test


def test_build_task_rejects_operands_wider_than_digits(fixtures_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"test\.jsonl: problem 1 \(2718\+2818\).*digits=3"):
        build_addition_task(train_size=10, digits=3, test_file=fixtures_dir / "addition" / "test.jsonl")


# -------------------------------------------------------------------------------------- training data


def test_training_batch_labels_only_space_answer_and_eos() -> None:
    tok = AdditionTokenizer()
    problems = [AdditionProblem.of(1750, 4733), AdditionProblem.of(9999, 9999)]
    data = AdditionData(problems, tok)
    assert len(data) == 2
    b = data.batch([0, 1])
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (2, 17)
    assert b["input_ids"].dtype == torch.long
    ids, labels, mask = (b[k][0].tolist() for k in ("input_ids", "labels", "attention_mask"))
    assert tok.decode(ids) == "1750+4733= 3846§"  # PAD not shown
    assert ids[-1] == tok.pad_token_id and mask == [1] * 16 + [0]
    assert labels[:10] == [IGNORE_INDEX] * 10  # the prompt
    assert labels[10:16] == tok.encode_answer(6483) == ids[10:16]  # space, 3846, EOS
    assert labels[16] == IGNORE_INDEX  # padding
    assert tok.decode([t for t in b["labels"][1].tolist() if t != IGNORE_INDEX]) == " 89991§"
    # a batch is trimmed to its longest row
    assert data.batch([0])["input_ids"].shape == (1, 16)


# -------------------------------------------------------------------------------------------- scorers


class OracleLoopModel(torch.nn.Module):
    """A stand-in for LoopLM that solves addition except where `wrong(num1, depth)` says to miss the
    last answer digit. Lets the scorers be checked against known accuracies, independently of LoopLM."""

    def __init__(self, tok: AdditionTokenizer) -> None:
        super().__init__()
        self.tok = tok
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    @staticmethod
    def wrong(num1: int, depth: int) -> bool:
        return (num1 + depth) % 3 == 0

    def _next(self, prefix: list[int], depth: int) -> int:
        eq = 11  # the '=' token
        if eq not in prefix:
            return self.tok.pad_token_id
        cut = prefix.index(eq)
        a, b = (int(x) for x in self.tok.decode(prefix[:cut]).split("+"))
        target = self.tok.encode_answer(a + b)
        if self.wrong(a, depth):
            target[-2] = (target[-2] + 1) % 10
        done = prefix[cut + 1 :]
        return target[len(done)] if len(done) < len(target) else self.tok.pad_token_id

    def _logits(self, ids: torch.Tensor, depth: int) -> torch.Tensor:
        B, T = ids.shape
        out = torch.zeros(B, T, self.tok.vocab_size)
        for i in range(B):
            row = [int(x) for x in ids[i] if int(x) != self.tok.pad_token_id]
            for t in range(len(row)):
                out[i, t, self._next(row[: t + 1], depth)] = 1.0
        return out

    def forward_depths(self, input_ids, depths, attention_mask=None):
        depths = sorted(set(depths))
        return type("R", (), {"depths": depths, "logits": [self._logits(input_ids, d) for d in depths]})

    def generate_greedy(self, input_ids, depth, max_new_tokens, attention_mask=None, eos_token_id=None):
        rows = []
        for r in input_ids.tolist():
            seq, new = list(r), []
            for _ in range(max_new_tokens):
                nxt = self.tok.pad_token_id if new and new[-1] in (eos_token_id, self.tok.pad_token_id) else self._next(seq, depth)
                new.append(nxt)
                seq.append(nxt)
            rows.append(new)
        return torch.tensor(rows)


def test_scorers_match_known_accuracy_on_an_oracle() -> None:
    tok = AdditionTokenizer()
    problems = generate_problems(30, seed=5) + generate_problems(6, digits=1, seed=5)  # mixed prompt lengths
    model = OracleLoopModel(tok)
    model.train()
    depths = [1, 2, 3]
    tf = score_teacher_forced(model, problems, tok, depths, batch_size=7)
    for d in depths:
        expected = sum(not model.wrong(p.num1, d) for p in problems) / len(problems)
        assert 0 < expected < 1
        assert tf[d] == pytest.approx(expected)
        assert score_greedy(model, problems, tok, d, batch_size=5) == pytest.approx(expected)
    assert score_greedy_depths(model, problems, tok, depths) == tf
    assert model.training, "scorers must restore the model's training mode"


def test_greedy_requires_eos() -> None:
    """An answer with the right digits but no EOS is wrong under both scorers."""
    tok = AdditionTokenizer()

    class NoEos(OracleLoopModel):
        def _next(self, prefix, depth):
            nxt = super()._next(prefix, depth)
            return tok.space_token_id if nxt == tok.eos_token_id else nxt

    problems = generate_problems(10, seed=0)
    model = NoEos(tok)
    assert score_greedy(model, problems, tok, depth=5) == 0.0
    assert score_teacher_forced(model, problems, tok, [5]) == {5: 0.0}


def _tiny_looplm(tok: AdditionTokenizer, seed: int):
    from stars.model import LoopLM, LoopLMConfig

    torch.manual_seed(seed)
    cfg = LoopLMConfig(
        vocab_size=tok.vocab_size,
        d_model=32,
        n_heads=2,
        n_block=1,
        positions="learned",
        max_position_embeddings=32,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return LoopLM(cfg)


def _assert_scorers_agree(model, problems, tok) -> dict[int, float]:
    depths = range(1, 17)
    tf = teacher_forced_correct(model, problems, tok, depths, batch_size=40)
    greedy = greedy_correct_depths(model, problems, tok, depths, batch_size=40)
    for d in depths:
        assert torch.equal(tf[d], greedy[d]), f"depth {d}: teacher-forced and greedy disagree"
    for d in (1, 4, 16):  # the single-depth path through generate_greedy agrees too
        assert torch.equal(greedy_correct(model, problems, tok, d), tf[d])
    return {d: float(c.float().mean()) for d, c in tf.items()}


def test_scorers_agree_on_a_random_looplm() -> None:
    tok = AdditionTokenizer()
    problems = generate_problems(40, seed=2) + generate_problems(8, digits=1, seed=2)
    acc = _assert_scorers_agree(_tiny_looplm(tok, seed=0), problems, tok)
    assert set(acc) == set(range(1, 17))


def test_scorers_agree_on_a_briefly_trained_looplm() -> None:
    """Memorise small problems at depth 4 so accuracy varies across depths 1..16, then compare the
    scorers problem by problem (a random model gets ~0 everywhere, which would agree trivially)."""
    tok = AdditionTokenizer(2)
    problems = generate_problems(48, digits=2, seed=0) + generate_problems(16, digits=1, seed=0)
    model = _tiny_looplm(tok, seed=0)
    data = AdditionData(problems, tok)
    batch = data.batch(range(len(data)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(130):
        loss = model(**batch, depth=4).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    acc = _assert_scorers_agree(model, problems, tok)
    assert acc[4] >= 0.5, acc  # it learned something ...
    assert min(acc.values()) < acc[4], acc  # ... and other depths differ, so agreement is not trivial
