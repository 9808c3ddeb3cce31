"""Rollouts for RL and evaluation: sample n answers per prompt with the engine, lay them out as one tensor batch,
and recompute their log-probabilities (and entropies) under any model with the same sampling transform.

Layout: prompts left-padded to a common length P, answers right-padded to R, so every answer starts at column P:

    [pad pad <|bos|> <|user|> ... <|assistant|>] [tok tok tok <|end|> pad pad]
     <----------------- P ------------------->    <------------ R ----------->

`logprobs` applies the engine's own `transform_logits` (temperature, then top-k, then top-p) to every model it scores
with, so the policy's ratio, the reference's log-probs and the KL are all taken under the distribution that actually
sampled the answer. A reference that cuts a sampled token (top-k/top-p of a different model) would give -inf;
that log-prob is floored at LOGPROB_FLOOR so one token cannot make the KL infinite.

Try it on CPU:  python -m ml.train.rollout
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ml.engine import Engine, Sampling, transform_logits
from ml.examples import Message
from ml.tokenizer import Tokenizer
from ml.train.losses import entropy_from_logits

LOGPROB_FLOOR = -30.0


@dataclass
class Rollout:
    """N = prompts * n sampled answers, prompt-major (the n answers of a prompt are adjacent)."""

    prompts: list[list[Message]]  # (N) the conversation each answer continues
    input_ids: Tensor  # (N, P + R)
    attention_mask: Tensor  # (N, P + R) bool, True on real tokens
    prompt_len: int  # P
    sample_logprobs: Tensor  # (N, R) as the engine reported them while sampling (0 on padding)
    finished: Tensor  # (N,) bool: the answer ended with a stop token (not cut by the length limit)

    @property
    def response_mask(self) -> Tensor:
        return self.attention_mask[:, self.prompt_len :]  # (N, R)

    @property
    def response_ids(self) -> Tensor:
        return self.input_ids[:, self.prompt_len :]  # (N, R)

    def answers(self) -> list[list[int]]:
        """Each answer's token ids (with its stop token, if any)."""
        return [ids[m].tolist() for ids, m in zip(self.response_ids, self.response_mask, strict=True)]

    def sequences(self) -> list[list[int]]:
        """Each prompt + answer as one unpadded id list."""
        return [ids[m].tolist() for ids, m in zip(self.input_ids, self.attention_mask, strict=True)]

    def select(self, rows: Tensor) -> Rollout:
        """A sub-batch (for minibatches)."""
        prompts = [self.prompts[i] for i in rows.tolist()]
        return Rollout(
            prompts,
            self.input_ids[rows],
            self.attention_mask[rows],
            self.prompt_len,
            self.sample_logprobs[rows],
            self.finished[rows],
        )


@torch.no_grad()
def collect(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: list[list[Message]],
    n: int,
    max_new_tokens: int,
    sampling: Sampling,
    seed: int | None = None,
) -> Rollout:
    """Sample n answers to each prompt (stopping at the tokenizer's stop tokens) and lay them out as a Rollout."""
    model.eval()
    prompt_ids = [tokenizer.render_prompt(p) for p in prompts]
    stops = set(tokenizer.stop_token_ids)
    samples = Engine(model).generate(
        prompt_ids,
        n=n,
        max_new_tokens=max_new_tokens,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        stop_token_ids=stops,
        seed=seed,
    )
    P = max(len(p) for p in prompt_ids)
    R = max(1, max(len(s.token_ids) for s in samples))
    N = len(samples)
    device = next(model.parameters()).device
    input_ids = torch.full((N, P + R), int(tokenizer.pad_id or 0), dtype=torch.long)
    mask = torch.zeros((N, P + R), dtype=torch.bool)
    sample_logprobs = torch.zeros((N, R))
    for i, s in enumerate(samples):
        p = prompt_ids[i // n]
        input_ids[i, P - len(p) : P] = torch.tensor(p)
        input_ids[i, P : P + len(s.token_ids)] = torch.tensor(s.token_ids, dtype=torch.long)
        mask[i, P - len(p) : P + len(s.token_ids)] = True
        sample_logprobs[i, : len(s.logprobs)] = torch.tensor(s.logprobs)
    finished = torch.tensor([s.finish_reason == "stop" for s in samples])
    all_prompts = [prompts[i // n] for i in range(N)]
    return Rollout(all_prompts, input_ids.to(device), mask.to(device), P, sample_logprobs.to(device), finished)


def logprobs(
    model: nn.Module, rollout: Rollout, sampling: Sampling, with_entropy: bool = False
) -> tuple[Tensor, Tensor | None]:
    """(N, R) log-probs of the rollout's answer tokens under `model` and the sampling transform (0 on padding),
    and optionally (N, R) entropies of that transformed distribution. Differentiable when grad is enabled."""
    P = rollout.prompt_len
    hidden = model.hidden_states(rollout.input_ids, attention_mask=rollout.attention_mask)  # (N, P + R, D)
    logits = model.lm_head(hidden[:, P - 1 : -1])  # (N, R, V): the head only where answer tokens are predicted
    logits = transform_logits(logits.float(), sampling.temperature, sampling.top_k, sampling.top_p)
    logp = logits.log_softmax(dim=-1).gather(-1, rollout.response_ids.unsqueeze(-1)).squeeze(-1)  # (N, R)
    mask = rollout.response_mask
    logp = logp.clamp(min=LOGPROB_FLOOR).masked_fill(~mask, 0.0)
    entropy = entropy_from_logits(logits).masked_fill(~mask, 0.0) if with_entropy else None
    return logp, entropy


def values(value_model: nn.Module, rollout: Rollout) -> Tensor:
    """(N, R) value estimates: the value of answer token t is read at the position before it (the state that
    chose it). 0 on padding."""
    P = rollout.prompt_len
    v, _ = value_model(rollout.input_ids, attention_mask=rollout.attention_mask)  # (N, P + R)
    return v[:, P - 1 : -1].float().masked_fill(~rollout.response_mask, 0.0)


if __name__ == "__main__":
    from ml.demo.world import World
    from ml.model import ModelConfig, Transformer

    world = World(0)
    tok = Tokenizer.train(world.pretraining_corpus(200), vocab_size=400)
    policy = Transformer(ModelConfig.tiny(vocab_size=tok.vocab_size))
    ro = collect(policy, tok, [p.messages for p in world.prompts(2)], n=2, max_new_tokens=8, sampling=Sampling(0.8, 50))
    with torch.no_grad():
        lp, ent = logprobs(policy, ro, Sampling(0.8, 50), with_entropy=True)
    print("shape", tuple(ro.input_ids.shape), "P", ro.prompt_len)
    print("max |engine - recomputed| log-prob", float((lp - ro.sample_logprobs).abs().max()))
