"""Training records: bad input is an error naming the record; SFT masks cover assistant tokens only; packing keeps
examples apart; comparison batches put each candidate's score back in its ranking's slot."""

import json
from pathlib import Path

import pytest
import torch

from ml.examples import (
    IGNORE,
    Dialogue,
    SFTData,
    comparison_batch,
    encode_answer,
    encode_ranking,
    load_dialogues,
    load_prompts,
    load_rankings,
    load_thumbs,
    pack_examples,
    preference_pairs,
    thumb_rankings,
    tokenize_dialogue,
)
from ml.model import ModelConfig, Transformer

USER = {"role": "user", "content": "Where does Mira live?"}
GOOD = {"prompt": [USER], "answers": ["In Oslo.", "Oslo, I think.", "No idea."], "ranking": [1, 2, 3]}

pytestmark = pytest.mark.usefixtures("one_thread")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({**GOOD, "answers": ["In Oslo.", "Oslo", "   "]}, "answer 2 is empty"),
        ({**GOOD, "ranking": [1, 2]}, "missing or extra candidates: 3 answers but 2 ranks"),
        ({**GOOD, "order": [0, 1, 2]}, "give exactly one of 'ranking'"),
        ({"prompt": [USER], "answers": GOOD["answers"], "order": [0, [1, 0], 2]}, "duplicate candidate: answer 0"),
        ({"prompt": [USER], "answers": GOOD["answers"], "order": [2, 0]}, r"missing candidates: answers \[1\]"),
        ({**GOOD, "ranking": [1, 0, 2]}, "integer ranks >= 1"),
        ({**GOOD, "answers": ["only one"], "ranking": [1]}, "at least 2 answers"),
        ({**GOOD, "prompt": [{"role": "assistant", "content": "hi"}]}, "must end with a user message"),
        ({**GOOD, "prompt": [{"role": "robot", "content": "hi"}]}, "role in"),
    ],
)
def test_bad_rankings_name_the_record(tmp_path: Path, record: dict, message: str) -> None:
    path = write_jsonl(tmp_path / "r.jsonl", [GOOD, GOOD, record])
    with pytest.raises(ValueError, match=rf"r\.jsonl:3: .*{message}"):
        load_rankings(path)
    with pytest.raises(ValueError, match=rf"ranking #1: .*{message}"):
        load_rankings([GOOD, record])


def test_bad_dialogues_thumbs_and_files_name_the_record(tmp_path: Path) -> None:
    chat = {"messages": [USER, {"role": "assistant", "content": "In Oslo."}]}
    path = write_jsonl(tmp_path / "d.jsonl", [chat, "", {"messages": [USER]}])
    with pytest.raises(ValueError, match=r"d\.jsonl:3: the dialogue has no assistant turn"):
        load_dialogues(path)
    with pytest.raises(ValueError, match=r"dialogue #0: messages\[1\] is an empty assistant answer"):
        load_dialogues([{"messages": [USER, {"role": "assistant", "content": " "}]}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        load_dialogues(write_jsonl(tmp_path / "bad.jsonl", [chat, "{oops"]))
    with pytest.raises(ValueError, match=r"empty\.jsonl: no records"):
        load_dialogues(write_jsonl(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(FileNotFoundError):
        load_dialogues(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match=r"thumb #0: 'completion' is empty"):
        load_thumbs([{"prompt": "Hi", "completion": "", "label": True}])
    with pytest.raises(ValueError, match=r"thumb #1: 'label' must be"):
        load_thumbs(
            [{"prompt": "Hi", "completion": "a", "label": "up"}, {"prompt": "Hi", "completion": "b", "label": 0}]
        )
    with pytest.raises(ValueError, match=r"prompt #0: the messages must end with a user message"):
        load_prompts([{"messages": [USER, {"role": "assistant", "content": "In Oslo."}]}])


def test_good_records_parse_in_every_accepted_form() -> None:
    [r] = load_rankings([{"prompt": "Hi?", "candidates": ["a", "b", "c"], "order": [[2, 0], 1]}])
    assert r.ranks == [1, 2, 1] and r.prompt == [{"role": "user", "content": "Hi?"}]
    thumbs = load_thumbs(
        [
            {"prompt": "Hi?", "completion": "a", "label": True},
            {"prompt": "Hi?", "answer": "b", "label": -1},
            {"prompt": "Hi?", "completion": "c", "label": "down"},
            {"prompt": "Other?", "completion": "d", "label": 1},
        ]
    )
    assert [t.label for t in thumbs] == [True, False, False, True]
    [pair_ranking] = thumb_rankings(thumbs)  # only "Hi?" has both an up and a down answer
    assert pair_ranking.answers == ["a", "b", "c"] and pair_ranking.ranks == [1, 2, 2]
    assert preference_pairs([pair_ranking]) == [(pair_ranking.prompt, "a", "b"), (pair_ranking.prompt, "a", "c")]
    assert len(load_prompts([[USER], {"prompt": "Hi?"}])) == 2


def test_sft_targets_are_the_assistant_tokens_of_every_turn(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    messages = [
        {"role": "system", "content": "Be kind."},
        USER,
        {"role": "assistant", "content": "In Oslo."},
        {"role": "user", "content": "And Omar?"},
        {"role": "assistant", "content": "In Lima."},
    ]
    x, y = tokenize_dialogue(tok, Dialogue(messages, "test"), max_len=128)
    trained = y[y != IGNORE].tolist()
    assert trained == [*tok.encode("In Oslo."), tok.end_id, *tok.encode("In Lima."), tok.end_id]
    assert torch.equal(x[1:], torch.tensor(tok.render_conversation(messages)[0])[1:-1])


def test_packing_never_lets_one_example_attend_to_another(tiny_tokenizer) -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.tiny(vocab_size=tiny_tokenizer.vocab_size)).eval()
    chats = [
        [USER, {"role": "assistant", "content": "In Oslo."}],
        [{"role": "user", "content": "What is 3 plus 4?"}, {"role": "assistant", "content": "7."}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    ]
    examples = [tokenize_dialogue(tiny_tokenizer, Dialogue(c, str(i)), 64) for i, c in enumerate(chats)]
    packed = pack_examples(examples, block_size=64, pad_id=0)
    assert packed["x"].shape == (1, 64)  # all three share one row
    with torch.no_grad():
        logits, _ = model(packed["x"], doc_ids=packed["doc_ids"])
        at = 0
        for x, y in examples:
            alone, _ = model(x[None])
            torch.testing.assert_close(logits[0, at : at + len(x)], alone[0], atol=1e-5, rtol=1e-4)
            assert torch.equal(packed["y"][0, at : at + len(x)], y)
            at += len(x)
    assert (packed["y"][0, at:] == IGNORE).all()


def test_sft_data_batches(tiny_tokenizer) -> None:
    dialogues = load_dialogues([[USER, {"role": "assistant", "content": f"Answer {i}."}] for i in range(10)])
    g = torch.Generator().manual_seed(0)
    padded = SFTData(dialogues, tiny_tokenizer, max_len=64, heldout_fraction=0.2).get_batch("train", 3, g)
    assert padded["x"].shape == padded["y"].shape and padded["x"].size(0) == 3 and "doc_ids" not in padded
    packed = SFTData(dialogues, tiny_tokenizer, max_len=64, packing=True)
    assert packed.get_batch("train", 2, g)["doc_ids"].shape == (2, 64)
    long = load_dialogues([[{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": "y"}]] * 2)
    with pytest.raises(ValueError, match=r"dialogue #[01]: no assistant token within the first 64 tokens"):
        SFTData(long, tiny_tokenizer, max_len=64)


def test_comparison_batch_scores_the_last_token_and_returns_to_the_slots(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    ids, mask = encode_answer(tok, [USER], "In Oslo.", max_len=128)
    assert ids[-1] == tok.end_id and [i for i, m in zip(ids, mask, strict=True) if m] == [
        *tok.encode("In Oslo."),
        tok.end_id,
    ]
    rankings = load_rankings([GOOD, {**GOOD, "answers": ["A.", "B."], "ranking": [2, 1]}])
    batch = comparison_batch([encode_ranking(tok, r, 128) for r in rankings], pad_id=0)
    assert batch.ranks.tolist() == [[1, 2, 3], [2, 1, 0]]
    seqs = batch.sequences
    assert seqs.input_ids.size(0) == 5
    assert all(seqs.input_ids[i, seqs.last_index[i]] == tok.end_id for i in range(5))
    grid = batch.grid(torch.arange(1.0, 6.0))
    assert grid.tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]]


def test_thumbs_read_the_exported_format_with_the_answer_as_one_assistant_message() -> None:
    exported = {"prompt": [USER], "completion": [{"role": "assistant", "content": "In Oslo."}], "label": False}
    [thumb] = load_thumbs([exported])
    assert (thumb.prompt, thumb.completion, thumb.label) == ([USER], "In Oslo.", False)
    for completion in ([], [{"role": "user", "content": "x"}], [{"role": "assistant", "content": " "}]):
        with pytest.raises(ValueError, match=r"thumb #0: 'completion' is empty or not a string"):
            load_thumbs([{**exported, "completion": completion}])
