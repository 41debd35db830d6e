"""Procedurally generated tasks with short, exact, checkable answers: SFT data, held-out evaluation, RL rewards.

Each generator draws one `Problem` from a `random.Random`: the user's question (one of a few phrasings), the exact
answer, and a `key` — the problem itself without its phrasing ("add:17,25"). Whether a problem is held out is decided
by a hash of its task and key alone (`is_heldout`), so every phrasing of a held-out problem stays out of the training
data by construction, however many problems are drawn and whatever the seed.

`check_answer(task, completion, answer)` grades a model's completion: exact match after normalising whitespace,
surrounding quotes/backticks, a trailing period and the spacing around list commas. Case counts (the formatting tasks
are about case); nothing else is forgiven ("The answer is 42" is wrong: the format taught is the bare answer).
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable, Iterator

from gpt.errors import GptError
from gpt.sft.data import hash_fraction


class TaskError(GptError, ValueError):
    """An unknown task name, or a problem space too small for the number of problems asked."""


@dataclasses.dataclass(frozen=True)
class Problem:
    task: str
    key: str  # the problem without its phrasing: decides held-out membership
    prompt: str  # the user's message
    answer: str


# Short, common, lower-case English words (written for this module): material for the counting/sorting/format tasks.
WORDS = tuple("""
apple river stone cloud green music table window garden yellow little orange paper water light friend house
summer winter bread chair happy quick brown purple silver simple number letter planet forest ocean market
rabbit candle mirror pencil ticket bottle button castle dragon engine flower guitar hammer island jacket kettle
lemon monkey needle pepper rocket saddle tomato violin wallet zebra anchor basket carpet doctor eagle farmer
honey iron jungle kitten ladder magnet night onion parrot queen robot sugar tiger umbrella valley wagon
""".split())
LETTERS = "abcdefghijklmnoprstuwy"


def _phrase(rng: random.Random, templates: tuple[str, ...], **values: object) -> str:
    return rng.choice(templates).format(**values)


def _add(rng: random.Random) -> Problem:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    prompt = _phrase(rng, ("What is {a} + {b}?", "Compute {a} + {b}.", "Add {a} and {b}.",
                           "What is the sum of {a} and {b}?"), a=a, b=b)
    return Problem("add", f"{a},{b}", prompt, str(a + b))


def _subtract(rng: random.Random) -> Problem:
    a, b = sorted((rng.randint(0, 99), rng.randint(0, 99)), reverse=True)
    prompt = _phrase(rng, ("What is {a} - {b}?", "Compute {a} - {b}.", "Subtract {b} from {a}."), a=a, b=b)
    return Problem("subtract", f"{a},{b}", prompt, str(a - b))


def _multiply(rng: random.Random) -> Problem:
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    prompt = _phrase(rng, ("What is {a} * {b}?", "What is {a} times {b}?", "Multiply {a} by {b}."), a=a, b=b)
    return Problem("multiply", f"{a},{b}", prompt, str(a * b))


def _count_letter(rng: random.Random) -> Problem:
    word = rng.choice(WORDS)
    letter = rng.choice(word) if rng.random() < 0.8 else rng.choice(LETTERS)
    prompt = _phrase(rng, ("How many times does the letter '{c}' appear in '{w}'?",
                           "Count the letter '{c}' in the word '{w}'."), c=letter, w=word)
    return Problem("count_letter", f"{letter},{word}", prompt, str(word.count(letter)))


def _count_words(rng: random.Random) -> Problem:
    words = rng.sample(WORDS, rng.randint(2, 8))
    text = " ".join(words)
    prompt = _phrase(rng, ("How many words are in '{t}'?", "Count the words: {t}"), t=text)
    return Problem("count_words", text, prompt, str(len(words)))


def _numbers(rng: random.Random) -> list[int]:
    return [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]


def _sort_numbers(rng: random.Random) -> Problem:
    numbers = _numbers(rng)
    listed = ", ".join(map(str, numbers))
    prompt = _phrase(rng, ("Sort these numbers from smallest to largest: {n}", "Sort in ascending order: {n}"),
                     n=listed)
    return Problem("sort_numbers", listed, prompt, ", ".join(map(str, sorted(numbers))))


def _max_number(rng: random.Random) -> Problem:
    numbers = _numbers(rng)
    listed = ", ".join(map(str, numbers))
    prompt = _phrase(rng, ("What is the largest number in {n}?", "Which is the biggest of {n}?"), n=listed)
    return Problem("max_number", listed, prompt, str(max(numbers)))


def _sort_words(rng: random.Random) -> Problem:
    words = rng.sample(WORDS, rng.randint(3, 5))
    listed = ", ".join(words)
    prompt = _phrase(rng, ("Sort these words alphabetically: {w}", "Put in alphabetical order: {w}"), w=listed)
    return Problem("sort_words", listed, prompt, ", ".join(sorted(words)))


def _uppercase(rng: random.Random) -> Problem:
    text = " ".join(rng.sample(WORDS, rng.randint(1, 4)))
    prompt = _phrase(rng, ("Write '{t}' in uppercase.", "Convert to upper case: {t}"), t=text)
    return Problem("uppercase", text, prompt, text.upper())


def _reverse_words(rng: random.Random) -> Problem:
    words = rng.sample(WORDS, rng.randint(2, 6))
    text = " ".join(words)
    prompt = _phrase(rng, ("Reverse the order of the words: {t}", "Write these words backwards, last word first: {t}"),
                     t=text)
    return Problem("reverse_words", text, prompt, " ".join(reversed(words)))


GENERATORS: dict[str, Callable[[random.Random], Problem]] = {
    "add": _add,
    "subtract": _subtract,
    "multiply": _multiply,
    "count_letter": _count_letter,
    "count_words": _count_words,
    "sort_numbers": _sort_numbers,
    "max_number": _max_number,
    "sort_words": _sort_words,
    "uppercase": _uppercase,
    "reverse_words": _reverse_words,
}
TASK_NAMES = tuple(GENERATORS)


def _generator(task: str) -> Callable[[random.Random], Problem]:
    if task not in GENERATORS:
        raise TaskError(f"unknown task {task!r}; known: {list(TASK_NAMES)}")
    return GENERATORS[task]


def is_heldout(problem: Problem, heldout_fraction: float, salt: str) -> bool:
    """Held out by a hash of (task, key): every phrasing of a held-out problem is held out."""
    return hash_fraction(f"{problem.task}:{problem.key}", salt) < heldout_fraction


def sample_problems(task: str, count: int, seed: int, *, heldout: bool, heldout_fraction: float,
                    salt: str) -> list[Problem]:
    """`count` distinct problems (by prompt) of one task on the held-out side or the training side.

    Held-out problems are also distinct by key (each one a different question). Deterministic in
    (task, count, seed, heldout, heldout_fraction, salt)."""
    generate = _generator(task)
    rng = random.Random(f"{seed}:{task}:{'heldout' if heldout else 'train'}")
    seen: set[str] = set()
    problems: list[Problem] = []
    for _ in range(50 * count + 100):
        if len(problems) == count:
            break
        problem = generate(rng)
        identity = problem.key if heldout else problem.prompt
        if is_heldout(problem, heldout_fraction, salt) != heldout or identity in seen:
            continue
        seen.add(identity)
        problems.append(problem)
    if len(problems) < count:
        side = "held-out" if heldout else "training"
        raise TaskError(f"task {task!r}: only {len(problems)} distinct {side} problems found, {count} asked; "
                        f"ask for fewer or change the held-out fraction")
    return problems


def iter_problems(tasks: list[str], count: int, seed: int, *, heldout: bool, heldout_fraction: float,
                  salt: str) -> Iterator[Problem]:
    for task in tasks:
        yield from sample_problems(task, count, seed, heldout=heldout, heldout_fraction=heldout_fraction, salt=salt)


_LIST_COMMA = re.compile(r"\s*,\s*")
_SPACES = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """The comparison form: one line of single spaces, no wrapping quotes/backticks or final period, ", " lists."""
    text = _SPACES.sub(" ", text).strip()
    while len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"`":
        text = text[1:-1].strip()
    text = text.removesuffix(".").strip()
    return _LIST_COMMA.sub(", ", text)


def check_answer(task: str, completion: str, answer: str) -> bool:
    """True when `completion` is the exact answer of a `task` problem (after `normalize_answer` on both)."""
    _generator(task)  # an unknown task is an error, not a silent False
    return normalize_answer(completion) == normalize_answer(answer)
