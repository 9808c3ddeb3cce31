"""The task world for real models: stable prompts and splits, a gold scorer whose tiers hold for each kind, and the
demo world's simulated annotators ranking by it."""

import pytest

from ml.demo.tasks import KINDS, TaskWorld
from ml.demo.world import SimulatedAnnotator


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_prompts_are_deterministic_distinct_and_split_by_text() -> None:
    a, b = TaskWorld(0).prompts(10_000), TaskWorld(0).prompts(10_000)
    assert [p.messages for p in a] == [p.messages for p in b]
    texts = [p.messages[-1]["content"] for p in a]
    assert len(set(texts)) == len(texts) > 500
    held = [p for p in a if p.split == "heldout"]
    assert 0.1 < len(held) / len(a) < 0.3
    assert {p.split for p in TaskWorld(1).prompts(10_000) if p.messages == held[0].messages} == {"heldout"}
    first = TaskWorld(0).prompts(20)  # every kind early in the order, not 20 sums
    assert {TaskWorld(0).find(p.messages).kind for p in first} == set(KINDS)
    assert [p.messages for p in TaskWorld(1).prompts(20)] != [p.messages for p in first]


@pytest.mark.parametrize(
    ("question", "answers"),
    [  # best first: right and in format > right, shorter > right, not the format > wrong > nothing
        ("What is 7 + 5? Answer with just the number.", ["12", "12.", "The answer is 12.", "7 + 5 = 13", "Hmm."]),
        ("What is 9 - 4? Answer with just the number.", ["5", "**5**", "9 - 4 = 5, so the answer is 5.", "4", ""]),
        (
            "What is the capital of Italy? Answer with just the city name.",
            ["Rome", "Rome.", "The capital of Italy is Rome.", "Milan? No, Paris.", "Italy is nice."],
        ),
        (
            "How many minutes are in 3 hours? Answer with just the number.",
            ["180", "180 minutes.", "There are 60 minutes in an hour, so 3 hours is 180 minutes.", "120", "Many."],
        ),
        (
            "In one sentence, what is the capital of Japan?",
            [
                "Tokyo is the capital of Japan.",
                "The capital of Japan is Tokyo, a big city.",
                "Tokyo",
                "Kyoto is the capital of Japan.",
                "Japan is an island.",
            ],
        ),  # fmt: skip -- one answer a line would hide the ranking
        (
            "List 3 fruits, one per line, and nothing else.",
            [
                "apple\nbanana\npear",
                "1. Apple\n2. Banana\n3. Pear",
                "Sure! Here they are: apple, banana and pear.",
                "apple",
                "I like food.",
            ],
        ),  # fmt: skip -- one answer a line would hide the ranking
    ],
)
def test_gold_tiers(question: str, answers: list[str]) -> None:
    world = TaskWorld(0)
    assert world.find(ask(question)) is not None
    scores = [world.gold_score(ask(question), a) for a in answers]
    assert scores == sorted(scores, reverse=True) and scores[0] > scores[2] > scores[3] > scores[4] == 0.0, scores
    assert scores[0] >= 0.8 and 0.4 <= scores[2] <= 0.7 and scores[3] == 0.1


def test_formats_are_judged_strictly() -> None:
    world = TaskWorld(0)
    list4 = ask("List 4 colors, one per line, and nothing else.")
    assert world.gold_score(list4, "red\nblue\ngreen") < 0.8  # three is not four
    assert world.gold_score(list4, "red\nblue\nblue\ngreen") < 0.8  # a repeat
    assert world.gold_score(list4, "red\nblue\ngreen\nyellow") >= 0.8
    one = ask("In one sentence, what is the capital of France?")
    assert world.gold_score(one, "Paris is the capital. It is in France.") < 0.8  # two sentences
    assert world.gold_score(ask("What is 2 + 2? Answer with just the number."), "4\n\nI hope this helps!") < 0.8
    assert world.gold_score(ask("Who are you?"), "An assistant.") == 0.0  # outside the world: cannot be checked


def test_simulated_annotators_rank_and_thumb_by_gold() -> None:
    world = TaskWorld(0)
    question = ask("What is the capital of Spain? Answer with just the city name.")
    answers = ["Barcelona", "Madrid", "The capital of Spain is Madrid.", ""]
    assert SimulatedAnnotator(world, noise=0.0).rank(question, answers) == [3, 1, 2, 4]
    noisy = [SimulatedAnnotator(world, noise=0.1, seed=s).rank(question, answers) for s in range(20)]
    assert all(r[1] < r[0] and r[1] < r[3] for r in noisy)  # clearly different answers: everyone agrees
    thumbs = SimulatedAnnotator(world, noise=0.0)
    assert thumbs.thumb(question, "Madrid") and not thumbs.thumb(question, "Barcelona")
