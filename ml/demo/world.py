"""The demo world: a small bilingual (English/中文) world of facts that a ~2M-parameter model learns on a CPU.

There is no model hub or data set here, so every stage of the pipeline trains on text this file generates,
deterministically from a seed:

- people with four attributes (city, favourite colour, pet, age) and arithmetic on small numbers;
- `pretraining_corpus`: plain text (profiles, little stories, question/answer prose) stating those facts;
- `sft_dialogues`: chats in the OpenAI `messages` format, of deliberately mixed quality;
- `prompts`: a pool of user questions, each in a stable `train` or `heldout` split;
- `gold_score`: judges any answer in [0, 1] — correctness first, then concision, then manners — so that simulated
  annotators and the evaluation of RL can be measured against the truth;
- `SimulatedAnnotator`: ranks K candidate answers and gives thumbs by the gold score plus per-annotator noise.

Run (CPU, instant): python -m ml.demo.world
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

NAMES = [
    "Mira",
    "Omar",
    "Lena",
    "Ravi",
    "Ines",
    "Tomas",
    "Yuki",
    "Kofi",
    "Sara",
    "Pavel",
    "Nadia",
    "Hugo",
    "Aiko",
    "Bruno",
    "Clara",
    "Dara",
    "Emil",
    "Farah",
    "Gus",
    "Hana",
    "Ivo",
    "Jana",
    "Kai",
    "Luca",
]
# (English, 中文) pairs; no value is a substring of another value of any category in either language.
CITIES = [
    ("Oslo", "奥斯陆"),
    ("Paris", "巴黎"),
    ("Tokyo", "东京"),
    ("Cairo", "开罗"),
    ("Lima", "利马"),
    ("Rome", "罗马"),
    ("Berlin", "柏林"),
    ("Seoul", "首尔"),
]
COLOURS = [
    ("red", "红色"),
    ("blue", "蓝色"),
    ("green", "绿色"),
    ("yellow", "黄色"),
    ("black", "黑色"),
    ("white", "白色"),
    ("purple", "紫色"),
    ("orange", "橙色"),
]
ANIMALS = [
    ("cat", "猫"),
    ("dog", "狗"),
    ("rabbit", "兔子"),
    ("fox", "狐狸"),
    ("bear", "熊"),
    ("duck", "鸭子"),
    ("goat", "山羊"),
]
CATEGORY_VALUES = {"city": CITIES, "colour": COLOURS, "animal": ANIMALS}
AGES = range(20, 70)
OPERANDS = range(10)

QUESTION_TEMPLATES = {
    ("city", "en"): ["Where does {name} live?", "Which city does {name} live in?"],
    ("city", "zh"): ["{name}住在哪里？", "{name}住在哪个城市？"],
    ("colour", "en"): ["What is {name}'s favourite colour?", "Which colour does {name} like best?"],
    ("colour", "zh"): ["{name}最喜欢什么颜色？"],
    ("animal", "en"): ["What pet does {name} have?", "Which animal does {name} keep?"],
    ("animal", "zh"): ["{name}养了什么宠物？"],
    ("age", "en"): ["How old is {name}?", "What is {name}'s age?"],
    ("age", "zh"): ["{name}几岁了？", "{name}多大了？"],
    ("plus", "en"): ["What is {a} plus {b}?"],
    ("plus", "zh"): ["{a}加{b}等于几？"],
    ("minus", "en"): ["What is {a} minus {b}?"],
    ("minus", "zh"): ["{a}减{b}等于几？"],
}
ANSWER_TEMPLATES = {
    ("city", "en"): "{name} lives in {value}.",
    ("city", "zh"): "{name}住在{value}。",
    ("colour", "en"): "{name}'s favourite colour is {value}.",
    ("colour", "zh"): "{name}最喜欢{value}。",
    ("animal", "en"): "{name} has a {value}.",
    ("animal", "zh"): "{name}养了一只{value}。",
    ("age", "en"): "{name} is {value} years old.",
    ("age", "zh"): "{name}{value}岁。",
    ("plus", "en"): "{a} plus {b} is {value}.",
    ("plus", "zh"): "{a}加{b}等于{value}。",
    ("minus", "en"): "{a} minus {b} is {value}.",
    ("minus", "zh"): "{a}减{b}等于{value}。",
}
POLITE_OPENERS = {
    "en": ["Sure! ", "Of course. ", "Certainly! ", "Happy to help. "],
    "zh": ["好的！", "当然。", "很高兴回答。"],
}
POLITE_CLOSERS = {"en": [" Happy to help!", " Thank you for asking."], "zh": ["谢谢你的提问。", "很高兴帮到你。"]}
RUDE_OPENERS = {
    "en": ["Ugh, obviously ", "Whatever. ", "What a stupid question. "],
    "zh": ["这么简单都不知道？", "烦死了。"],
}
RUDE_CLOSERS = {
    "en": [" Stop bothering me.", " Shut up and think next time.", " Idiot."],
    "zh": ["别烦我。", "闭嘴吧。", "真笨。"],
}
FILLER = {
    "en": [
        "Well, let me think about this for a moment.",
        "There are many people in this little world, and each of them has a story.",
        "I have thought about questions like this one many times before.",
        "It is worth remembering that every fact can be checked in more than one way.",
        "Some questions are easy and some are hard, and this one is somewhere in between.",
        "Anyway, here is what I know.",
    ],
    "zh": [
        "嗯，让我想一想。",
        "这个世界里有很多人，每个人都有自己的故事。",
        "我以前也想过很多类似的问题。",
        "有些问题容易，有些问题难，这个问题在两者之间。",
        "总之，我知道的是这样。",
    ],
}
SYSTEM_PROMPTS = {"en": "You are a helpful assistant.", "zh": "你是一个乐于助人的助手。"}
POLITE_WORDS = [
    "sure",
    "of course",
    "certainly",
    "happy to help",
    "glad to help",
    "please",
    "thank",
    "好的",
    "当然",
    "很高兴",
    "请",
    "谢谢",
]
RUDE_WORDS = [
    "ugh",
    "obviously",
    "whatever",
    "stupid",
    "idiot",
    "dumb",
    "shut up",
    "bothering",
    "这么简单",
    "烦",
    "闭嘴",
    "笨",
    "白痴",
]
HELDOUT_PERCENT = 20
QUALITIES = ("good", "rambling", "rude", "wrong", "garbage", "empty")


@dataclass(frozen=True)
class Question:
    """One askable question and everything needed to answer and to judge it."""

    text: str
    lang: str  # "en" or "zh"
    kind: str  # city | colour | animal | age | plus | minus
    subject: str  # a name, or "a,b" for arithmetic
    value: str  # the right answer in the question's language (a city, a colour, a number)

    @property
    def fields(self) -> dict[str, str]:
        return _fields(self.kind, self.subject, self.value)


@dataclass
class Prompt:
    """A user prompt for annotation/RL: a messages list and its stable split."""

    id: str
    messages: list[dict[str, str]]
    split: str  # "train" or "heldout"


class World:
    """Facts drawn from `seed`; all text generation is a pure function of (seed, arguments)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        rng = random.Random(f"world-{seed}")
        self.people = {
            name: {
                "city": rng.randrange(len(CITIES)),
                "colour": rng.randrange(len(COLOURS)),
                "animal": rng.randrange(len(ANIMALS)),
                "age": rng.choice(AGES),
            }
            for name in NAMES
        }
        self.questions = self._all_questions()
        self._by_text = {_normalise(q.text): q for q in self.questions}

    # ------------------------------------------------------------------------------------------------------ facts

    def value(self, kind: str, subject: str, lang: str) -> str:
        """The true answer to a question kind about a subject, in a language."""
        if kind == "plus":
            a, b = map(int, subject.split(","))
            return str(a + b)
        if kind == "minus":
            a, b = map(int, subject.split(","))
            return str(a - b)
        if kind == "age":
            return str(self.people[subject]["age"])
        return CATEGORY_VALUES[kind][self.people[subject][kind]][lang == "zh"]

    def _all_questions(self) -> list[Question]:
        subjects = {kind: NAMES for kind in ("city", "colour", "animal", "age")}
        subjects["plus"] = [f"{a},{b}" for a in OPERANDS for b in OPERANDS]
        subjects["minus"] = [f"{a},{b}" for a in OPERANDS for b in OPERANDS if a >= b]
        out = []
        for (kind, lang), templates in QUESTION_TEMPLATES.items():
            for subject in subjects[kind]:
                value = self.value(kind, subject, lang)
                for template in templates:
                    text = template.format(**_fields(kind, subject, value))
                    out.append(Question(text, lang, kind, subject, value))
        return out

    def find_question(self, text: str) -> Question | None:
        """The world's question that `text` asks (case, spacing and final punctuation ignored), if any."""
        return self._by_text.get(_normalise(text))

    def reference_answer(self, question: Question) -> str:
        return ANSWER_TEMPLATES[question.kind, question.lang].format(**question.fields)

    # ------------------------------------------------------------------------------------------------ pretraining

    def pretraining_corpus(self, n_docs: int) -> list[str]:
        """`n_docs` plain-text documents: profiles, little stories, Q&A prose and sums, in both languages."""
        rng = random.Random(f"corpus-{self.seed}")
        makers = [self._profile_doc, self._story_doc, self._qa_doc, self._qa_doc, self._arithmetic_doc]
        return [rng.choice(makers)(rng, rng.choice(["en", "zh"])) for _ in range(n_docs)]

    def _profile_doc(self, rng: random.Random, lang: str) -> str:
        name = rng.choice(NAMES)
        kinds = ["city", "colour", "animal", "age"]
        rng.shuffle(kinds)
        sentences = [ANSWER_TEMPLATES[k, lang].format(name=name, value=self.value(k, name, lang)) for k in kinds]
        return ("" if lang == "zh" else " ").join(sentences)

    def _story_doc(self, rng: random.Random, lang: str) -> str:
        name = rng.choice(NAMES)
        city, colour, animal, age = (self.value(k, name, lang) for k in ("city", "colour", "animal", "age"))
        if lang == "zh":
            return (
                f"{name}{age}岁，住在{city}。每天早上，{name}带着自己的{animal}在{city}散步。"
                f"{name}最喜欢{colour}，所以{name}的{animal}戴着一条{colour}的项圈。"
            )
        return (
            f"{name} is {age} years old and lives in {city}. Every morning {name} walks through {city} with a pet "
            f"{animal}. {name}'s favourite colour is {colour}, so the {animal} wears a {colour} collar."
        )

    def _qa_doc(self, rng: random.Random, lang: str) -> str:
        pool = [q for q in self.questions if q.lang == lang]
        ask, tell = ("问：", "答：") if lang == "zh" else ("Question: ", "Answer: ")
        lines = []
        for q in rng.sample(pool, rng.randint(2, 4)):
            lines.append(f"{ask}{q.text}\n{tell}{self.reference_answer(q)}")
        return "\n".join(lines)

    def _arithmetic_doc(self, rng: random.Random, lang: str) -> str:
        pool = [q for q in self.questions if q.lang == lang and q.kind in ("plus", "minus")]
        sep = "" if lang == "zh" else " "
        return sep.join(self.reference_answer(q) for q in rng.sample(pool, rng.randint(3, 6)))

    # -------------------------------------------------------------------------------------------------- dialogues

    def answer(self, question: Question, quality: str, rng: random.Random) -> str:
        """An answer of the given quality (one of QUALITIES): the source of SFT targets and annotation candidates."""
        lang, ref = question.lang, self.reference_answer(question)
        sep = "" if lang == "zh" else " "
        if quality == "good":
            style = rng.random()  # half plain, a third opened politely, the rest closed politely
            if style < 0.5:
                return ref
            return rng.choice(POLITE_OPENERS[lang]) + ref if style < 0.83 else ref + rng.choice(POLITE_CLOSERS[lang])
        if quality == "rambling":
            filler = rng.sample(FILLER[lang], 4)
            return sep.join([*filler[:3], ref, filler[3]])
        if quality == "rude":
            return rng.choice(RUDE_OPENERS[lang]) + ref + rng.choice(RUDE_CLOSERS[lang])
        if quality == "wrong":
            return ANSWER_TEMPLATES[question.kind, lang].format(
                **{**question.fields, "value": self._wrong(question, rng)}
            )
        if quality == "garbage":
            words = re.findall(r"\w+", " ".join(FILLER[lang]))
            return sep.join(rng.choice(words) for _ in range(rng.randint(3, 8)))
        if quality == "empty":
            return ""
        raise ValueError(f"unknown answer quality {quality!r}; expected one of {QUALITIES}")

    def _wrong(self, question: Question, rng: random.Random) -> str:
        if question.kind in CATEGORY_VALUES:
            options = [pair[question.lang == "zh"] for pair in CATEGORY_VALUES[question.kind]]
        else:
            options = [str(int(question.value) + d) for d in (-3, -2, -1, 1, 2, 3) if int(question.value) + d >= 0]
        return rng.choice([v for v in options if v != question.value])

    def sft_dialogues(
        self, n: int, seed: int = 0, bad_fraction: float = 0.2, split: str = "train"
    ) -> list[list[dict[str, str]]]:
        """`n` chats on `split` questions; a `bad_fraction` of answers are wrong, rambling or rude. The `heldout`
        split with no bad answers is the reference that held-out perplexity is measured on."""
        rng = random.Random(f"sft-{self.seed}-{seed}" + ("" if split == "train" else f"-{split}"))
        train = {
            lang: [q for q in self.questions if q.lang == lang and split_of(q.text) == split] for lang in ["en", "zh"]
        }
        dialogues = []
        for _ in range(n):
            lang = rng.choice(["en", "zh"])
            messages = [{"role": "system", "content": SYSTEM_PROMPTS[lang]}] if rng.random() < 0.2 else []
            for _turn in range(1 if rng.random() < 0.75 else 2):
                question = rng.choice(train[lang])
                quality = "good" if rng.random() >= bad_fraction else rng.choice(["wrong", "rambling", "rude"])
                messages.append({"role": "user", "content": question.text})
                messages.append({"role": "assistant", "content": self.answer(question, quality, rng)})
            dialogues.append(messages)
        return dialogues

    def prompts(self, n: int) -> list[Prompt]:
        """Up to `n` distinct prompts (each question alone or after a system prompt), in a seed-shuffled order."""
        rng = random.Random(f"prompts-{self.seed}")
        pool = []
        for q in self.questions:
            split = split_of(q.text)
            user = {"role": "user", "content": q.text}
            pool.append(Prompt(f"demo-{_digest(q.text)[:12]}", [user], split))
            system = {"role": "system", "content": SYSTEM_PROMPTS[q.lang]}
            pool.append(Prompt(f"demo-{_digest(q.text)[:12]}-sys", [system, user], split))
        rng.shuffle(pool)
        return pool[:n]

    # ------------------------------------------------------------------------------------------------ gold scorer

    def gold_score(self, prompt_messages: list[dict[str, str]], answer: str) -> float:
        """Judge `answer` to the last user message, in [0, 1], in strict tiers:

        correct (0.55-1.0: +0.3 concise, +0.15 polite) > correct but rude (0.35-0.45) > wrong (0.1-0.2)
        > no answer at all: empty, garbage, off-topic (0.0).
        A question outside the world cannot be checked: it gets at most 0.5, from concision and manners only.
        """
        user = [m["content"] for m in prompt_messages if m.get("role") == "user"]
        question = self.find_question(user[-1]) if user else None
        concise = _concision(answer, self.reference_answer(question) if question else "")
        manners = _manners(answer)
        if question is None:
            return 0.0 if not answer.strip() else round(0.25 * concise + 0.25 * (manners + 1) / 2, 4)
        verdict = self.judge(question, answer)
        if verdict == "none":
            return 0.0
        if verdict == "wrong":
            return 0.1 if manners < 0 else 0.2
        if manners < 0:
            return round(0.35 + 0.1 * concise, 4)
        return round(0.55 + 0.3 * concise + 0.15 * manners, 4)

    def judge(self, question: Question, answer: str) -> str:
        """ "correct" (states the truth and nothing conflicting), "wrong" (states a conflicting value) or "none"."""
        if question.kind in CATEGORY_VALUES:
            mentioned = {en for en, zh in CATEGORY_VALUES[question.kind] if _mentions(answer, en, zh)}
            truth = CATEGORY_VALUES[question.kind][self.people[question.subject][question.kind]][0]
            others = mentioned - {truth}
            return "wrong" if others else ("correct" if truth in mentioned else "none")
        claims = [int(x) for x in re.findall(r"\d+", answer)]
        if question.kind in ("plus", "minus") and claims[:2] == [int(x) for x in question.subject.split(",")]:
            claims = claims[2:]  # "3 plus 4 is 7" repeats the operands before it claims a result
        truth = int(question.value)
        if any(c != truth for c in claims):
            return "wrong"
        return "correct" if claims else "none"


# ---------------------------------------------------------------------------------------------------- helpers


def _fields(kind: str, subject: str, value: str) -> dict[str, str]:
    """Template fields of a question: {name, value} or, for arithmetic, {a, b, value}."""
    if kind in ("plus", "minus"):
        a, b = subject.split(",")
        return {"a": a, "b": b, "value": value}
    return {"name": subject, "value": value}


def split_of(question_text: str) -> str:
    """ "heldout" for a stable HELDOUT_PERCENT of questions (by hash of the normalised text), else "train"."""
    return "heldout" if int(_digest(question_text), 16) % 100 < HELDOUT_PERCENT else "train"


def _digest(text: str) -> str:
    return hashlib.sha256(_normalise(text).encode()).hexdigest()


def _normalise(text: str) -> str:
    text = text.casefold().replace("’", "'")
    return re.sub(r"[\s?？.。!！]+", "", text)


def _mentions(answer: str, en: str, zh: str) -> bool:
    return zh in answer or _has_word(answer, en + "(s|es)?")


def _has_word(text: str, pattern: str) -> bool:
    """`pattern` as a whole Latin-script word (CJK neighbours count as boundaries, unlike regex \\b)."""
    return re.search(rf"(?<![A-Za-z]){pattern}(?![A-Za-z])", text, flags=re.IGNORECASE) is not None


def _length_units(text: str) -> int:
    """Words of Latin script plus characters of CJK: a language-neutral length."""
    return len(re.findall(r"[A-Za-z0-9']+", text)) + len(re.findall(r"[\u4e00-\u9fff]", text))


def _concision(answer: str, reference: str) -> float:
    """1.0 up to 6 units longer than the reference answer, falling linearly to 0.0 at 30 units longer."""
    excess = _length_units(answer) - max(_length_units(reference), 4) - 6
    return min(1.0, max(0.0, 1.0 - excess / 24))


def _manners(answer: str) -> int:
    """-1 rude, 0 neutral, 1 polite."""

    def said(words: list[str]) -> bool:
        return any(w in answer if w[0] > "\u2e80" else _has_word(answer, re.escape(w)) for w in words)

    if said(RUDE_WORDS):
        return -1
    return 1 if said(POLITE_WORDS) else 0


# ------------------------------------------------------------------------------------ simulated annotators (issue 4)


class SimulatedAnnotator:
    """A stand-in for a person who ranks K candidate answers and gives thumbs, judging by the gold scorer plus noise.

    Each annotator perceives an answer's quality as its gold score plus Gaussian noise of std `noise`, so two
    annotators (different seeds) sometimes disagree on answers of similar quality, and agree on clearly different
    ones, like people do. Answers whose gold scores are equal within `tie_epsilon` are the same to every annotator:
    they share one noise draw and so tie in a ranking. The noise is a pure function of (seed, prompt, answers), not
    of call order, so an annotator asked twice answers the same way and a run repeats exactly.
    """

    def __init__(
        self, world: World, noise: float = 0.1, seed: int = 0, threshold: float = 0.5, tie_epsilon: float = 1e-6
    ) -> None:
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.world, self.noise, self.seed = world, noise, seed
        self.threshold, self.tie_epsilon = threshold, tie_epsilon

    def _rng(self, kind: str, prompt_messages: list[dict[str, str]], answers: list[str]) -> random.Random:
        key = repr((kind, self.seed, [(m.get("role"), m.get("content")) for m in prompt_messages], answers))
        return random.Random(_digest_raw(key))

    def perceive(self, prompt_messages: list[dict[str, str]], answers: list[str]) -> list[float]:
        """Noisy quality of each answer: its gold score plus one noise draw per distinct gold score."""
        gold = [self.world.gold_score(prompt_messages, a) for a in answers]
        levels: list[float] = []  # distinct gold scores, in order of first appearance
        for g in gold:
            if all(abs(g - level) > self.tie_epsilon for level in levels):
                levels.append(g)
        rng = self._rng("rank", prompt_messages, answers)
        noisy = {level: level + rng.gauss(0.0, self.noise) if self.noise else level for level in levels}
        return [noisy[next(level for level in levels if abs(g - level) <= self.tie_epsilon)] for g in gold]

    def rank(self, prompt_messages: list[dict[str, str]], answers: list[str]) -> list[int]:
        """ranks[i] is answers[i]'s rank: 1 = best, equal ranks = a tie (dense: 1, 1, 2, 3)."""
        if not answers:
            raise ValueError("nothing to rank: no answers given")
        perceived = self.perceive(prompt_messages, answers)
        distinct = sorted(set(perceived), reverse=True)
        return [distinct.index(p) + 1 for p in perceived]

    def thumb(self, prompt_messages: list[dict[str, str]], answer: str) -> bool:
        """Thumbs up when the answer's noisy gold score reaches `threshold` (by default: right and not rude)."""
        rng = self._rng("thumb", prompt_messages, [answer])
        score = self.world.gold_score(prompt_messages, answer) + (rng.gauss(0.0, self.noise) if self.noise else 0.0)
        return score >= self.threshold


def _digest_raw(text: str) -> int:
    """A stable integer seed for `text` (Python's hash() is salted per process)."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:16], 16)


if __name__ == "__main__":
    world = World(seed=0)
    print("\n\n".join(world.pretraining_corpus(4)))
    print(world.sft_dialogues(2, seed=0))
    for p in world.prompts(3):
        q = world.find_question(p.messages[-1]["content"])
        print(p.split, p.messages[-1]["content"], "->", world.reference_answer(q))
    q, asked = world.questions[0], [{"role": "user", "content": world.questions[0].text}]
    candidates = [world.answer(q, quality, random.Random(0)) for quality in ("good", "rambling", "rude", "wrong")]
    print(candidates)
    for seed in (1, 2):
        print(f"annotator {seed} ranks", SimulatedAnnotator(world, noise=0.2, seed=seed).rank(asked, candidates))
