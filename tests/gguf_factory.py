"""A tiny random Llama as a GGUF file, written with the `gguf` package: what llama.cpp's converter would write.

F32 tensors under llama.cpp's names, the model's shape under `llama.*` keys, and a byte-level BPE tokenizer (the
"gpt2" kind, as SmolLM2 and Llama 3 files have) with ChatML special tokens and a ChatML chat template. Callers
skip when `gguf` is not installed (`pytest.importorskip("gguf")`) before calling this.
"""

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from tests.factories import TINY_TEXTS

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SHAPE = {"n_layer": 2, "n_embd": 32, "n_head": 4, "n_kv_head": 2, "intermediate_size": 64, "context": 256}


def byte_level_bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(TINY_TEXTS, trainer=trainer)
    return tokenizer


def random_llama_tensors(vocab: int, seed: int, qkv_bias: bool = False) -> dict[str, np.ndarray]:
    """llama.cpp tensor names -> random fp32 arrays, each shaped (out, in) like the torch weight it becomes."""
    rng = np.random.default_rng(seed)
    d, hd, ff = SHAPE["n_embd"], SHAPE["n_embd"] // SHAPE["n_head"], SHAPE["intermediate_size"]
    kv = SHAPE["n_kv_head"] * hd
    shapes = {"token_embd.weight": (vocab, d), "output_norm.weight": (d,), "output.weight": (vocab, d)}
    for i in range(SHAPE["n_layer"]):
        shapes |= {
            f"blk.{i}.{name}.weight": shape
            for name, shape in [
                ("attn_norm", (d,)),
                ("attn_q", (d, d)),
                ("attn_k", (kv, d)),
                ("attn_v", (kv, d)),
                ("attn_output", (d, d)),
                ("ffn_norm", (d,)),
                ("ffn_gate", (ff, d)),
                ("ffn_up", (ff, d)),
                ("ffn_down", (d, ff)),
            ]
        }
        if qkv_bias:  # Qwen2
            shapes |= {f"blk.{i}.attn_{p}.bias": (n,) for p, n in (("q", d), ("k", kv), ("v", kv))}
    return {
        name: (
            1 + 0.1 * rng.standard_normal(shape) if name.endswith("norm.weight") else 0.2 * rng.standard_normal(shape)
        ).astype(np.float32)
        for name, shape in shapes.items()
    }


def write_tiny_llama_gguf(path: Path, seed: int = 0, architecture: str = "llama") -> Path:
    """Write a random 2-layer Llama (GQA, untied lm_head; with q/k/v biases if `architecture` is "qwen2") with a
    ChatML BPE tokenizer to `path`. Any other architecture name writes the same tensors under that name."""
    import gguf

    tokenizer = byte_level_bpe()
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tokenizer.to_str())["model"]["merges"]]
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny llama")
    writer.add_block_count(SHAPE["n_layer"])
    writer.add_context_length(SHAPE["context"])
    writer.add_embedding_length(SHAPE["n_embd"])
    writer.add_feed_forward_length(SHAPE["intermediate_size"])
    writer.add_head_count(SHAPE["n_head"])
    writer.add_head_count_kv(SHAPE["n_kv_head"])
    writer.add_rope_dimension_count(SHAPE["n_embd"] // SHAPE["n_head"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, array in random_llama_tensors(len(tokens), seed, qkv_bias=architecture == "qwen2").items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
