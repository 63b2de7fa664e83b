"""The conversations the fleet benchmark replays: many multi-turn chats at once.

Each conversation has a system prompt of its own (a persona and a document, so
that no two share a prefix beyond the chat template's first tokens) and a few
user turns; every turn resends the whole history (system, the earlier user
turns and the engine's answers), as an OpenAI SDK client does. The text is made
of the model's own pseudo-words (bench/fleet/model.py), one token each, so the
lengths below are in tokens, give or take the punctuation and the template.

The trace is a pure function of its parameters and seed: every mode of the
benchmark replays the same conversations, with the same pauses between turns
("think time") in the same order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from bench.fleet.model import words


@dataclass(frozen=True)
class Shape:
    conversations: int = 20
    min_turns: int = 4
    max_turns: int = 6
    system_tokens: tuple[int, int] = (700, 900)
    user_tokens: tuple[int, int] = (150, 210)
    think_seconds: tuple[float, float] = (2.0, 5.0)
    max_tokens: int = 8
    seed: int = 7


@dataclass(frozen=True)
class Turn:
    user: str
    think_seconds: float  # the pause before this turn is sent (after the last answer)


@dataclass(frozen=True)
class Conversation:
    index: int
    system: str
    turns: tuple[Turn, ...]

    @property
    def name(self) -> str:
        return f"c{self.index:02d}"


def _text(rng: random.Random, vocabulary: list[str], n_words: int) -> str:
    """``n_words`` words in sentences of 8-16 words (each sentence ends with a full stop)."""
    out: list[str] = []
    sentence = 0
    limit = rng.randint(8, 16)
    for _ in range(n_words):
        out.append(rng.choice(vocabulary))
        sentence += 1
        if sentence == limit:
            out[-1] += "."
            sentence, limit = 0, rng.randint(8, 16)
    return " ".join(out)


def build(shape: Shape) -> list[Conversation]:
    """The conversations of ``shape``, the same ones for the same shape and seed."""
    vocabulary = words()
    rng = random.Random(shape.seed)
    conversations: list[Conversation] = []
    for index in range(shape.conversations):
        n_system = rng.randint(*shape.system_tokens)
        # the words before the document make the system prompts differ from their
        # first token on, as distinct deployments' prompts do
        system = f"You are assistant number {index}. " + _text(rng, vocabulary, n_system)
        turns = tuple(
            Turn(
                user=_text(rng, vocabulary, rng.randint(*shape.user_tokens)),
                think_seconds=0.0 if t == 0 else rng.uniform(*shape.think_seconds),
            )
            for t in range(rng.randint(shape.min_turns, shape.max_turns))
        )
        conversations.append(Conversation(index=index, system=system, turns=turns))
    return conversations


def describe(conversations: list[Conversation], shape: Shape) -> dict[str, object]:
    """The trace's size in words (≈ tokens): what a report prints about it."""
    turns = [len(c.turns) for c in conversations]
    finals = [
        len(c.system.split())
        + sum(len(t.user.split()) for t in c.turns)
        + shape.max_tokens * (len(c.turns) - 1)
        for c in conversations
    ]
    return {
        "conversations": len(conversations),
        "turns": sum(turns),
        "turns_per_conversation": [min(turns), max(turns)],
        "system_words": list(shape.system_tokens),
        "user_words": list(shape.user_tokens),
        "final_history_words": [min(finals), max(finals)],
        "think_seconds": list(shape.think_seconds),
        "max_tokens": shape.max_tokens,
        "seed": shape.seed,
    }
