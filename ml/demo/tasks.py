"""The task world: verifiable prompts that a real small chat model (SmolLM2-135M-Instruct) can partly do.

The demo world (ml/demo/world.py) is made for the 2M-parameter demo model it trains; a real model needs questions of
its own kind, each with an answer a program can check, so that simulated annotators can rank real answers and the
gain of a turn of the flywheel can be measured against the truth:

- `arithmetic`: "What is 7 + 5? Answer with just the number."
- `capital`:    "What is the capital of Italy? Answer with just the city name."
- `convert`:    "How many minutes are in 3 hours? Answer with just the number."
- `sentence`:   "In one sentence, what is the capital of Japan?"
- `list`:       "List 3 fruits, one per line, and nothing else."

`gold_score(messages, answer)` judges an answer in [0, 1] in tiers: right and in the asked format (0.8-1.0, shorter
is better) > right but not in the format, e.g. a sentence where the number alone was asked (0.45-0.65) > wrong
(0.1) > no answer at all (0). `SimulatedAnnotator(TaskWorld(), noise)` from the demo world ranks and thumbs by it.
Every prompt has a stable split (a hash of its text, about 20% held out), so the prompts the loop trains on are
never the ones its gain is measured on.

Run (CPU, instant): python -m ml.demo.tasks
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ml.demo.world import Prompt, _digest, split_of

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "Russia": "Moscow",
    "Egypt": "Cairo",
    "Greece": "Athens",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Poland": "Warsaw",
    "Austria": "Vienna",
    "Hungary": "Budapest",
    "Ireland": "Dublin",
    "Belgium": "Brussels",
    "Netherlands": "Amsterdam",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Argentina": "Buenos Aires",
    "Kenya": "Nairobi",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "South Korea": "Seoul",
    "India": "New Delhi",
    "Turkey": "Ankara",
    "Iran": "Tehran",
    "Iraq": "Baghdad",
    "Cuba": "Havana",
    "Colombia": "Bogota",
    "Ukraine": "Kyiv",
    "Czechia": "Prague",
    "Romania": "Bucharest",
    "Bulgaria": "Sofia",
    "Serbia": "Belgrade",
    "Australia": "Canberra",
    "New Zealand": "Wellington",
    "Brazil": "Brasilia",
    "Morocco": "Rabat",
    "Nigeria": "Abuja",
    "Ethiopia": "Addis Ababa",
    "Indonesia": "Jakarta",
    "Philippines": "Manila",
    "Switzerland": "Bern",
    "Iceland": "Reykjavik",
}  # fmt: skip -- a table, five to a line


def _words(text: str, sep: str | None = None) -> list[str]:
    """A word list written as one string (tables read better that way)."""
    return text.split(sep)


# big cities that are not capitals: the wrong answers small models give most ("Sydney" for Australia)
OTHER_CITIES = _words(
    "Barcelona|Milan|Munich|Hamburg|Lyon|Marseille|Porto|Kyoto|Osaka|Shanghai|Hong Kong|St. Petersburg|Alexandria|"
    "Sydney|Melbourne|Toronto|Vancouver|Montreal|New York|Los Angeles|Istanbul|Rio de Janeiro|Sao Paulo|Mumbai|"
    "Karachi|Lagos|Casablanca|Zurich|Geneva|Krakow|Gothenburg|Auckland|Ho Chi Minh City|Busan|Dubai",
    "|",
)
CATEGORIES = {
    "fruits": _words(
        "apple banana orange pear grape mango cherry peach plum lemon kiwi strawberry pineapple "
        "watermelon apricot lime blueberry raspberry melon fig"
    ),
    "colors": _words(
        "red blue green yellow orange purple pink black white brown gray grey violet indigo cyan magenta "
        "gold silver beige turquoise"
    ),
    "animals": _words(
        "dog cat horse cow lion tiger elephant bear wolf fox rabbit mouse deer monkey giraffe zebra sheep "
        "goat pig dolphin whale eagle owl snake frog duck chicken camel kangaroo panda shark bird fish"
    ),
    "planets": _words("mercury venus earth mars jupiter saturn uranus neptune"),
}
CONVERSIONS = [  # (big unit, small unit, factor)
    ("kilometers", "meters", 1000),
    ("meters", "centimeters", 100),
    ("kilograms", "grams", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("days", "hours", 24),
    ("weeks", "days", 7),
    ("dollars", "cents", 100),
]  # fmt: skip -- a table
JUST_NUMBER = "Answer with just the number."
JUST_CITY = "Answer with just the city name."
KINDS = ("arithmetic", "capital", "convert", "sentence", "list")


@dataclass(frozen=True)
class Task:
    """One checkable question: its text, its kind and what a right answer holds."""

    text: str
    kind: str
    truth: str  # the number or city; for `list`: "category:n"


class TaskWorld:
    """The tasks (every one, in a seed-shuffled order) and their gold scorer."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.tasks = _all_tasks()
        self._by_text = {t.text: t for t in self.tasks}

    def prompts(self, n: int) -> list[Prompt]:
        """Up to `n` distinct prompts in a seed-shuffled order, every kind spread through the order."""
        rng = random.Random(f"tasks-{self.seed}")
        by_kind = {k: [t for t in self.tasks if t.kind == k] for k in KINDS}
        for tasks in by_kind.values():
            rng.shuffle(tasks)
        order = [t for group in zip(*by_kind.values(), strict=False) for t in group]  # round robin over kinds
        used = set(map(id, order))
        order += [t for t in self.tasks if id(t) not in used]
        out = []
        for t in order[:n]:
            out.append(Prompt(f"task-{_digest(t.text)[:12]}", [{"role": "user", "content": t.text}], split_of(t.text)))
        return out

    def find(self, prompt_messages: list[dict[str, str]]) -> Task | None:
        user = [m.get("content", "") for m in prompt_messages if m.get("role") == "user"]
        return self._by_text.get(user[-1]) if user else None

    def gold_score(self, prompt_messages: list[dict[str, str]], answer: str) -> float:
        """Right and in format 0.8-1.0 (shorter is better) > right, wrong format 0.45-0.65 > wrong 0.1 > none 0.
        A prompt outside the world cannot be checked: 0."""
        task = self.find(prompt_messages)
        text = _plain(answer)
        if task is None or not text:
            return 0.0
        verdict, formatted = JUDGES[task.kind](task, text)
        if verdict == "none":
            return 0.0
        if verdict == "wrong":
            return 0.1
        short = _concision(text, task)
        return round((0.8 + 0.2 * short) if formatted else (0.45 + 0.2 * short), 4)


def _all_tasks() -> list[Task]:
    tasks = []
    for a in range(2, 21):
        for b in range(2, 13):
            tasks.append(Task(f"What is {a} + {b}? {JUST_NUMBER}", "arithmetic", str(a + b)))
            if a > b:
                tasks.append(Task(f"What is {a} - {b}? {JUST_NUMBER}", "arithmetic", str(a - b)))
            if a <= 10:
                tasks.append(Task(f"What is {a} times {b}? {JUST_NUMBER}", "arithmetic", str(a * b)))
    for country, city in CAPITALS.items():
        tasks.append(Task(f"What is the capital of {country}? {JUST_CITY}", "capital", city))
        tasks.append(Task(f"In one sentence, what is the capital of {country}?", "sentence", city))
    for big, small, factor in CONVERSIONS:
        for n in range(2, 11):
            tasks.append(Task(f"How many {small} are in {n} {big}? {JUST_NUMBER}", "convert", str(n * factor)))
    for category in CATEGORIES:
        for n in range(2, 6):
            tasks.append(Task(f"List {n} {category}, one per line, and nothing else.", "list", f"{category}:{n}"))
            tasks.append(Task(f"Name {n} {category}. Write one per line, nothing else.", "list", f"{category}:{n}"))
    return tasks


def _plain(answer: str) -> str:
    """The answer without markdown emphasis, code fences and surrounding space."""
    return re.sub(r"[*_`#]+", "", answer).strip()


def _numbers(text: str) -> list[int]:
    return [int(n.replace(",", "")) for n in re.findall(r"-?\d[\d,]*", text)]


def _judge_number(task: Task, text: str) -> tuple[str, bool]:
    """Right when the number stated last is the truth (a model may restate the question first)."""
    numbers = _numbers(text)
    if not numbers:
        return "none", False
    if numbers[-1] != int(task.truth):
        return "wrong", False
    return "right", re.fullmatch(r"-?[\d,]+\.?", text) is not None


def _judge_city(task: Task, text: str) -> tuple[str, bool]:
    cities = {*CAPITALS.values(), *OTHER_CITIES}
    named = [c for c in cities if re.search(rf"\b{re.escape(c.lower())}\b", text.lower())]
    if task.truth not in named:
        return ("wrong" if named else "none"), False
    if len(named) > 1:
        return "wrong", False
    return "right", text.rstrip(".").lower() == task.truth.lower()


def _judge_sentence(task: Task, text: str) -> tuple[str, bool]:
    verdict, _ = _judge_city(task, text)
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]
    return verdict, len(sentences) == 1 and "\n" not in text.strip() and len(text.split()) >= 3


def _judge_list(task: Task, text: str) -> tuple[str, bool]:
    category, n = task.truth.split(":")
    words = CATEGORIES[category]
    lines = [re.sub(r"^\s*(?:[-•]|\d+[.)])\s*", "", line).strip(" .,").lower() for line in text.splitlines()]
    lines = [line for line in lines if line]
    found = {w for w in words if re.search(rf"\b{w}s?\b", text.lower())}
    if not found:
        return "none", False
    items_ok = len(lines) == int(n) and all(any(re.fullmatch(rf"{w}s?", line) for w in words) for line in lines)
    if len(found) < int(n):
        return "wrong", False
    return "right", items_ok and len(set(lines)) == int(n)


JUDGES = {
    "arithmetic": _judge_number,
    "convert": _judge_number,
    "capital": _judge_city,
    "sentence": _judge_sentence,
    "list": _judge_list,
}
IDEAL_WORDS = {"arithmetic": 1, "convert": 1, "capital": 2, "sentence": 10, "list": 5}


def _concision(text: str, task: Task) -> float:
    """1 at the ideal length for the kind, falling towards 0 as the answer grows to several times it."""
    ideal = IDEAL_WORDS[task.kind] * (int(task.truth.split(":")[1]) / 3 if task.kind == "list" else 1)
    return max(0.0, min(1.0, 1.0 - (len(text.split()) - ideal) / (4 * ideal + 8)))


def main() -> None:
    world = TaskWorld(0)
    prompts = world.prompts(10_000)
    held = sum(p.split == "heldout" for p in prompts)
    kinds = {k: sum(t.kind == k for t in world.tasks) for k in KINDS}
    print(f"{len(prompts)} prompts, {held} held out; by kind: {kinds}")
    for p in prompts[:10]:
        task = world.find(p.messages)
        truth = task.truth if task.kind != "list" else "\n".join(CATEGORIES[task.truth.split(":")[0]][:3])
        answers = [truth, f"Sure! The answer is: {truth}.", "I am not sure."]
        scored = ", ".join(f"{a!r}: {world.gold_score(p.messages, a)}" for a in answers)
        print(f"[{p.split:7}] {p.messages[-1]['content']}\n          {scored}")


if __name__ == "__main__":
    main()
