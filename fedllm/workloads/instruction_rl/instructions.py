"""Instruction data for RL instruction tuning (PFIT): embedded templated tasks, or Alpaca-style files.

The embedded set is made for a policy small enough to train on a CPU in seconds: short factual
questions (capitals, sums, colours, opposites, animal sounds) whose answers come in four
*styles*: concise ("paris ."), helpful-polite, rude, and long-winded. Supervised tuning on all
styles gives a reference policy that mixes them; a client's reward mix (short answers, a
friendly tone, the right answer...) then pulls its policy towards the styles it prefers, which
is what personalisation by preference should show. Each prompt carries its reference answer
(for the exact-answer and similarity rewards).

Real instruction data in the Alpaca format (``{"instruction", "input", "output"}`` per line in
``train.jsonl``/``test.jsonl``) loads with :func:`load_alpaca`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from fedllm.core.errors import DataError
from fedllm.core.types import Instruction

PROMPT_TEMPLATE = "question : {question} answer :"

CAPITALS = {"france": "paris", "germany": "berlin", "italy": "rome", "spain": "madrid", "japan": "tokyo",
            "egypt": "cairo", "canada": "ottawa", "peru": "lima", "kenya": "nairobi", "norway": "oslo",
            "greece": "athens", "chile": "santiago"}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
           "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]
COLOURS = {"the sky": "blue", "grass": "green", "snow": "white", "coal": "black", "a banana": "yellow",
           "a tomato": "red", "a carrot": "orange", "a plum": "purple", "milk": "white", "a lemon": "yellow"}
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "light": "dark",
             "old": "young", "early": "late", "open": "closed", "full": "empty", "wet": "dry", "hard": "soft"}
SOUNDS = {"dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa", "owl": "hoot",
          "lion": "roar", "snake": "hiss", "bee": "buzz", "horse": "neigh"}

STYLES = {
    "concise": "{answer} .",
    "polite": "the answer is {answer} . i hope this helps , have a great day !",
    "rude": "{answer} , obviously . what a silly question .",
    "verbose": "well , let me think about that for a moment . i believe the answer is {answer} .",
}


def _questions() -> list[tuple[str, str]]:
    qs = [(f"what is the capital of {c} ?", a) for c, a in CAPITALS.items()]
    qs += [(f"what is {NUMBERS[a]} plus {NUMBERS[b]} ?", NUMBERS[a + b]) for a in range(10) for b in range(10)
           if a + b < len(NUMBERS)]
    qs += [(f"what colour is {t} ?", c) for t, c in COLOURS.items()]
    qs += [(f"what is the opposite of {w} ?", o) for w, o in OPPOSITES.items()]
    qs += [(f"what sound does a {a} make ?", s) for a, s in SOUNDS.items()]
    return qs


def embedded_instructions(seed: int = 0, test_fraction: float = 0.2) -> tuple[list[Instruction], list[Instruction]]:
    """(train, test) with disjoint questions; each question with every style as a demonstration."""
    items = [Instruction(PROMPT_TEMPLATE.format(question=q), a,
                         tuple(style.format(answer=a) for style in STYLES.values()), question=q) for q, a in _questions()]
    random.Random(f"instructions-{seed}").shuffle(items)
    n_test = max(1, round(test_fraction * len(items)))
    return items[n_test:], items[:n_test]


def embedded_vocabulary() -> list[str]:
    """Every word of the embedded prompts and responses (the tiny policy's word-level vocabulary)."""
    train, test = embedded_instructions()
    words: set[str] = set()
    for item in train + test:
        words.update(item.prompt.split())
        for r in item.responses:
            words.update(r.split())
    return sorted(words)


def load_alpaca(path: str | Path) -> tuple[list[Instruction], list[Instruction]]:
    """Alpaca-style ``train.jsonl``/``test.jsonl`` in a folder: the instruction (plus input) is the
    prompt, the output is both the reference and the one demonstration."""
    folder = Path(path).expanduser()
    splits = []
    for split in ("train", "test"):
        file = folder / f"{split}.jsonl"
        if not file.is_file():
            raise DataError(f"rl.prompts: no {split}.jsonl in {folder} (Alpaca format: instruction, input, output)")
        rows = []
        for n, line in enumerate(file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                question = rec["instruction"] + (f"\n{rec['input']}" if rec.get("input") else "")
                rows.append(Instruction(PROMPT_TEMPLATE.format(question=question), rec["output"], (rec["output"],),
                                        question=question))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"{file}:{n}: not an Alpaca record with instruction/output ({exc})") from None
        splits.append(rows)
    return splits[0], splits[1]


def load_instructions(source: str, seed: int) -> tuple[list[Instruction], list[Instruction]]:
    """``embedded`` (the tiny policy's templated set), ``embedded_chat`` (natural questions for a real
    chat model, fedllm/workloads/instruction_rl/chat_instructions.py) or an Alpaca-style folder."""
    if source == "embedded":
        return embedded_instructions(seed)
    if source == "embedded_chat":
        from fedllm.workloads.instruction_rl.chat_instructions import embedded_chat_instructions

        return embedded_chat_instructions(seed)
    return load_alpaca(source)
