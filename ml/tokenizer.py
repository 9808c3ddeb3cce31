"""Byte-level BPE tokenizer with Flywheel's chat format and assistant loss masks.

Any UTF-8 text round-trips exactly (byte-level BPE, digits split one per token so that arithmetic is learnable).
Seven special tokens frame conversations; they are only ever inserted by id, so text that merely looks like a
special token (a user typing "<|end|>") is encoded as ordinary text and can never end a turn or fake a role:

    <|bos|><|system|>You are kind.<|end|><|user|>Hi<|end|><|assistant|>Hello!<|end|>
                                                                       ^^^^^^^^^^^^^ mask = 1 (loss here)

The assistant's content and its closing <|end|> are masked 1 so that the model learns to answer and to stop.
A directory written by an imported Hugging Face checkpoint is also loadable: its Jinja `chat_template` is rendered in
a sandbox and the assistant mask is derived by rendering conversation prefixes.

Run (CPU, seconds): python -m ml.tokenizer
"""

from __future__ import annotations

import datetime
import functools
import itertools
import json
from collections.abc import Iterable
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END]
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
FLYWHEEL_FORMAT = "flywheel-chat-v1"

# The native format as a Jinja template, written to tokenizer_config.json so that exported checkpoints chat the same
# way in Hugging Face transformers / vLLM. tests/ml check that it renders to the same ids as the native code path.
NATIVE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}{{ message['content'] }}{{ '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
# Turn terminators used by common imported chat templates; whichever exist in the vocabulary stop generation.
KNOWN_END_TOKENS = ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>"]
_PLACEHOLDER = "\ue000{}\ue001"  # private-use characters: content slots when rendering a Jinja template

Message = dict[str, str]


class Tokenizer:
    """A `tokenizers` BPE model plus the ids and rendering rules of the chat format."""

    def __init__(self, hf: HFTokenizer, config: dict | None = None) -> None:
        self._tok = HFTokenizer.from_str(hf.to_str())  # recognises special tokens: only for template text
        self._plain = HFTokenizer.from_str(hf.to_str())  # treats special-looking text as text: for all content
        self._plain.encode_special_tokens = True
        self.config = dict(config or {})
        self.chat_template: str | None = None
        if self.config.get("format") != FLYWHEEL_FORMAT:
            self.chat_template = self.config.get("chat_template")
        names = _special_names(self.config)
        self.bos_id = self._id_or_none(names.get("bos_token", BOS))
        self.eos_id = self._id_or_none(names.get("eos_token", EOS))
        self.pad_id = self._id_or_none(names.get("pad_token", PAD))
        if self.pad_id is None:
            self.pad_id = self.eos_id
        self.system_id = self._id_or_none(SYSTEM)
        self.user_id = self._id_or_none(USER)
        self.assistant_id = self._id_or_none(ASSISTANT)
        end = next((t for t in KNOWN_END_TOKENS if self._id_or_none(t) is not None), None)
        self.end_id = self._id_or_none(END) if self.chat_template is None else self._id_or_none(end or "")
        if self.end_id is None:
            self.end_id = self.eos_id

    # ----------------------------------------------------------------------------------------------- build / persist

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Train byte-level BPE on `texts`; vocab_size counts the 256 bytes and the special tokens too."""
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=SPECIAL_TOKENS,  # ids 0..6 in this order
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, so unseen scripts still encode
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf, _native_config())

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (special tokens, chat format, Jinja template)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(json.dumps(self.config, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Load tokenizer.json (+ tokenizer_config.json, + chat_template.jinja as newer HF checkpoints ship it)."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {directory}")
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template_file = directory / "chat_template.jinja"
        if "chat_template" not in config and template_file.is_file():
            config["chat_template"] = template_file.read_text()
        if isinstance(config.get("chat_template"), list):  # HF allows named templates; take the default one
            named = {t["name"]: t["template"] for t in config["chat_template"]}
            config["chat_template"] = named.get("default", next(iter(named.values()), None))
        return cls(HFTokenizer.from_file(str(path)), config)

    def to_str(self) -> str:
        """Everything needed to rebuild this tokenizer, as one JSON string (to broadcast across DDP ranks)."""
        return json.dumps({"tokenizer": self._tok.to_str(), "config": self.config})

    def spec(self) -> dict:
        """tokenizer.json as a dict: its model, decoder and added tokens (ml/textstream.py reads the decoder)."""
        return json.loads(self._tok.to_str())

    @classmethod
    def from_str(cls, data: str) -> Tokenizer:
        blob = json.loads(data)
        return cls(HFTokenizer.from_str(blob["tokenizer"]), blob["config"])

    # ---------------------------------------------------------------------------------------------------- plain text

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Ids of `text` as plain text: special-looking substrings are never special tokens."""
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._plain.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids`; special tokens appear by name (e.g. "<|end|>") unless `skip_special` (answers shown to
        people: a model that emits a role marker mid-answer should not print it)."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def _id_or_none(self, token: str | None) -> int | None:
        return self._tok.token_to_id(token) if token else None

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end a generated answer: the turn terminator and end-of-sequence."""
        return sorted({i for i in (self.end_id, self.eos_id) if i is not None})

    # ---------------------------------------------------------------------------------------------------------- chat

    def render_conversation(self, messages: list[Message]) -> tuple[list[int], list[int]]:
        """Ids of a whole conversation and a 0/1 mask that is 1 on the assistant's tokens and its closing turn end."""
        _check_messages(messages)
        if self.chat_template is not None:
            return self._render_template(messages, add_generation_prompt=False)
        if None in (self.bos_id, self.end_id, self.user_id, self.assistant_id, self.system_id):
            raise ValueError("this tokenizer has neither Flywheel's special tokens nor a chat_template")
        ids, mask = [self.bos_id], [0]
        for message in messages:
            role_id = self._tok.token_to_id(ROLE_TOKENS[message["role"]])
            content = [*self.encode(message["content"]), self.end_id]
            flag = 1 if message["role"] == "assistant" else 0
            ids += [role_id, *content]
            mask += [0] + [flag] * len(content)
        return ids, mask

    def render_prompt(self, messages: list[Message]) -> list[int]:
        """Ids of the conversation so far followed by the assistant header: what generation continues from."""
        _check_messages(messages)
        if self.chat_template is not None:
            return self._render_template(messages, add_generation_prompt=True)[0]
        ids, _ = self.render_conversation(messages)
        return [*ids, self.assistant_id]

    # ------------------------------------------------------------------------------------- imported Jinja templates

    def _render_text(self, messages: list[Message], add_generation_prompt: bool) -> str:
        return _compiled_template(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._token_text("bos_token"),
            eos_token=self._token_text("eos_token"),
            pad_token=self._token_text("pad_token"),
        )

    def _token_text(self, key: str) -> str:
        return _special_names(self.config).get(key) or ""

    def _render_template(self, messages: list[Message], add_generation_prompt: bool) -> tuple[list[int], list[int]]:
        """Render with content replaced by placeholders, then cut the text at the assistant turns' boundaries.

        Template text is encoded with special tokens recognised; content slots are encoded as plain text, so user
        content cannot inject role tokens. If a template transforms content so that the placeholders do not survive,
        fall back to rendering real content (as transformers does, specials in content are then recognised).
        """
        slots = [_PLACEHOLDER.format(i) for i in range(len(messages))]
        masked = [dict(m, content=s) for m, s in zip(messages, slots, strict=True)]
        full = self._render_text(masked, add_generation_prompt)
        contents = {s: m["content"] for s, m in zip(slots, messages, strict=True)}
        if any(full.count(s) != 1 for s in slots):
            masked, contents = messages, {}
            full = self._render_text(masked, add_generation_prompt)
        cuts = [(0, 0)]  # (char offset, mask flag of the text that starts there)
        for i, message in enumerate(masked):
            if message["role"] != "assistant":
                continue
            head = self._render_text(masked[:i], True)
            through = self._render_text(masked[: i + 1], False)
            if not (full.startswith(through) and through.startswith(head) and cuts[-1][0] <= len(head)):
                raise ValueError("chat_template is not prefix-stable; cannot derive the assistant mask")
            cuts += [(len(head), 1), (len(through), 0)]
        cuts.append((len(full), 0))
        ids: list[int] = []
        mask: list[int] = []
        for (start, flag), (end, _) in itertools.pairwise(cuts):
            piece = self._encode_templated(full[start:end], contents)
            ids += piece
            mask += [flag] * len(piece)
        return ids, mask

    def _encode_templated(self, text: str, contents: dict[str, str]) -> list[int]:
        """Encode template text (specials recognised) with content slots encoded as plain text."""
        ids: list[int] = []
        while text:
            hits = [(text.find(s), s) for s in contents if s in text]
            if not hits:
                return ids + self._tok.encode(text, add_special_tokens=False).ids
            pos, slot = min(hits)
            if pos:
                ids += self._tok.encode(text[:pos], add_special_tokens=False).ids
            ids += self.encode(contents[slot])
            text = text[pos + len(slot) :]
        return ids


def _native_config() -> dict:
    return {
        "format": FLYWHEEL_FORMAT,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": [SYSTEM, USER, ASSISTANT, END],
        "chat_format": f"{BOS}({{<|role|>}}content{END})*  roles: system, user, assistant; "
        f"generation starts after {ASSISTANT} and stops at {END}",
        "chat_template": NATIVE_CHAT_TEMPLATE,
        "add_bos_token": False,
        "model_max_length": 1_000_000,
    }


def _special_names(config: dict) -> dict[str, str]:
    """bos/eos/pad token strings from a tokenizer_config.json, where HF may write strings or {"content": ...}."""
    names = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            names[key] = value
    return names


def _check_messages(messages: list[Message]) -> None:
    for message in messages:
        if message.get("role") not in ROLE_TOKENS or not isinstance(message.get("content"), str):
            raise ValueError(f"a message needs role in {sorted(ROLE_TOKENS)} and string content, got {message!r}")


@functools.lru_cache(maxsize=8)
def _compiled_template(source: str) -> jinja2.Template:
    """Compile a chat template in Jinja's immutable sandbox (templates come with downloaded checkpoints)."""

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)  # Llama 3.x templates call it
    return env.from_string(source)


if __name__ == "__main__":
    tok = Tokenizer.train(["Mira lives in Oslo. 3 plus 4 is 7. 你好，世界！"] * 50, vocab_size=300)
    chat = [{"role": "user", "content": "Where does Mira live?"}, {"role": "assistant", "content": "In Oslo."}]
    ids, mask = tok.render_conversation(chat)
    print("vocab", tok.vocab_size, "ids", ids)
    print("mask", mask)
    print("text", tok.decode(ids))
