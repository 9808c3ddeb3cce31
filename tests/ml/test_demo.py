"""The demo world: determinism from a seed, stable splits, mixed-quality dialogues, and the gold scorer's order."""

import random

import pytest

from ml.demo.world import HELDOUT_PERCENT, QUALITIES, SimulatedAnnotator, World, split_of


@pytest.fixture(scope="module")
def world() -> World:
    return World(seed=0)


def test_world_is_deterministic_from_its_seed() -> None:
    a, b, c = World(7), World(7), World(8)
    assert a.pretraining_corpus(60) == b.pretraining_corpus(60)
    assert a.sft_dialogues(30, seed=1) == b.sft_dialogues(30, seed=1)
    assert a.sft_dialogues(30, seed=1) != a.sft_dialogues(30, seed=2)
    assert a.prompts(50) == b.prompts(50)
    assert a.people == b.people and a.people != c.people
    assert a.pretraining_corpus(60) != c.pretraining_corpus(60)


def test_corpus_states_true_facts_in_both_languages(world: World) -> None:
    docs = world.pretraining_corpus(400)
    text = "\n".join(docs)
    assert any("住在" in d for d in docs) and any(" lives in " in d for d in docs)
    for q in world.questions[::25]:
        assert world.judge(q, world.reference_answer(q)) == "correct"
    name = "Mira"
    city_en = world.value("city", name, "en")
    assert f"{name} lives in {city_en}." in text


def test_splits_are_stable_and_sized(world: World) -> None:
    prompts = world.prompts(10_000)
    assert len(prompts) == 2 * len(world.questions) and len({p.id for p in prompts}) == len(prompts)
    heldout = sum(p.split == "heldout" for p in prompts) / len(prompts)
    assert abs(heldout - HELDOUT_PERCENT / 100) < 0.06
    for p in prompts[:50]:  # a prompt's split depends on its question text only: not on seed, order or spacing
        text = p.messages[-1]["content"]
        assert p.split == split_of(text) == split_of("  " + text.upper() + " ")
    other = {p.id: p.split for p in World(seed=99).prompts(10_000)}
    assert all(other[p.id] == p.split for p in prompts)
    assert {p.split for p in prompts} == {"train", "heldout"}


def test_sft_dialogues_format_quality_mix_and_train_split(world: World) -> None:
    dialogues = world.sft_dialogues(400, seed=0, bad_fraction=0.25)
    scores = []
    for messages in dialogues:
        roles = [m["role"] for m in messages]
        assert roles[-1] == "assistant" and set(roles) <= {"system", "user", "assistant"}
        for i, m in enumerate(messages):
            if m["role"] == "user":
                assert split_of(m["content"]) == "train"
                scores.append(world.gold_score(messages[: i + 1], messages[i + 1]["content"]))
    good = sum(s >= 0.85 for s in scores) / len(scores)
    assert 0.65 < good < 0.85  # about three quarters good, a quarter wrong / rambling / rude
    assert min(scores) <= 0.2 and all(s > 0 for s in scores)


def test_gold_scorer_ranks_quality_tiers(world: World) -> None:
    rng = random.Random(0)
    order = ["good", "rambling", "rude", "wrong"]
    for q in world.questions:
        prompt = [{"role": "user", "content": q.text}]
        scores = {quality: world.gold_score(prompt, world.answer(q, quality, rng)) for quality in QUALITIES}
        assert all(0.0 <= s <= 1.0 for s in scores.values())
        assert [scores[k] for k in order] == sorted((scores[k] for k in order), reverse=True), (q, scores)
        assert scores["wrong"] > scores["garbage"] == scores["empty"] == 0.0


def test_gold_scorer_hand_written_answers(world: World) -> None:
    city = world.value("city", "Mira", "en")
    wrong_city = next(c for c in ("Oslo", "Paris") if c != city)
    prompt = [{"role": "user", "content": "Where does Mira live?"}]
    answers = [
        f"Sure! Mira lives in {city}.",  # correct, concise, polite
        f"Mira lives in {city}.",  # correct, concise
        "Well, " + "that is a long story and I like telling it. " * 5 + f"Mira lives in {city}.",  # rambling
        f"Ugh, obviously Mira lives in {city}. Stop bothering me.",  # rude
        f"Mira lives in {wrong_city}.",  # wrong
        f"Mira lives in {city} or maybe {wrong_city}.",  # hedging between a right and a wrong fact is wrong
        "purple monkey dishwasher",  # garbage
        "",
    ]
    scores = [world.gold_score(prompt, a) for a in answers]
    assert scores[0] > scores[1] > scores[2] > scores[3] > scores[4] == scores[5] > scores[6] == scores[7] == 0.0


def test_gold_scorer_arithmetic_and_chinese(world: World) -> None:
    plus = [{"role": "user", "content": "What is 3 plus 4?"}]
    assert world.gold_score(plus, "3 plus 4 is 7.") > 0.8
    assert world.gold_score(plus, "7") > 0.8
    assert world.gold_score(plus, "3 plus 4 is 4.") == 0.2  # a wrong result, even if it repeats an operand
    assert world.gold_score(plus, "3 plus 4 is 7, or 8.") == 0.2
    zh = [{"role": "system", "content": "你是一个乐于助人的助手。"}, {"role": "user", "content": "Mira住在哪里？"}]
    city_zh = world.value("city", "Mira", "zh")
    assert world.gold_score(zh, f"好的！Mira住在{city_zh}。") == 1.0
    assert world.gold_score(zh, f"Mira住在{city_zh}。别烦我。") < 0.5
    assert world.gold_score(zh, world.value("city", "Mira", "en")) > 0.8  # the right fact in English still counts


def test_questions_outside_the_world_are_scored_on_manners_only(world: World) -> None:
    prompt = [{"role": "user", "content": "What is the meaning of life?"}]
    assert 0 < world.gold_score(prompt, "Happy to help: nobody knows.") <= 0.5
    assert world.gold_score(prompt, "Shut up.") < world.gold_score(prompt, "Nobody knows.")
    assert world.gold_score(prompt, "") == 0.0


# ---------------------------------------------------------------------------------------- simulated annotators


def _candidate_sets(world: World, n: int, seed: int = 0) -> list[tuple[list[dict[str, str]], list[str]]]:
    """n sets of 4 answers of random quality (repeats allowed) to random questions."""
    rng = random.Random(seed)
    sets = []
    for _ in range(n):
        q = rng.choice(world.questions)
        answers = [world.answer(q, rng.choice(["good", "rambling", "rude", "wrong"]), rng) for _ in range(4)]
        sets.append(([{"role": "user", "content": q.text}], answers))
    return sets


def test_noiseless_annotator_ranks_by_gold_with_ties(world: World) -> None:
    annotator = SimulatedAnnotator(world, noise=0.0, seed=3)
    for prompt, answers in _candidate_sets(world, 100):
        ranks = annotator.rank(prompt, answers)
        gold = [world.gold_score(prompt, a) for a in answers]
        assert min(ranks) == 1 and sorted(set(ranks)) == list(range(1, max(ranks) + 1))  # dense ranks
        for i in range(4):
            for j in range(4):
                if gold[i] > gold[j]:
                    assert ranks[i] < ranks[j], (answers, gold, ranks)
                elif gold[i] == gold[j]:
                    assert ranks[i] == ranks[j]
    prompt, answers = _candidate_sets(world, 1)[0]
    assert annotator.rank(prompt, [answers[0], answers[0], ""]) == [1, 1, 2]  # same answer: a tie; empty: last


def test_noiseless_thumbs_follow_gold(world: World) -> None:
    annotator = SimulatedAnnotator(world, noise=0.0)
    q = world.questions[5]
    prompt, rng = [{"role": "user", "content": q.text}], random.Random(0)
    assert annotator.thumb(prompt, world.answer(q, "good", rng))
    assert not annotator.thumb(prompt, world.answer(q, "rude", rng))
    assert not annotator.thumb(prompt, world.answer(q, "wrong", rng))


def test_noisy_annotators_disagree_sometimes_but_mostly_agree(world: World) -> None:
    sets = _candidate_sets(world, 300, seed=1)
    a, b = SimulatedAnnotator(world, noise=0.15, seed=1), SimulatedAnnotator(world, noise=0.15, seed=2)
    same = sum(a.rank(p, answers) == b.rank(p, answers) for p, answers in sets)
    assert 0 < same < len(sets)  # they disagree on some sets ...
    agree = total = 0
    for p, answers in sets:  # ... but agree on most ordered pairs
        ra, rb = a.rank(p, answers), b.rank(p, answers)
        for i in range(4):
            for j in range(i + 1, 4):
                if ra[i] != ra[j] and rb[i] != rb[j]:
                    agree += (ra[i] < ra[j]) == (rb[i] < rb[j])
                    total += 1
    assert 0.6 < agree / total < 1.0
    thumbs_a = [a.thumb(p, answers[0]) for p, answers in sets]
    thumbs_b = [b.thumb(p, answers[0]) for p, answers in sets]
    matches = sum(x == y for x, y in zip(thumbs_a, thumbs_b, strict=True))
    assert len(sets) / 2 < matches < len(sets)


def test_annotators_are_deterministic_given_their_seed(world: World) -> None:
    sets = _candidate_sets(world, 50, seed=2)
    first = [SimulatedAnnotator(world, noise=0.2, seed=7).rank(p, answers) for p, answers in sets]
    again = SimulatedAnnotator(world, noise=0.2, seed=7)
    assert [again.rank(p, answers) for p, answers in reversed(sets)][::-1] == first  # order of calls is irrelevant
    other = [SimulatedAnnotator(world, noise=0.2, seed=8).rank(p, answers) for p, answers in sets]
    assert other != first
    with pytest.raises(ValueError, match="noise"):
        SimulatedAnnotator(world, noise=-1.0)
