"""Generates the demo data shipped in jaxtok/demo_data/, deterministically (same bytes on every run).

    python scripts/make_demo_data.py [--out DIR]

Writes
* pretrain.txt: plain English for pretraining the tiny demo base model (questions and word problems, each followed by
  the expression it asks for with the question's numbers, arithmetic in words and digits, everyday facts, filler),
  documents separated by blank lines, no special tokens;
* chat_train.jsonl, chat_eval.jsonl: {"messages": [...]} rows in which the assistant calls a calculator with the new
  tokens (`<|calc|>23 + 19<|/calc|>`), a `tool` message brings the result, and the assistant answers with it; eval
  problems never occur in the training rows or in pretrain.txt, and cover every operation and question form;
* README.md describing the files.

Only the standard library is used, and one seeded `random.Random`, so the output depends on nothing but this file.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20240607
OUT = Path(__file__).resolve().parents[1] / "jaxtok" / "demo_data"
PRETRAIN_BYTES = 350_000  # enough text for a tiny model to learn the language and the copying of the task
TRAIN_ROWS, EVAL_ROWS = 2000, 100
CALC_OPEN, CALC_CLOSE = "<|calc|>", "<|/calc|>"

ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()

NAMES = ("Anna Ben Carla David Emma Felix Grace Hugo Iris Jack Kira Leo Maya Noah Olga Paul Rosa Sam Tina Umar "
         "Vera Will Yara Zoe").split()
THINGS = ("apples marbles books pencils stickers cookies coins stamps shells cards eggs balloons flowers "
          "crayons buttons oranges").split()
GAIN = ("buys {b} more {t}", "finds {b} more {t}", "is given {b} more {t}", "picks up {b} more {t}")
LOSE = ("gives {b} {t} to a friend", "loses {b} {t}", "sells {b} {t}", "uses {b} {t}")

FACTS = (
    "A week has seven days.", "A year has twelve months.", "A day has twenty-four hours.",
    "An hour has sixty minutes.", "A minute has sixty seconds.", "A dog has four legs.", "A bird has two wings.",
    "A spider has eight legs.", "An insect has six legs.", "A triangle has three sides.", "A square has four sides.",
    "A hexagon has six sides.", "A dozen is twelve.", "A pair is two.", "A century is one hundred years.",
    "Water freezes at zero degrees Celsius.", "Water boils at one hundred degrees Celsius.",
    "The sun rises in the east and sets in the west.", "The moon goes around the earth.",
    "The earth goes around the sun.", "Plants need water and light to grow.", "Fish live in water.",
    "Cows give milk.", "Bees make honey.", "Snow is cold and white.", "The sky is blue on a clear day.",
    "Grass is green.", "Ice is frozen water.", "Rain falls from clouds.", "Most people sleep at night.",
    "Breakfast is the first meal of the day.", "A clock shows the time.", "A map shows where places are.",
    "A library lends books.", "A baker makes bread.", "A doctor helps sick people.", "A farmer grows food.",
    "A teacher helps children learn.", "Trains run on rails.", "Boats float on water.", "Planes fly in the sky.",
    "Summer is warm and winter is cold.", "Leaves fall from trees in autumn.", "Flowers bloom in spring.",
    "Keys open locks.", "Shoes protect our feet.", "Hands have five fingers each.", "People have two eyes.",
    "A calculator adds and subtracts numbers quickly.", "Counting on your fingers works for small numbers.",
    "Adding zero to a number does not change it.", "The order of two numbers does not change their sum.",
    "Subtracting a number from itself gives zero.", "Even numbers end in zero, two, four, six or eight.",
    "Ten tens make one hundred.", "A helpful assistant answers the user's questions.",
    "The user asked a question, and the assistant gave a short answer.",
    "The computer system was ready, so the user typed a question.",
    "A good assistant checks the numbers with a calculator before answering.",
)
PLACES = "park market library school beach garden station museum kitchen river".split()
TIMES = "morning afternoon evening".split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
ACTIVITIES = ("read a book", "ride a bike", "bake bread", "paint pictures", "play chess", "go swimming",
              "walk the dog", "plant seeds", "sing songs", "write letters")
WEATHER = ("sunny", "rainy", "cloudy", "windy", "cold", "warm")
SYSTEMS = (
    "You are a helpful assistant.",
    "You are a helpful assistant. Use the calculator for arithmetic.",
    "Answer arithmetic questions with the calculator, then give the answer.",
)


def words(n: int) -> str:
    """English words for 0 <= n < 1000, e.g. 142 -> "one hundred forty-two"."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    rest = n % 100
    return ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + words(rest))


def all_problems() -> list[tuple[str, int, int]]:
    """Every (op, a, b) the demo uses: sums and differences of numbers below 100, products of 2..12."""
    problems = [("+", a, b) for a in range(100) for b in range(100)]
    problems += [("-", a + b, b) for a in range(100) for b in range(100)]
    problems += [("*", a, b) for a in range(2, 13) for b in range(2, 13)]
    return problems


OP_WEIGHTS = {"+": 0.45, "-": 0.4, "*": 0.15}  # products are few (121) but should not be rare in the text


class Picker:
    """Draws problems: an operation by OP_WEIGHTS, then a problem of that operation uniformly."""

    def __init__(self, problems):
        self.by_op = {op: [p for p in problems if p[0] == op] for op in OP_WEIGHTS}

    def __call__(self, rng: random.Random):
        op = rng.choices(list(OP_WEIGHTS), weights=list(OP_WEIGHTS.values()))[0]
        return rng.choice(self.by_op[op])


def answer(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


OP_WORDS = {"+": "plus", "-": "minus", "*": "times"}


def sentence(rng: random.Random, problem) -> str:
    """One arithmetic statement about `problem`, in words or digits."""
    op, a, b = problem
    c = answer(op, a, b)
    forms = (
        f"{words(a).capitalize()} {OP_WORDS[op]} {words(b)} is {words(c)}.",
        f"{a} {op} {b} = {c}.",
        f"{a} {OP_WORDS[op]} {b} equals {c}.",
        f"What is {a} {op} {b}? The answer is {c}.",
        f"What is {words(a)} {OP_WORDS[op]} {words(b)}? The answer is {words(c)}.",
        f"Question: What is {a} {OP_WORDS[op]} {b}?\nAnswer: {c}.",
        f"If you compute {a} {op} {b}, you get {c}.",
        f"Please work out {a} {op} {b}. The result is {c}.",
        # The question restated as an expression: the copying a calculator call needs.
        f"What is {a} {OP_WORDS[op]} {b}? {a} {op} {b} = {c}.",
        f"What is {words(a)} {OP_WORDS[op]} {words(b)}? In digits, {a} {op} {b} = {c}.",
    )
    return rng.choice(forms)


def story(rng: random.Random, problem) -> str:
    """`problem` told as a small story with a question."""
    op, a, b = problem
    name, things = rng.choice(NAMES), rng.choice(THINGS)
    if op == "+":
        return f"{name} has {a} {things} and {rng.choice(GAIN).format(b=b, t=things)}. How many {things} does " \
               f"{name} have now?"
    if op == "-":
        return f"{name} has {a} {things} and {rng.choice(LOSE).format(b=b, t=things)}. How many {things} are left?"
    return f"There are {a} boxes with {b} {things} in each box. How many {things} are there?"


# How a user asks: each kind of question needs the operands copied and the operation named. (Numbers spelt out in
# words stay in the pretraining text only: reading them is a skill of its own, beyond this tiny model's budget.)
# Stories and commands twice: their operands are not simply the first and second number ("Subtract 19 from 91.").
KINDS = ("story", "story", "symbols", "op_word", "calculate", "work_out", "command", "command")
# The eval rows cycle through the kinds (and through EVAL_OPS), so any first rows of chat_eval.jsonl mix them all.
EVAL_KINDS = ("story", "op_word", "command", "symbols", "story", "calculate", "work_out")
EVAL_OPS = "+-*+-+-*+-"


def question(rng: random.Random, problem, kind: str | None = None) -> str:
    """A user's question about `problem`, of `kind` (default: one of KINDS at random)."""
    op, a, b = problem
    kind = kind or rng.choice(KINDS)
    if kind == "story":
        return story(rng, problem)
    if kind == "symbols":
        return f"What is {a} {op} {b}?"
    if kind == "op_word":
        return f"What is {a} {OP_WORDS[op]} {b}?"
    if kind == "calculate":
        return f"Calculate {a} {op} {b}."
    if kind == "work_out":
        return f"Please work out {a} {OP_WORDS[op]} {b} for me."
    return {"+": f"Add {a} and {b}.", "-": f"Subtract {b} from {a}.", "*": f"Multiply {a} by {b}."}[op]


# Layouts of a question and its worked answer. Text of varying length between the two (as a chat's turn headers
# will be) makes the base find the numbers by what they are, not by how far back they stand.
LAYOUTS = (
    "{q}\n{e} = {c}. The answer is {c}.",
    "Question: {q}\nAnswer: {e} = {c}. The answer is {c}.",
    "User: {q}\nAssistant: {e} = {c}. The answer is {c}.",
    "{q}\nLet me work it out.\n{e} = {c}. So the answer is {c}.",
    "{q} To find out, compute {e} = {c}. The answer is {c}.",
)


def restated(rng: random.Random, problem) -> str:
    """A question followed by the expression it asks for, with its numbers: the skill a calculator call needs."""
    op, a, b = problem
    return rng.choice(LAYOUTS).format(q=question(rng, problem), e=f"{a} {op} {b}", c=answer(op, a, b))


def filler(rng: random.Random) -> str:
    """An everyday sentence that is not arithmetic."""
    name = rng.choice(NAMES)
    forms = (
        lambda: rng.choice(FACTS),
        lambda: f"{name} went to the {rng.choice(PLACES)} in the {rng.choice(TIMES)}.",
        lambda: f"On {rng.choice(DAYS)}, {name} likes to {rng.choice(ACTIVITIES)}.",
        lambda: f"It was {rng.choice(WEATHER)} on {rng.choice(DAYS)}, so {name} stayed near the "
                f"{rng.choice(PLACES)}.",
        lambda: f"{name} and {rng.choice(NAMES)} met at the {rng.choice(PLACES)} to {rng.choice(ACTIVITIES)}.",
    )
    return rng.choice(forms)()


# Mostly questions restated as expressions: the base must learn to copy a question's numbers within its budget.
DOCUMENT_KINDS = ("restated",) * 9 + ("math", "facts", "mix")


def document(rng: random.Random, pick: Picker) -> str:
    """One pretraining document: questions with their expressions, a paragraph of arithmetic, of facts, or a mix."""
    kind = rng.choice(DOCUMENT_KINDS)
    n = rng.randint(3, 8)
    if kind == "restated":
        return "\n".join(restated(rng, pick(rng)) for _ in range(rng.randint(2, 4)))
    if kind == "math":
        return " ".join(sentence(rng, pick(rng)) for _ in range(n))
    if kind == "facts":
        return " ".join(filler(rng) for _ in range(n))
    parts = [sentence(rng, pick(rng)) if rng.random() < 0.5 else filler(rng) for _ in range(n)]
    return " ".join(parts)


def pretrain_text(rng: random.Random, pick: Picker) -> str:
    docs, size = [], 0
    while size < PRETRAIN_BYTES:
        docs.append(document(rng, pick))
        size += len(docs[-1]) + 2
    return "\n\n".join(docs) + "\n"


def chat_row(rng: random.Random, problem, kind: str | None = None) -> dict:
    """A tool-use chat: the user asks, the assistant calls the calculator, the tool answers, the assistant answers."""
    op, a, b = problem
    c = answer(op, a, b)
    messages = [
        {"role": "user", "content": question(rng, problem, kind)},
        {"role": "assistant", "content": f"{CALC_OPEN}{a} {op} {b}{CALC_CLOSE}"},
        {"role": "tool", "content": str(c)},
        {"role": "assistant", "content": f"The answer is {c}."},
    ]
    if rng.random() < 0.5:
        messages.insert(0, {"role": "system", "content": rng.choice(SYSTEMS)})
    return {"messages": messages}


def split_problems(rng: random.Random) -> tuple[list, list]:
    """(eval problems in the order of EVAL_OPS, the others): every operation is held out, not only the common ones."""
    problems = all_problems()
    rng.shuffle(problems)
    by_op = {op: [p for p in problems if p[0] == op] for op in OP_WEIGHTS}
    evaluation = [by_op[EVAL_OPS[i % len(EVAL_OPS)]].pop() for i in range(EVAL_ROWS)]
    held = set(evaluation)
    return evaluation, [p for p in problems if p not in held]


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


README = r"""# Demo data

Generated by `python scripts/make_demo_data.py` (deterministic: seed {seed}, standard library only; rerun it after
editing the script, and the demo base model rebuilds because its cache key hashes `pretrain.txt`).

| file | what it is |
| --- | --- |
| `pretrain.txt` | plain English ({pretrain_kb} KB) that `jaxtok.demo.ensure_demo_base` pretrains the tiny demo base model and its tokenizer on: mostly questions and small word problems, each followed (in one of a few layouts) by the expression it asks for, with its numbers, and the answer ("Grace has 29 coins and finds 28 more coins. How many coins does Grace have now?" then "29 + 28 = 57. The answer is 57."), arithmetic in words and digits ("Seventeen plus twenty-five is forty-two.", "17 + 25 = 42"), everyday facts and filler. Documents are separated by blank lines. No special tokens. |
| `chat_train.jsonl` | {train} rows `{{"messages": [...]}}` for fine-tuning: system (optional), user, assistant calling the calculator with the new tokens (`<\|calc\|>29 + 28<\|/calc\|>`), tool (the result, `57`), assistant (`The answer is 57.`). |
| `chat_eval.jsonl` | {eval} rows like the training rows, about problems (operation and numbers) that occur neither in `chat_train.jsonl` nor in `pretrain.txt`. The rows cycle through the operations and the kinds of question (word problems, questions, commands; numbers in digits), so its first rows (the demo's held-out questions, `sample.heldout`) mix them all. |

The base model never sees `<|calc|>`, `<|/calc|>` or the chat-template tokens `<|start_header_id|>`,
`<|end_header_id|>`, `<|eot_id|>`: fine-tuning adds them (`jaxtok.demo.DEMO_TOKENS`) and trains their rows. The
rows are rendered with `jaxtok.demo.DEMO_CHAT_TEMPLATE`, a Llama 3 style chat template.
"""


def generate() -> dict[str, str]:
    """File name -> content of every demo data file."""
    rng = random.Random(SEED)
    eval_problems, seen = split_problems(rng)
    pick = Picker(seen)
    pretrain = pretrain_text(rng, pick)
    train = [chat_row(rng, pick(rng)) for _ in range(TRAIN_ROWS)]
    evaluation = [chat_row(rng, p, EVAL_KINDS[i % len(EVAL_KINDS)]) for i, p in enumerate(eval_problems)]
    readme = README.format(seed=SEED, pretrain_kb=len(pretrain.encode()) // 1000, train=TRAIN_ROWS, eval=EVAL_ROWS)
    return {"pretrain.txt": pretrain, "chat_train.jsonl": jsonl(train), "chat_eval.jsonl": jsonl(evaluation),
            "README.md": readme}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT, help=f"output directory (default: {OUT})")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, content in generate().items():
        # newline="\n": the same bytes on every platform, since the demo model's cache key hashes them.
        with open(args.out / name, "w", encoding="utf-8", newline="\n") as f:
            f.write(content)
        print(f"wrote {args.out / name} ({len(content.encode()):,} bytes)")


if __name__ == "__main__":
    main()
