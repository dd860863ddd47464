"""The demo's calculator tool: find a call `<|calc|>A op B<|/calc|>` in a model's reply and compute it.

A call holds two integers and one of + - * /. It is matched with a regular expression and computed here, never with
`eval`, so whatever a model writes between the tokens cannot run code. A call the calculator cannot compute (division
by zero) gets an error message as its result, as a real tool would reply, rather than an exception.
"""

from __future__ import annotations

import dataclasses
import re
from fractions import Fraction
from typing import Optional

CALC_OPEN, CALC_CLOSE = "<|calc|>", "<|/calc|>"
OPERATIONS = "+-*/"
MAX_DIGITS = 30  # longer operands are not a calculator question; keeps results printable in a chat turn

_CALL = re.compile(rf"{re.escape(CALC_OPEN)}(.*?){re.escape(CALC_CLOSE)}", re.DOTALL)
_EXPRESSION = re.compile(rf"\s*(-?\d{{1,{MAX_DIGITS}}})\s*([-+*/])\s*(-?\d{{1,{MAX_DIGITS}}})\s*")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclasses.dataclass(frozen=True)
class Call:
    """One calculator call: `a op b`."""

    a: int
    op: str
    b: int

    def __str__(self) -> str:
        return f"{self.a} {self.op} {self.b}"


def find_call(text: str) -> Optional[str]:
    """The text between the first `<|calc|>` and the `<|/calc|>` after it; None if `text` has no complete call."""
    match = _CALL.search(text)
    return match.group(1) if match else None


def parse_call(text: str) -> Optional[Call]:
    """The first call in `text` as a `Call`; None if there is none or it is not `integer op integer`."""
    inside = find_call(text)
    match = _EXPRESSION.fullmatch(inside) if inside is not None else None
    if match is None:
        return None
    a, op, b = match.groups()
    return Call(int(a), op, int(b))


def compute(call: Call) -> str:
    """The result as the tool reports it: an integer, a decimal for an inexact quotient, or `error: ...`."""
    if call.op == "+":
        return str(call.a + call.b)
    if call.op == "-":
        return str(call.a - call.b)
    if call.op == "*":
        return str(call.a * call.b)
    if call.op == "/":
        if call.b == 0:
            return "error: division by zero"
        quotient = Fraction(call.a, call.b)
        return str(quotient.numerator) if quotient.denominator == 1 else f"{float(quotient):.6g}"
    return f"error: unsupported operation {call.op!r}"


def tool_reply(reply: str) -> Optional[str]:
    """What the calculator answers to an assistant reply: None if the reply calls nothing (it is final), an error
    message for a call it cannot read, else the result."""
    inside = find_call(reply)
    if inside is None:
        return None
    call = parse_call(reply)
    if call is None:
        return f"error: cannot read {inside.strip()!r}; write integer, one of {' '.join(OPERATIONS)}, integer"
    return compute(call)


def last_number(text: str) -> Optional[str]:
    """The last number in `text` ("The answer is 42." -> "42"), normalised ("07" -> "7"), or None."""
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    value = Fraction(numbers[-1])
    return str(value.numerator) if value.denominator == 1 else str(float(value))
