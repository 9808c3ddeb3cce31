"""The demo experiment: a tiny but real run of the whole pipeline (pretrain -> SFT -> sampled candidates ->
simulated annotators -> reward model -> PPO -> held-out gold evaluation) at a fixed seed, plus its data checks."""

import argparse
import json
import math
import random
from pathlib import Path

import pytest

from ml.demo.experiment import (
    ExperimentConfig,
    add_arguments,
    annotate,
    format_report,
    main,
    merge_label_stats,
    run_experiment,
    summarize,
)
from ml.demo.world import SimulatedAnnotator, World
from ml.examples import load_rankings, load_thumbs
from ml.train import reward
from ml.train.reward import RewardConfig


def test_tiny_experiment_runs_every_stage_and_each_does_its_job(tmp_path: Path) -> None:
    """Every stage does its own job at this size: pretraining beats the unigram model, SFT lowers its loss, the
    reward model orders held-out pairs better than chance, RL raises the reward it is given. Whether RL also raises
    gold is a claim about the quick and full scales (README, three seeds each): at this size it is a coin flip that
    flipped with the machine (CI measured gold 0.146 -> 0.133 on seed 0 where this machine measured 0.117 -> 0.163),
    so it is not asserted here."""
    seen: set[str] = set()
    result = run_experiment(
        ExperimentConfig(out=str(tmp_path / "exp"), scale="tiny", seed=0), on_progress=lambda i: seen.add(i["stage"])
    )
    stages = result["stages"]
    assert stages["pretrain"]["val_loss"] < stages["pretrain"]["unigram_entropy"], stages["pretrain"]
    assert stages["sft"]["val_loss"] < stages["sft"]["val_loss_start"], stages["sft"]
    assert result["rm_acc"] > 0.5, stages["reward"]  # the reward model learned something true
    assert stages["rl-ppo"]["reward_last"] > stages["rl-ppo"]["reward_first"], stages["rl-ppo"]
    assert set(result["policies"]) == {"sft", "rl-ppo"}
    assert all(0 <= policy["gold"] <= 1 for policy in result["policies"].values()), result["policies"]
    assert 0 <= result["kl"] < 50 and math.isfinite(result["kl"])
    assert {"pretrain", "sft", "sample", "reward", "rl-ppo", "evaluate"} <= seen
    report = format_report(result).splitlines()
    assert report[-1].startswith("demo_flywheel: gold_sft=") and " seconds=" in report[-1]
    saved = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert saved["gold_rl"] == pytest.approx(result["gold_rl"])


def test_annotations_go_through_the_record_checks(tmp_path: Path) -> None:
    world = World(0)
    q = world.questions[3]
    prompt = [{"role": "user", "content": q.text}]
    rng = random.Random(0)
    sets = [(prompt, [world.answer(q, quality, rng) for quality in ("good", "rude", "wrong", "rambling")])] * 3
    rankings, thumbs, stats = annotate(world, sets, ExperimentConfig(noise=0.0), tmp_path / "data")
    loaded = load_rankings([rankings])
    assert [r.ranks for r in loaded] == [SimulatedAnnotator(world, 0.0).rank(prompt, sets[0][1])] * 3
    assert len(load_thumbs([thumbs])) == 3 and stats["annotator_agreement"] == 1.0


def test_a_bad_ranking_line_is_skipped_and_named_and_only_bad_lines_stop_the_reward_stage(
    tmp_path: Path, tiny_base: Path
) -> None:
    """Issue #16: a bad row no longer stops the stage (it did, naming the line); it is skipped, counted and named,
    and the stage stops, naming it, only when no usable row is left."""
    good = {"prompt": "Where does Mira live?", "answers": ["Oslo.", "Paris."], "ranking": [1, 2]}
    lines = [good, {**good, "answers": ["Oslo.", ""]}, good]
    path = tmp_path / "rankings.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    metrics = reward.train(RewardConfig(sft=str(tiny_base), out=str(tmp_path / "rm"), rankings=[path], steps=1))
    assert metrics["skipped_empty"] == 1 and "rankings.jsonl:2: answer 1 is empty" in metrics["skipped"]
    assert metrics["train_rankings"] + metrics["heldout_rankings"] == 2
    path.write_text(json.dumps(lines[1]) + "\n")
    with pytest.raises(ValueError, match=r"rankings\.jsonl:1: answer 1 is empty"):
        reward.train(RewardConfig(sft=str(tiny_base), out=str(tmp_path / "rm2"), rankings=[path], steps=1))


def test_cli_rejects_bad_flags_with_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = ["--quick", "--algo", "grpo", "rloo", "--dpo", "--rl-steps", "5", "--seed", "2", "--rounds", "3"]
    args = parser.parse_args(flags)
    config = ExperimentConfig(**{k: v for k, v in vars(args).items() if k in ExperimentConfig.__dataclass_fields__})
    assert config.algos == ["grpo", "rloo"] and config.dpo and config.resolved_scale().rl_steps == 5
    assert config.rounds == 3
    assert (config.resolved_scale().label_sets, config.resolved_scale().kl_coef) == (1, 0.5)  # quick's own
    assert ExperimentConfig(scale="tiny").resolved_scale().kl_coef == 0.1
    assert ExperimentConfig(label_sets=3, kl_coef=0.2).resolved_scale().label_sets == 3
    assert ExperimentConfig(kl_coef=0.2).resolved_scale().kl_coef == 0.2
    assert config.resolved_scale().sft_steps == ExperimentConfig(quick=True).resolved_scale().sft_steps
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    assert main(parser.parse_args(["--out", str(tmp_path / "busy"), "--no-progress"])) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main(parser.parse_args(["--noise", "-1", "--no-progress"])) == 2
    assert main(parser.parse_args(["--rounds", "0", "--no-progress"])) == 2
    assert "--rounds must be at least 1" in capsys.readouterr().err
    assert main(parser.parse_args(["--label-sets", "0", "--no-progress"])) == 2
    assert "--label-sets must be at least 1" in capsys.readouterr().err
    assert main(parser.parse_args(["--kl-coef", "-0.1", "--no-progress"])) == 2
    assert "--kl-coef must be >= 0" in capsys.readouterr().err


def test_label_stats_of_several_sets_sum_counts_and_weigh_rates() -> None:
    parts = [
        {"rankings": 30, "thumbs": 30, "thumbs_up": 0.2, "annotator_agreement": 0.9},
        {"rankings": 10, "thumbs": 10, "thumbs_up": 0.6, "annotator_agreement": 0.5},
    ]
    merged = merge_label_stats(parts)
    assert merged["rankings"] == 40 and merged["thumbs"] == 40
    assert merged["thumbs_up"] == pytest.approx(0.3) and merged["annotator_agreement"] == pytest.approx(0.8)


def test_summary_over_seeds_is_mean_and_sample_std(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def run(seed: int, sft: float, ppo: float, rm: float) -> dict:
        policy = {"gold_greedy": 0.5, "kl": 2.0, "response_len": 10.0}
        return {
            "config": {"seed": seed},
            "seconds": 600.0,
            "rm_acc": rm,
            "policies": {"sft": {**policy, "gold": sft}, "rl-ppo": {**policy, "gold": ppo}},
            "stages": {"reward": {"rm_acc_gold": rm}, "annotate": {"annotator_agreement": 0.9}},
        }

    runs = [run(0, 0.2, 0.4, 0.8), run(1, 0.3, 0.4, 0.9)]
    table = summarize(runs).splitlines()
    ppo = next(line for line in table if line.startswith("rl-ppo"))
    assert "0.400 ± 0.000" in ppo and "0.150 ± 0.071" in ppo  # gains 0.2 and 0.1: mean 0.15, sample std 0.0707
    assert any("accuracy against gold: 0.850 ± 0.071 (first round), 0.850 ± 0.071" in line for line in table)
    for i, r in enumerate(runs):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "results.json").write_text(json.dumps(r))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert main(parser.parse_args(["--summarize", str(tmp_path / "0"), str(tmp_path / "1")])) == 0
    assert "seeds [0, 1]" in capsys.readouterr().out
    assert main(parser.parse_args(["--summarize", str(tmp_path / "missing")])) == 2
    assert "results.json" in capsys.readouterr().err
