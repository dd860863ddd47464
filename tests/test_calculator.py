"""The calculator tool (parsing and computing calls, no eval) and the chat loop that runs it, with scripted replies.

The loop on a real model is tested in test_demo.py, on the demo base.
"""

from __future__ import annotations

import json

import pytest

from jaxtok import calculator, chat
from jaxtok.calculator import Call
from jaxtok.demo import demo_data_path
from jaxtok.errors import JaxtokError

# ---------------------------------------------------------------------------------------------------- the tool


@pytest.mark.parametrize("text, call", [
    ("<|calc|>23 + 19<|/calc|>", Call(23, "+", 19)),
    ("<|calc|>128 - 44<|/calc|>", Call(128, "-", 44)),
    ("<|calc|>7*9<|/calc|>", Call(7, "*", 9)),
    ("<|calc|> 84 / 4 <|/calc|>", Call(84, "/", 4)),
    ("<|calc|>-5 - -3<|/calc|>", Call(-5, "-", -3)),
    ("Let me check. <|calc|>2 + 2<|/calc|> and <|calc|>3 + 3<|/calc|>", Call(2, "+", 2)),  # the first call
])
def test_parse_good_calls(text, call):
    assert calculator.parse_call(text) == call


@pytest.mark.parametrize("call, result", [
    (Call(23, "+", 19), "42"), (Call(128, "-", 44), "84"), (Call(19, "-", 23), "-4"), (Call(7, "*", 9), "63"),
    (Call(84, "/", 4), "21"), (Call(5, "/", 2), "2.5"), (Call(1, "/", 3), "0.333333"), (Call(-6, "/", 3), "-2"),
    (Call(5, "/", 0), "error: division by zero"), (Call(2, "^", 3), "error: unsupported operation '^'"),
])
def test_compute(call, result):
    assert calculator.compute(call) == result


@pytest.mark.parametrize("reply, tool", [
    ("<|calc|>23 + 19<|/calc|>", "42"),
    ("The answer is 42.", None),  # no call: the reply is final
    ("<|calc|>23 + 19", None),  # never closed: not a call
    ("23 + 19<|/calc|>", None),
    ("<|calc|>5 / 0<|/calc|>", "error: division by zero"),
])
def test_tool_reply(reply, tool):
    assert calculator.tool_reply(reply) == tool


@pytest.mark.parametrize("inside", [
    "23 plus 19", "23 + 19 + 1", "", "23 +", "2 ** 8", "__import__('os').system('true')", "1.5 + 2", "23 ^ 19",
    "9" * (calculator.MAX_DIGITS + 1) + " * 9",
])
def test_malformed_calls_get_an_error_reply_not_an_exception(inside):
    reply = f"{calculator.CALC_OPEN}{inside}{calculator.CALC_CLOSE}"
    assert calculator.parse_call(reply) is None
    assert calculator.tool_reply(reply).startswith("error: cannot read")


@pytest.mark.parametrize("text, number", [
    ("The answer is 42.", "42"), ("It is -4.", "-4"), ("07 apples", "7"), ("about 2.50 now", "2.5"),
    ("3 then 5", "5"), ("no number", None), ("", None),
])
def test_last_number(text, number):
    assert calculator.last_number(text) == number


# ---------------------------------------------------------------------------------------------------- the loop


class ScriptedChat:
    """Stands in for `chat.Chat`: replies from a function of the conversation, and records every batch it gets."""

    def __init__(self, answer):
        self.answer, self.batches = answer, []

    def reply(self, conversations):
        self.batches.append([list(c) for c in conversations])
        return [self.answer(c) for c in conversations]


def calls_then_copies(conversation):
    """A perfect tool user: calls the calculator with the question's expression, then repeats the tool's result."""
    last = conversation[-1]
    if last["role"] == "tool":
        return f"The answer is {last['content']}."
    return f"<|calc|>{last['content'].removeprefix('What is ').rstrip('?')}<|/calc|>"


def user(text):
    return [{"role": "user", "content": text}]


def test_loop_feeds_the_result_back_as_a_tool_turn():
    scripted = ScriptedChat(calls_then_copies)
    added = chat.converse(scripted, [user("What is 23 + 19?"), user("What is 7 * 9?")])
    assert added[0] == [{"role": "assistant", "content": "<|calc|>23 + 19<|/calc|>"},
                        {"role": "tool", "content": "42"},
                        {"role": "assistant", "content": "The answer is 42."}]
    assert added[1][1:] == [{"role": "tool", "content": "63"}, {"role": "assistant", "content": "The answer is 63."}]
    # two batched rounds; the second sees each conversation with the call and its result, exactly
    assert len(scripted.batches) == 2
    assert scripted.batches[1][0] == user("What is 23 + 19?") + added[0][:2]


def test_loop_stops_without_a_call_and_after_max_rounds():
    always_calls = ScriptedChat(lambda c: "<|calc|>1 + 1<|/calc|>")
    added = chat.converse(always_calls, [user("Q")])[0]
    assert [m["role"] for m in added] == ["assistant", "tool"] * chat.MAX_ROUNDS
    answers = ScriptedChat(lambda c: "It is 4.")
    assert chat.converse(answers, [user("Q"), user("R")]) == [[{"role": "assistant", "content": "It is 4."}]] * 2
    assert len(answers.batches) == 1
    # only the conversations that called go on to the second round
    mixed = ScriptedChat(lambda c: "<|calc|>2 * 3<|/calc|>" if c[-1]["content"] == "call" else "No.")
    chat.converse(mixed, [user("call"), user("no call")])
    assert [len(batch) for batch in mixed.batches] == [2, 1]


def test_loop_without_the_calculator_is_one_reply():
    scripted = ScriptedChat(calls_then_copies)
    assert chat.converse(scripted, [user("What is 2 + 2?")], calculator_tool=False) == [
        [{"role": "assistant", "content": "<|calc|>2 + 2<|/calc|>"}]]


def test_score_counts_answers_that_end_in_the_expected_number():
    questions = [chat.Question(user("What is 23 + 19?"), "42"), chat.Question(user("What is 7 * 9?"), "63"),
                 chat.Question(user("What is 5 / 0?"), "0")]
    result = chat.score(ScriptedChat(calls_then_copies), questions, calculator_tool=True)
    assert [q["right"] for q in result["questions"]] == [True, True, False]
    assert [q["call_right"] for q in result["questions"]] == [True, True, False]
    assert (result["right"], result["calls_right"], result["total"]) == (2, 2, 3)
    assert result["questions"][2]["added"][1] == {"role": "tool", "content": "error: division by zero"}
    # without the tool the scripted model ends on a call: wrong, whatever number it holds
    result = chat.score(ScriptedChat(calls_then_copies), questions[:1], calculator_tool=False)
    assert result["right"] == 0


def test_a_lucky_answer_after_a_wrong_call_is_right_but_its_call_is_not():
    question = chat.Question(user("Subtract 19 from 91."), "72")
    added = [{"role": "assistant", "content": "<|calc|>19 - 91<|/calc|>"}, {"role": "tool", "content": "-72"},
             {"role": "assistant", "content": "The answer is 72."}]
    assert chat.is_right(question, added) and not chat.call_is_right(question, added)
    assert not chat.call_is_right(question, [{"role": "assistant", "content": "The answer is 72."}])


def test_is_right_needs_a_final_reply():
    question = chat.Question(user("Q"), "42")
    assert chat.is_right(question, [{"role": "assistant", "content": "So it is 42."}])
    assert not chat.is_right(question, [{"role": "assistant", "content": "42 or 41"}])
    assert not chat.is_right(question, [])
    assert not chat.is_right(question, [{"role": "assistant", "content": "<|calc|>40 + 2<|/calc|> 42"}])


def test_show():
    assert chat.show([{"role": "assistant", "content": "<|calc|>1 + 2<|/calc|>"}, {"role": "tool", "content": "3"}]) \
        == "assistant '<|calc|>1 + 2<|/calc|>' -> tool '3'"


# ---------------------------------------------------------------------------------------------------- held-out rows


def test_load_questions_from_the_demo_eval_rows():
    path = str(demo_data_path("chat_eval.jsonl"))
    questions = chat.load_questions(path, 10)
    rows = [json.loads(line) for line in open(path)][:10]
    assert len(questions) == 10
    for question, row in zip(questions, rows):
        assert question.prompt[-1]["role"] == "user" and question.prompt == row["messages"][: len(question.prompt)]
        tool = next(m["content"] for m in row["messages"] if m["role"] == "tool")
        assert question.expected == tool
    assert len(chat.load_questions(path, 1000)) == len(open(path).readlines())


def test_load_questions_rejects_rows_it_cannot_check(tmp_path):
    bad = {
        "text.jsonl": {"text": "hello"},
        "no_assistant.jsonl": {"messages": [{"role": "user", "content": "Hi"}]},
        "no_number.jsonl": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi!"}]},
        "assistant_first.jsonl": {"messages": [{"role": "assistant", "content": "1"}]},
    }
    for name, row in bad.items():
        (tmp_path / name).write_text(json.dumps(row) + "\n")
        with pytest.raises(JaxtokError):
            chat.load_questions(str(tmp_path / name), 10)
