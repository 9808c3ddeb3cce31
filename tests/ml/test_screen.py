"""ml.screen and the trainers that use it: bad rows are skipped and counted by reason, the good ones train, and only a
data set with nothing usable left fails, saying why (issue #16, "No bad row stops a job")."""

import json
from pathlib import Path

import pytest

from ml.demo.world import World
from ml.screen import answers_fit, dialogue_fits, prompt_fits, screen, skip_metrics
from ml.tokenizer import Tokenizer
from ml.train import dpo, pretrain, reward, rl, sft

pytestmark = pytest.mark.usefixtures("one_thread")

USER, ANSWER = {"role": "user", "content": "Where does Mira live?"}, {"role": "assistant", "content": "In Oslo."}
LONG = {"role": "user", "content": "Mira lives in Oslo and has a red cat. " * 60}  # hundreds of tokens: over 128
ONE_STEP = dict(steps=1, batch_size=2, eval_every=0, device="cpu")


def bad_dialogues() -> list:
    return [
        [USER],  # no assistant turn
        [USER, {"role": "assistant", "content": "  "}],  # an empty answer
        [LONG, ANSWER],  # the answer lies past the model's context
        [{"role": "robot", "content": "beep"}, ANSWER],  # a role that is not one
        [USER, {"role": "assistant", "content": 7}],  # not text
        {"text": "no messages"},  # malformed
    ]


BAD_DIALOGUE_COUNTS = {
    "skipped_no_answer": 1,
    "skipped_empty": 1,
    "skipped_too_long": 1,
    "skipped_wrong_roles": 1,
    "skipped_non_text": 1,
    "skipped_malformed": 1,
}


def bad_rankings() -> list:
    good = {"prompt": [USER], "answers": ["In Oslo.", "In Paris."], "ranking": [1, 2]}
    return [
        {**good, "ranking": [1, 1]},  # a tie: nothing to compare
        {**good, "answers": ["In Oslo.", ""]},  # an empty answer
        {**good, "answers": ["In Oslo.", "Oslo " * 400]},  # an answer that fills the whole context
        {**good, "prompt": [USER, ANSWER]},  # a prompt that does not end with the user
        {**good, "answers": ["In Oslo."]},  # malformed: one answer
    ]


BAD_RANKING_COUNTS = {
    "skipped_tie": 1,
    "skipped_empty": 1,
    "skipped_too_long": 1,
    "skipped_wrong_roles": 1,
    "skipped_malformed": 1,
}


def bad_thumbs() -> list:
    good = {"prompt": [USER], "completion": "In Oslo.", "label": True}
    return [{**good, "completion": ""}, {**good, "label": "maybe"}, {**good, "completion": ["not", "text"]}]


def test_screen_keeps_good_rows_and_counts_each_bad_one_by_reason(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    good = [{"messages": [USER]}, [USER]]
    bad = [[LONG], [], [ANSWER], [{"role": "user", "content": None}], 5]
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "Hi?"}) + "\n{oops\n")
    screened = screen([*good, *bad, path], "prompt", prompt_fits(tiny_tokenizer, 128, 48))
    assert [p.messages for p in screened.kept] == [[USER], [USER], [{"role": "user", "content": "Hi?"}]]
    assert screened.counts() == {"too_long": 1, "empty": 1, "wrong_roles": 1, "non_text": 1, "malformed": 2}
    assert screened.skipped["malformed"] == ["prompt #6", f"{path}:2"]
    metrics = skip_metrics(screened)
    assert metrics["skipped_too_long"] == 1 and metrics["skipped_malformed"] == 2
    assert metrics["skipped"].startswith("skipped 6 of 9 prompts: ")
    assert "too_long 1 (prompt #2: the prompt leaves no room to answer" in metrics["skipped"]

    dialogues = screen([[USER, ANSWER], *bad_dialogues()], "dialogue", dialogue_fits(tiny_tokenizer, 128))
    assert len(dialogues.kept) == 1 and skip_metrics(dialogues) | {"skipped": ""} == BAD_DIALOGUE_COUNTS | {
        "skipped": ""
    }
    rankings = screen(bad_rankings(), "ranking", answers_fit(tiny_tokenizer, 128))
    assert rankings.kept == [] and {f"skipped_{k}": n for k, n in rankings.counts().items()} == BAD_RANKING_COUNTS
    thumbs = screen(bad_thumbs(), "thumb", answers_fit(tiny_tokenizer, 128))
    assert thumbs.counts() == {"empty": 1, "malformed": 1, "non_text": 1}
    assert skip_metrics(screen([[USER]], "prompt")) == {}  # nothing skipped: nothing reported


def test_only_bad_rows_fail_naming_each_reason() -> None:
    screened = screen([[], [ANSWER]], "prompt")
    with pytest.raises(ValueError, match=r"no usable prompts: empty 1 \(prompt #0: .*\), wrong_roles 1 \(prompt #1"):
        screened.require()


def test_sft_trains_on_the_good_dialogues_and_reports_the_bad(tiny_base: Path, tmp_path: Path) -> None:
    good = [[{"role": "user", "content": f"Question {i}?"}, ANSWER] for i in range(6)]
    config = sft.SFTConfig(base=str(tiny_base), out=str(tmp_path / "sft"), data=good + bad_dialogues(), **ONE_STEP)
    metrics = sft.train(config)
    assert {k: metrics[k] for k in BAD_DIALOGUE_COUNTS} == BAD_DIALOGUE_COUNTS
    assert (
        metrics["train_dialogues"] + metrics["heldout_dialogues"] == 6
        and "skipped 6 of 12 dialogues" in (metrics["skipped"])
    )
    with pytest.raises(ValueError, match=r"no usable dialogues: empty 1 .*no_answer 1 .*too_long 1"):
        sft.train(sft.SFTConfig(base=str(tiny_base), out=str(tmp_path / "none"), data=bad_dialogues(), **ONE_STEP))


def test_reward_trains_on_the_good_rankings_and_thumbs_and_reports_the_bad(
    make_rankings, tiny_base: Path, tmp_path: Path
) -> None:
    config = reward.RewardConfig(
        sft=str(tiny_base),
        out=str(tmp_path / "rm"),
        rankings=make_rankings(8, 0) + bad_rankings(),
        thumbs=bad_thumbs(),
        **ONE_STEP,
    )
    metrics = reward.train(config)
    assert metrics["train_rankings"] + metrics["heldout_rankings"] == 8 and metrics["train_thumbs"] == 0
    assert metrics["skipped_tie"] == 1 and metrics["skipped_too_long"] == 1
    assert metrics["skipped_empty"] == 2 and metrics["skipped_malformed"] == 2  # a ranking and a thumb each
    config = reward.RewardConfig(
        sft=str(tiny_base), out=str(tmp_path / "none"), rankings=bad_rankings(), thumbs=bad_thumbs(), **ONE_STEP
    )
    with pytest.raises(ValueError, match=r"no usable rankings or thumbs: rankings: .*tie 1 .*; thumbs: empty 1"):
        reward.train(config)


@pytest.mark.parametrize("algo", ["dpo", "kto"])
def test_dpo_and_kto_train_on_the_good_rows_and_report_the_bad(
    algo: str, make_rankings, tiny_base: Path, tmp_path: Path
) -> None:
    data = {"rankings": make_rankings(6, 0) + bad_rankings()}
    if algo == "kto":
        good = [{"prompt": [USER], "completion": a, "label": i % 2 == 0} for i, a in enumerate(["Oslo.", "Paris."] * 3)]
        data = {"thumbs": good + bad_thumbs()}
    config = dpo.DPOConfig(policy=str(tiny_base), out=str(tmp_path / algo), algo=algo, **data, **ONE_STEP)
    metrics = dpo.train(config)
    assert metrics["train_items"] > 0
    expected = BAD_RANKING_COUNTS if algo == "dpo" else {"skipped_empty": 1, "skipped_malformed": 1}
    assert {k: metrics[k] for k in expected} == expected
    bad = {"rankings": bad_rankings()} if algo == "dpo" else {"thumbs": bad_thumbs()}
    nothing = "pairs" if algo == "dpo" else "examples"
    with pytest.raises(ValueError, match=rf"no training {nothing} in the data: .*empty 1"):
        dpo.train(dpo.DPOConfig(policy=str(tiny_base), out=str(tmp_path / "none"), algo=algo, **bad, **ONE_STEP))


def gold(prompts, answers) -> list[float]:
    return [float(len(a)) for a in answers]


def test_rl_skips_a_prompt_longer_than_the_context_instead_of_failing(tiny_base: Path, tmp_path: Path) -> None:
    """The issue's case: one long chat message in the training prompts made every rl job fail with `prompt #460: the
    prompt leaves no room to answer within 128 tokens`. Now it is skipped and counted."""
    prompts = [{"messages": p.messages} for p in World(0).prompts(4)] + [{"messages": [LONG]}, {"messages": []}]
    run = dict(steps=1, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=4, device="cpu")
    config = rl.RLConfig(policy=str(tiny_base), out=str(tmp_path / "rl"), prompts=prompts, **run)
    metrics = rl.train(config, reward_fn=gold)
    assert metrics["skipped_too_long"] == 1 and metrics["skipped_empty"] == 1
    assert "too_long 1 (prompt #4: the prompt leaves no room to answer" in metrics["skipped"]
    config = rl.RLConfig(policy=str(tiny_base), out=str(tmp_path / "none"), prompts=[{"messages": [LONG]}], **run)
    with pytest.raises(ValueError, match=r"no usable prompts: too_long 1 \(prompt #0: the prompt leaves no room"):
        rl.train(config, reward_fn=gold)


def test_pretrain_skips_bad_lines_and_fails_only_on_nothing(tmp_path: Path) -> None:
    docs = [json.dumps({"text": t}) for t in World(0).pretraining_corpus(40)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join([*docs, "{oops", json.dumps({"text": "  "}), json.dumps({"text": 3})]) + "\n")
    run = dict(vocab_size=300, block_size=32, n_layer=1, n_embd=32, n_head=2, eval_batches=1, **ONE_STEP)
    metrics = pretrain.train(pretrain.PretrainConfig(out=str(tmp_path / "base"), data=[str(path)], **run))
    assert (metrics["skipped_malformed"], metrics["skipped_empty"], metrics["skipped_non_text"]) == (1, 1, 1)
    assert f"{path}:41: expected a JSON object" in metrics["skipped"]
    path.write_text("{oops\n")
    with pytest.raises(ValueError, match=r"no usable documents: malformed 1"):
        pretrain.train(pretrain.PretrainConfig(out=str(tmp_path / "none"), data=[str(path)], **run))
