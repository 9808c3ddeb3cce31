"""LoRA (ml/lora.py): adapters start as the base model and off give exactly its outputs, merge exactly, share the
frozen trunk without copies, save in the layout transformers + PEFT load, and every trainer lowers its loss with
them while the base weights stay as they were."""

import json
from pathlib import Path

import pytest
import torch

from ml import lora
from ml.checkpoint import load_checkpoint
from ml.model import ModelConfig, Transformer
from ml.train import dpo, reward, rl, sft
from tests.ml.test_rl import target_fraction

pytestmark = pytest.mark.usefixtures("one_thread")
SPEC = {"rank": 4, "alpha": 8.0}


def _tuned(config: ModelConfig, spec: lora.LoraSpec, seed: int = 0) -> Transformer:
    """A random model whose adapters hold random (non-zero) updates."""
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in lora.attach(model, spec):
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize(
    "targets", [lora.TARGETS, ("q_proj", "v_proj"), ("k_proj", "up_proj", "down_proj")], ids=["all", "qv", "mixed"]
)
def test_adapters_off_is_the_base_and_merging_is_exact(targets) -> None:
    config = ModelConfig.tiny(n_kv_head=2)
    torch.manual_seed(0)
    base = Transformer(config).eval()
    model = _tuned(config, lora.LoraSpec(4, 8.0, targets))
    model.load_state_dict(base.state_dict(), strict=False)  # the same base under the adapters
    idx = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        expected, _ = base(idx)
        tuned, _ = model(idx)
        with lora.adapters_off(model):
            off, _ = model(idx)
        merged = Transformer(config).eval()
        merged.load_state_dict(lora.merged_state_dict(model))
        assert torch.equal(off, expected)  # exactly: the reference is the trunk with adapters off
        assert (tuned - expected).abs().max() > 1e-3  # the adapters do change the model
        assert (merged(idx)[0] - tuned).abs().max() <= 1e-5
    untouched = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} - set(targets)
    assert all(n in untouched or n in targets for n in lora.TARGETS)


def test_a_fresh_adapter_changes_nothing_and_only_adapters_train() -> None:
    config = ModelConfig.tiny()
    torch.manual_seed(0)
    model = Transformer(config).eval()
    idx = torch.randint(0, config.vocab_size, (2, 10))
    before, _ = model(idx)
    trainable = lora.attach(model, lora.LoraSpec(rank=2))
    assert torch.equal(model(idx)[0], before)  # B starts at zero
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".adapter." in n for n in names)
    assert sum(p.numel() for p in trainable) < 0.2 * model.num_params()
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.attach(model, lora.LoraSpec())


def test_share_trunk_shares_tensors_and_keeps_its_own_head() -> None:
    model = _tuned(ModelConfig.tiny(), lora.LoraSpec(rank=2))
    reference = lora.share_trunk(model)
    critic = lora.share_trunk(model, scalar_head=True)
    for twin in (reference, critic):
        assert not lora.has_adapters(twin)
        assert twin.layers[0].attn.qkv_proj.weight.data_ptr() == model.layers[0].attn.qkv_proj.weight.data_ptr()
    assert lora.has_adapters(model)  # the source keeps its adapters
    idx = torch.randint(0, 256, (1, 8))
    with torch.no_grad(), lora.adapters_off(model):
        assert torch.equal(reference(idx)[0], model(idx)[0])
    assert critic(idx)[0].shape == (1, 8) and not critic.score_head.weight.any()
    with pytest.raises(ValueError, match="reward model's trunk"):
        lora.share_trunk(critic, scalar_head=False)


def test_spec_is_checked_by_name() -> None:
    assert lora.LoraSpec.from_dict(None) is None and lora.LoraSpec.from_dict({}) is None
    with pytest.raises(ValueError, match="targets"):
        lora.LoraSpec(targets=("qkv",))
    with pytest.raises(ValueError, match="rank"):
        lora.LoraSpec(rank=0)
    with pytest.raises(ValueError, match="unknown LoRA settings: dropout"):
        lora.LoraSpec.from_dict({"rank": 4, "dropout": 0.1})


def test_saved_adapter_loads_in_transformers_and_peft_with_the_same_logits(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from ml.hf import export_hf

    config = ModelConfig.tiny(vocab_size=97, n_kv_head=2, max_seq_len=32)
    torch.manual_seed(0)
    base = Transformer(config).eval()
    base.init_weights(std=0.2)
    model = _tuned(config, lora.LoraSpec(4, 8.0, ("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj")))
    model.load_state_dict(base.state_dict(), strict=False)
    export_hf(base, tmp_path / "base")
    lora.save_adapter(model, tmp_path / "adapter", base=str(tmp_path / "base"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base").float().eval()
    tuned_hf = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = torch.randint(0, 97, (3, 17))
    with torch.no_grad():
        ours, _ = model(ids)
        theirs = tuned_hf(input_ids=ids).logits
    assert (ours - theirs).abs().max() <= 1e-4
    # and back: the PEFT files attach to a fresh copy of the base with the same outputs
    again = Transformer(config).eval()
    again.load_state_dict(base.state_dict())
    assert lora.load_adapter(again, tmp_path / "adapter").rank == 4
    with torch.no_grad():
        assert (again(ids)[0] - ours).abs().max() <= 1e-6


# ------------------------------------------------------------------------------------------------ trainers


@pytest.fixture(scope="module")
def sharp_base(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base with its (tied) embedding 10x larger. A random 0.02-std head gives logits within about +-0.6 of
    each other whatever the normed hidden state, so adapters (which leave the head frozen, as everyone's do) could
    barely move the loss; a trained model's head has the range this one has."""
    from ml.checkpoint import save_checkpoint
    from ml.tokenizer import Tokenizer

    model, _ = load_checkpoint(tiny_base)
    with torch.no_grad():
        model.embed_tokens.weight.mul_(10)
    out = tmp_path_factory.mktemp("lora") / "base"
    return save_checkpoint(out, model, tokenizer=Tokenizer.load(tiny_base))


def _base_unchanged(out: Path, base_dir: Path, scalar: bool = False) -> None:
    """The saved model is base + adapter: its adapter/ loads onto the base and gives the saved (merged) model."""
    merged, meta = load_checkpoint(out)
    assert meta["lora"]["rank"] == SPEC["rank"] and (out / "adapter" / "adapter_config.json").exists()
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["task_type"] == ("SEQ_CLS" if scalar else "CAUSAL_LM") and cfg["base_model_name_or_path"]
    if scalar:
        return
    base, _ = load_checkpoint(base_dir)
    lora.load_adapter(base, out / "adapter")
    idx = torch.randint(0, base.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert (base(idx)[0] - merged(idx)[0]).abs().max() <= 1e-4


def test_lora_sft_lowers_the_heldout_loss_and_resumes(sharp_base: Path, tmp_path: Path) -> None:
    run = dict(base=str(sharp_base), demo_dialogues=300, batch_size=8, lr=1e-2, warmup=3, eval_every=0, lora=SPEC)
    metrics = sft.train(sft.SFTConfig(out=str(tmp_path / "sft"), steps=30, device="cpu", **run))
    assert metrics["val_loss"] < metrics["val_loss_start"] - 0.5, metrics
    _base_unchanged(tmp_path / "sft", sharp_base)
    # resume: the train state holds only what trains, and the run continues where it stopped
    state = torch.load(tmp_path / "sft" / "train_state.pt", weights_only=True)
    assert state["model"] and all(".adapter." in k for k in state["model"])
    whole = sft.train(sft.SFTConfig(out=str(tmp_path / "whole"), steps=8, device="cpu", **run))["losses"]

    def stop_after_4(info: dict) -> None:
        if info.get("step") == 4:
            raise KeyboardInterrupt

    cut = sft.SFTConfig(out=str(tmp_path / "cut"), steps=8, device="cpu", save_every=4, **run)
    with pytest.raises(KeyboardInterrupt):
        sft.train(cut, on_progress=stop_after_4)
    resumed = sft.train(sft.SFTConfig(out=str(tmp_path / "cut"), steps=8, device="cpu", resume=True, **run))
    assert resumed["losses"] == pytest.approx(whole[-len(resumed["losses"]) :], rel=1e-5)


def test_lora_reward_model_learns_the_preference(make_rankings, tiny_base: Path, tmp_path: Path) -> None:
    config = reward.RewardConfig(
        sft=str(tiny_base),
        out=str(tmp_path / "rm"),
        rankings=make_rankings(240, 0),
        steps=40,
        batch_size=8,
        lr=1e-2,
        warmup=4,
        eval_every=0,
        device="cpu",
        lora=SPEC,
    )
    metrics = reward.train(config)
    assert metrics["val_acc"] >= 0.8, metrics
    _base_unchanged(tmp_path / "rm", tiny_base, scalar=True)


def test_lora_dpo_raises_the_margin_against_the_shared_base(make_rankings, tiny_base: Path, tmp_path: Path) -> None:
    config = dpo.DPOConfig(
        policy=str(tiny_base),
        out=str(tmp_path / "dpo"),
        rankings=make_rankings(150, 0),
        steps=30,
        batch_size=8,
        lr=1e-2,
        warmup=3,
        eval_every=0,
        beta=0.1,
        device="cpu",
        lora=SPEC,
    )
    metrics = dpo.train(config)
    assert metrics["val_margin_start"] == 0.0  # the shared base is exactly the reference at the start
    assert metrics["val_margin"] > 0.3, metrics
    _base_unchanged(tmp_path / "dpo", tiny_base)


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_lora_rl_raises_a_programmatic_reward(sharp_base: Path, tmp_path: Path, algo: str) -> None:
    config = rl.RLConfig(
        policy=str(sharp_base),
        out=str(tmp_path / algo),
        algo=algo,
        steps=30,
        prompts_per_step=4,
        samples_per_prompt=4,
        max_new_tokens=12,
        lr=2e-2,
        kl_coef=0.01,
        minibatch_size=8,
        device="cpu",
        lora=SPEC,
    )
    tr = rl.build_trainer(config, target_fraction, torch.device("cpu"))
    ptr = tr.policy.layers[0].attn.qkv_proj.weight.data_ptr()
    assert tr.reference.layers[0].attn.qkv_proj.weight.data_ptr() == ptr  # no second copy of the base
    if algo == "ppo":
        assert lora.has_adapters(tr.value_model) and tr.value_model.layers[0].attn.qkv_proj.weight.data_ptr() == ptr
    metrics = rl.train(config, reward_fn=target_fraction)
    first, last = metrics["history"][:5], metrics["history"][-5:]
    assert sum(h["reward"] for h in last) / 5 > sum(h["reward"] for h in first) / 5 + 0.05, metrics["history"]
    _base_unchanged(tmp_path / algo, sharp_base)


def test_pretraining_refuses_lora(tmp_path: Path) -> None:
    from ml.train.pretrain import PretrainConfig

    with pytest.raises(ValueError, match="LoRA"):
        PretrainConfig(out=str(tmp_path / "x"), lora=SPEC).validate()


def test_a_second_round_continues_the_adapter_on_the_same_reference(sharp_base: Path, tmp_path: Path) -> None:
    run = dict(algo="grpo", prompts_per_step=2, samples_per_prompt=2, max_new_tokens=6, device="cpu", lora=SPEC)
    rl.train(
        rl.RLConfig(policy=str(sharp_base), out=str(tmp_path / "r1"), steps=2, lr=2e-2, **run),
        reward_fn=target_fraction,
    )
    config = rl.RLConfig(policy=str(tmp_path / "r1"), reference=str(sharp_base), out=str(tmp_path / "r2"), **run)
    tr = rl.build_trainer(config, target_fraction, torch.device("cpu"))
    assert tr.trunk == str(sharp_base)  # the trunk is the reference, not round 1's merged weights
    assert tr.reference.layers[0].attn.qkv_proj.weight.data_ptr() == tr.policy.layers[0].attn.qkv_proj.weight.data_ptr()
    round1, _ = load_checkpoint(tmp_path / "r1")
    base, _ = load_checkpoint(sharp_base)
    idx = torch.randint(0, base.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert (tr.policy(idx)[0] - round1(idx)[0]).abs().max() <= 1e-4  # it starts where round 1 ended
        assert torch.equal(tr.reference(idx)[0], base(idx)[0])


def test_a_bf16_trunk_with_fp32_adapters_trains_under_autocast() -> None:
    """The bf16 path (what a GPU runs): the frozen trunk in bf16, the adapters fp32 with fp32 gradients."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.tiny())
    with torch.no_grad():
        model.embed_tokens.weight.mul_(10)  # a head with range (see sharp_base)
    model.to(torch.bfloat16)
    lora.attach(model, lora.LoraSpec(rank=4))
    adapter = model.layers[0].attn.qkv_proj.adapter
    assert adapter.A.dtype == torch.float32 and model.layers[0].attn.qkv_proj.weight.dtype == torch.bfloat16
    x = torch.randint(0, 256, (2, 12))
    y = torch.roll(x, -1, dims=1)  # memorise this batch's next tokens
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, targets=y)[1]
        loss.backward()
        assert adapter.B.grad.dtype == torch.float32
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses
