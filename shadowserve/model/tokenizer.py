"""Tokenizers: byte-level BPE rebuilt from a GGUF's vocabulary, HF tokenizer.json, or raw bytes.

All three share one small interface (``encode``, ``decode``, ``apply_chat_template``) so the engine
never cares where the vocabulary came from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from shadowserve.errors import ModelError


class Tokenizer:
    """Text <-> token ids plus the model's chat template and special ids."""

    def __init__(
        self,
        backend: Any,
        bos_token_id: int | None,
        eos_token_ids: tuple[int, ...],
        add_bos: bool = False,
        chat_template: str | None = None,
        special_tokens: dict[str, int] | None = None,
    ) -> None:
        self._backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.special_tokens = special_tokens or {}

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def to_hf(self) -> HFTokenizer:
        """The vocabulary as a ``tokenizers`` object (the byte backend's exact equivalent for it)."""
        return self._backend if isinstance(self._backend, HFTokenizer) else self._backend.to_hf()

    def save_pretrained(self, path: str | Path, model_max_length: int | None = None) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json``: a directory HF ``AutoTokenizer`` loads
        offline, so clients that count tokens themselves (``vllm bench serve --tokenizer DIR``) agree with us."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        hf = self.to_hf()
        hf.save(str(path / "tokenizer.json"))

        def name(token_id: int | None) -> str | None:
            return None if token_id is None else hf.id_to_token(token_id)

        eos = name(self.eos_token_ids[0]) if self.eos_token_ids else None
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name(self.bos_token_id),
                  "eos_token": eos, "pad_token": eos, "add_bos_token": self.add_bos,
                  "clean_up_tokenization_spaces": False}
        if model_max_length:
            config["model_max_length"] = model_max_length
        if self.chat_template:
            config["chat_template"] = self.chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        return path

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render chat messages with the model's own Jinja template (a plain fallback if it has none)."""
        if not self.chat_template:
            lines = [f"{m['role']}: {m['content']}" for m in messages]
            return "\n".join(lines) + ("\nassistant:" if add_generation_prompt else "")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        template = env.from_string(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token="", eos_token="")


class _ByteBackend:
    """Raw UTF-8 bytes shifted past three specials (0 pad, 1 bos, 2 eos): for random-weight models."""

    OFFSET = 3

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return 256 + self.OFFSET

    def encode(self, text: str, add_special_tokens: bool = False) -> Any:
        class _Enc:
            ids = [b + self.OFFSET for b in text.encode("utf-8")]

        return _Enc()

    def to_hf(self) -> HFTokenizer:
        """The same ids in ``tokenizers`` form: byte-level BPE with no merges, one token per byte."""
        table = _gpt2_byte_chars()
        vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {table[b]: b + self.OFFSET for b in range(256)}
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<pad>", "<s>", "</s>")])
        return hf

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        data = bytes(i - self.OFFSET for i in ids if self.OFFSET <= i < 256 + self.OFFSET)
        return data.decode("utf-8", errors="replace")


def _gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which the ByteLevel pre-tokenizer maps bytes through."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer() -> Tokenizer:
    return Tokenizer(_ByteBackend(), bos_token_id=1, eos_token_ids=(2,), add_bos=False)


def tokenizer_from_gguf_fields(fields: dict[str, Any]) -> Tokenizer:
    """Rebuild a GPT-2-style byte-level BPE tokenizer from GGUF ``tokenizer.ggml.*`` metadata."""
    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges", [])]
    types: list[int] = fields.get("tokenizer.ggml.token_type", [1] * len(tokens))
    backend = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if fields.get("tokenizer.ggml.pre") in ("smollm", "starcoder", "refact", "qwen2", "llama3", "llama-bpe"):
        steps.insert(0, pre_tokenizers.Digits(individual_digits=fields.get("tokenizer.ggml.pre") != "llama-bpe"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    # Control (3) and user-defined (4) tokens are matched whole, never split by BPE.
    specials = {tokens[i]: i for i, t in enumerate(types) if t in (3, 4)}
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    eos = fields.get("tokenizer.ggml.eos_token_id")
    eos_ids = {eos} if eos is not None else set()
    # Chat models end turns with these; generation should stop on them as on EOS itself.
    eos_ids.update(specials[name] for name in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>") if name in specials)
    return Tokenizer(
        backend,
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(sorted(eos_ids)),
        add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=fields.get("tokenizer.chat_template"),
        special_tokens=specials,
    )


def tokenizer_from_hf_dir(path: Path, eos_token_ids: tuple[int, ...], bos_token_id: int | None) -> Tokenizer:
    """Load ``tokenizer.json`` (and the chat template from ``tokenizer_config.json``) of an HF model dir."""
    file = path / "tokenizer.json"
    if not file.exists():
        raise ModelError(f"{path} has no tokenizer.json")
    try:
        backend = HFTokenizer.from_file(str(file))
    except Exception as exc:  # the tokenizers library raises plain Exception on bad JSON
        raise ModelError(f"cannot read {file}: {exc}") from exc
    template, add_bos = None, False
    cfg_file = path / "tokenizer_config.json"
    if cfg_file.exists():
        cfg = json.loads(cfg_file.read_text())
        template = cfg.get("chat_template")
        add_bos = bool(cfg.get("add_bos_token", False))
    return Tokenizer(backend, bos_token_id, eos_token_ids, add_bos=add_bos, chat_template=template)
