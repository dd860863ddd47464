"""Greedy chat with the calculator tool, for a batch of conversations at once, and the held-out score built on it.

The loop is the one tool-using chat models run: the assistant's reply is generated up to the end-of-turn token; if
it calls the calculator (`<|calc|>23 + 19<|/calc|>`), the call is computed here and the result comes back as a
`tool` message, and the assistant replies again, now seeing the result. So the model has to pick the operands and
the operation; it never has to do the arithmetic. Every round is one batched `generate` call over the
conversations still going, so ten questions cost two calls, not twenty.

Conversations are rendered with the chat template and tokenized as the training data are (`data.render_chat`, no
added special tokens: the template writes BOS), so the model sees the layout it was trained on.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional, Sequence

from jaxtok import calculator
from jaxtok.data import load_rows, read_messages, render_chat
from jaxtok.errors import JaxtokError
from jaxtok.generate import generate
from jaxtok.model import Llama

MAX_ROUNDS = 2  # one call, then the answer that uses its result; a second call is not run


@dataclasses.dataclass
class Chat:
    """Renders conversations, and generates the assistant's next turn, for one model and tokenizer."""

    model: Llama
    variables: dict
    tokenizer: Any
    chat_template: Optional[str]
    max_new_tokens: int
    stop_id: int  # the template's end-of-turn token

    def reply(self, conversations: Sequence[list[dict]]) -> list[str]:
        """The assistant's next message for each conversation, as text with special tokens kept, without the
        end-of-turn token; one batched (left-padded) generate call."""
        prompts = [
            self.tokenizer(render_chat(self.tokenizer, c, self.chat_template, add_generation_prompt=True),
                           add_special_tokens=False)["input_ids"]
            for c in conversations
        ]
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        outputs = generate(self.model, self.variables, prompts, self.max_new_tokens, eos_id=self.stop_id,
                           pad_id=pad_id)
        return [self.tokenizer.decode([t for t in out if t != self.stop_id], skip_special_tokens=False).strip()
                for out in outputs]


def converse(chat: Chat, conversations: Sequence[list[dict]], calculator_tool: bool = True) -> list[list[dict]]:
    """The messages the assistant (and, with `calculator_tool`, the calculator) add to each conversation.

    A reply that calls the calculator gets a `tool` message with the result and another reply; a reply without a
    call ends its conversation. At most MAX_ROUNDS replies per conversation.
    """
    added: list[list[dict]] = [[] for _ in conversations]
    going = list(range(len(conversations)))
    for _ in range(MAX_ROUNDS):
        if not going:
            break
        replies = chat.reply([list(conversations[i]) + added[i] for i in going])
        still = []
        for i, text in zip(going, replies):
            added[i].append({"role": "assistant", "content": text})
            result = calculator.tool_reply(text) if calculator_tool else None
            if result is not None:
                added[i].append({"role": "tool", "content": result})
                still.append(i)
        going = still
    return added


def show(messages: Sequence[dict]) -> str:
    """`role 'content' -> role 'content' ...`, the one-line form of a transcript for the log."""
    return " -> ".join(f"{m['role']} {m['content']!r}" for m in messages)


@dataclasses.dataclass
class Question:
    """A held-out question: the conversation up to the first assistant turn, and the number the answer must end in."""

    prompt: list[dict]
    expected: str


def load_questions(source: str, count: int) -> list[Question]:
    """The first `count` rows of a `messages` file, each split into its prompt (the messages before the first
    assistant turn) and the last number of its last assistant turn."""
    rows = load_rows(source)
    if "messages" not in rows.column_names:
        raise JaxtokError(f"held-out file {source} needs a \"messages\" column, like the training chats")
    questions = []
    for i in range(min(count, len(rows))):
        try:
            messages = read_messages(rows[i]["messages"])
        except JaxtokError as e:
            raise JaxtokError(f"row {i} of {source}: {e}") from None
        roles = [m["role"] for m in messages]
        if "assistant" not in roles or roles.index("assistant") == 0:
            raise JaxtokError(f"row {i} of {source} needs a user turn before an assistant turn")
        last = [m for m in messages if m["role"] == "assistant"][-1]["content"]
        expected = calculator.last_number(last)
        if expected is None:
            raise JaxtokError(f"row {i} of {source}: its last assistant turn has no number to check against")
        questions.append(Question(messages[: roles.index("assistant")], expected))
    return questions


def is_right(question: Question, added: Sequence[dict]) -> bool:
    """Whether the last assistant message ends in the expected number (a reply still calling the calculator, or
    none at all, is wrong)."""
    replies = [m["content"] for m in added if m["role"] == "assistant"]
    if not replies or calculator.find_call(replies[-1]) is not None:
        return False
    return calculator.last_number(replies[-1]) == question.expected


def call_is_right(question: Question, added: Sequence[dict]) -> bool:
    """Whether the first tool result is the expected number: the call had the right operands and operation (an
    answer can be right by luck, e.g. "19 - 91" -> "-72" answered as "72")."""
    tools = [m["content"] for m in added if m["role"] == "tool"]
    return bool(tools) and calculator.last_number(tools[0]) == question.expected


def score(chat: Chat, questions: Sequence[Question], calculator_tool: bool) -> dict:
    """{"right": N, "calls_right": C, "total": M, "questions": [{"prompt", "added", "expected", "right",
    "call_right"}, ...]}."""
    transcripts = converse(chat, [q.prompt for q in questions], calculator_tool)
    results = [{"prompt": q.prompt, "added": added, "expected": q.expected, "right": is_right(q, added),
                "call_right": call_is_right(q, added)} for q, added in zip(questions, transcripts)]
    return {"right": sum(r["right"] for r in results), "calls_right": sum(r["call_right"] for r in results),
            "total": len(results), "questions": results}


def write_score(path: Path, result: dict) -> None:
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
