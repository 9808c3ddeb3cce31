"""The inference service: streamed answers equal the engine's, concurrent chats share a batch, limits, hot swap."""

import asyncio
from pathlib import Path

import pytest
import torch

from app.errors import ServiceError
from app.services.text import clean
from app.serving.inference import InferenceService, Limits, SamplingParams
from ml.checkpoint import save_checkpoint
from ml.engine import Engine
from ml.model import ModelConfig, Transformer
from ml.tokenizer import Tokenizer

TEXTS = ["Mira lives in Oslo.", "What is 3 plus 4? It is 7.", "Hello there, how are you?", "颜色 是 红色 🙂"] * 20
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, top_p=None)


def make_model_dir(path: Path, seed: int) -> Path:
    tokenizer = Tokenizer.train(TEXTS, vocab_size=300)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.tiny(vocab_size=tokenizer.vocab_size, max_seq_len=64))
    save_checkpoint(path, model, tokenizer)
    return path


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    return make_model_dir(root / "a", 0), make_model_dir(root / "b", 1)


def expected_text(directory: Path, messages: list[dict], max_tokens: int) -> str:
    from ml.checkpoint import load_checkpoint

    model, _ = load_checkpoint(directory)
    tokenizer = Tokenizer.load(directory)
    ids = tokenizer.render_prompt(messages)
    sample = Engine(model).generate(
        ids, n=1, max_new_tokens=max_tokens, temperature=0.0, stop_token_ids=set(tokenizer.stop_token_ids)
    )[0]
    return clean(tokenizer.decode(sample.token_ids, skip_special=True))


async def collect(service: InferenceService, messages: list[dict], params=GREEDY, user_id: int | None = None):
    parts, finish = [], None
    async for delta in service.stream(messages, params, user_id=user_id):
        parts.append(delta.text)
        finish = delta.finish_reason
    return "".join(parts), finish


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_concurrent_streams_each_get_their_own_answer(model_dirs) -> None:
    service = InferenceService()
    service.load(model_dirs[0])
    prompts = [f"question {i}: where does Mira live?" for i in range(8)]

    async def main():
        return await asyncio.gather(*(collect(service, chat(p)) for p in prompts))

    results = asyncio.run(main())
    service.close()
    for prompt, (text, finish) in zip(prompts, results, strict=True):
        assert text == expected_text(model_dirs[0], chat(prompt), GREEDY.max_tokens)
        assert finish in {"stop", "length"}


def test_past_the_kv_budget_answers_wait_their_turn_and_all_complete(model_dirs) -> None:
    per_token = 2 * 2 * 2 * 16 * 4  # keys and values x 2 layers x 2 kv heads x head_dim 16 x fp32
    service = InferenceService(Limits(kv_cache_mb=40 * per_token / 2**20))  # 40 positions: one answer at a time
    loaded = service.load(model_dirs[0])
    decoder, step, peak = loaded.decoder, loaded.decoder.step, {"reserved": 0, "rows": 0}

    def watched_step():
        peak["reserved"] = max(peak["reserved"], decoder.reserved_tokens)
        peak["rows"] = max(peak["rows"], len(decoder))
        return step()

    decoder.step = watched_step
    prompts = [f"question {i}: where does Mira live?" for i in range(4)]

    async def main():
        return await asyncio.gather(*(collect(service, chat(p)) for p in prompts))

    results = asyncio.run(main())
    service.close()
    assert decoder.max_kv_tokens == 40 and 0 < peak["reserved"] <= 40 and peak["rows"] == 1
    for prompt, (text, _) in zip(prompts, results, strict=True):
        assert text == expected_text(model_dirs[0], chat(prompt), GREEDY.max_tokens)


def test_leaving_early_cancels_the_generation(model_dirs) -> None:
    service = InferenceService()
    loaded = service.load(model_dirs[0])

    async def main():
        params = SamplingParams(max_tokens=50, temperature=1.0, seed=0)
        async for _ in service.stream(chat("tell me a long story"), params):
            break  # the client went away
        for _ in range(50):
            if len(loaded.decoder) == 0:
                return True
            await asyncio.sleep(0.05)
        return False

    assert asyncio.run(main()), "the generation kept running after the client left"
    service.close()


def test_limits_give_clear_errors(model_dirs) -> None:
    service = InferenceService(Limits(max_prompt_tokens=20, max_streams_per_user=1))

    async def no_model():
        return await collect(service, chat("hi"))

    with pytest.raises(ServiceError, match="no model") as info:
        asyncio.run(no_model())
    assert info.value.status_code == 503
    service.load(model_dirs[0])
    with pytest.raises(ServiceError, match="limit is 20") as info:
        asyncio.run(collect(service, chat("a very long message " * 20)))
    assert info.value.status_code == 413

    async def two_at_once():
        slow = SamplingParams(max_tokens=40, temperature=1.0)
        first = service.stream(chat("one"), slow, user_id=7)
        await first.__anext__()  # the first answer holds its slot while it is suspended, however fast it runs
        try:
            await collect(service, chat("two"), slow, user_id=7)
        finally:
            await first.aclose()

    with pytest.raises(ServiceError, match="at most 1") as info:
        asyncio.run(two_at_once())
    assert info.value.status_code == 429
    service.close()


def test_hot_swap_finishes_in_flight_requests_on_the_old_weights(model_dirs) -> None:
    old_dir, new_dir = model_dirs
    service = InferenceService()
    service.load(old_dir)
    params = SamplingParams(max_tokens=30, temperature=0.0, top_p=None)

    async def main():
        in_flight = asyncio.ensure_future(collect(service, chat("before the swap"), params))
        await asyncio.sleep(0.01)
        service.load(new_dir)
        after = await collect(service, chat("after the swap"), params)
        return await in_flight, after

    (before_text, _), (after_text, _) = asyncio.run(main())
    service.close()
    assert before_text == expected_text(old_dir, chat("before the swap"), 30)
    assert after_text == expected_text(new_dir, chat("after the swap"), 30)


def test_a_swap_while_eight_chats_stream_fails_none(model_dirs) -> None:
    old_dir, new_dir = model_dirs
    service = InferenceService()
    service.load(old_dir)
    params = SamplingParams(max_tokens=30, temperature=1.0, seed=1)

    async def main():
        streams = [asyncio.ensure_future(collect(service, chat(f"chat {i}"), params)) for i in range(8)]
        await asyncio.sleep(0.02)
        service.load(new_dir)  # mid-stream: the eight finish on the old weights
        after = await collect(service, chat("after"), params)
        return await asyncio.gather(*streams), after

    results, after = asyncio.run(main())
    service.close()
    assert len(results) == 8 and all(finish in {"stop", "length"} for _, finish in results)
    assert after[1] in {"stop", "length"} and service.current.name == new_dir.name
