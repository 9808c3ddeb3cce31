"""Fixtures for the alignment tests: one tiny tokenizer and one tiny random base model directory per session."""

import random
from pathlib import Path

import pytest
import torch

from ml.checkpoint import save_checkpoint
from ml.demo.world import World
from ml.model import ModelConfig, Transformer
from ml.tokenizer import Tokenizer

TINY_SHAPE = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64, max_seq_len=128)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and far faster than on two when other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Tokenizer:
    world = World(0)
    texts = world.pretraining_corpus(300) + [m["content"] for d in world.sft_dialogues(200) for m in d]
    return Tokenizer.train(texts, vocab_size=400)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Tokenizer) -> Path:
    """A random 2-layer, width-32 language model with the tiny tokenizer, saved as a model directory."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tiny_tokenizer.vocab_size, **TINY_SHAPE))
    return save_checkpoint(tmp_path_factory.mktemp("alignment") / "base", model, tokenizer=tiny_tokenizer)


WORDS = ["red", "green", "cat", "dog", "Oslo", "Paris", "seven", "eight", "lives", "has", "is", "the", "a"]


def blue_rankings(n: int, seed: int, k: int = 3) -> list[dict]:
    """Synthetic rankings of k answers where an answer containing the word "blue" beats one without (a tie
    otherwise): a preference a reward model must learn from the text, and can be checked on held-out prompts."""
    rng = random.Random(seed)
    prompts = World(0).prompts(200)
    out = []
    for i in range(n):
        answers: list[str] = []
        while len(answers) < k:
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 7))]
            if not answers or (len(answers) == 1 and rng.random() < 0.5):
                words.insert(rng.randrange(len(words) + 1), "blue")
            if (text := " ".join(words)) not in answers:
                answers.append(text)
        rng.shuffle(answers)
        ranks = [1 if "blue" in a.split() else 2 for a in answers]
        out.append({"prompt": prompts[i % len(prompts)].messages, "answers": answers, "ranking": ranks})
    return out


@pytest.fixture(scope="session")
def make_rankings():
    """blue_rankings, for tests: make_rankings(n, seed) -> ranking records."""
    return blue_rankings
