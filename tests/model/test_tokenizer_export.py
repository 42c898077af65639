"""A model's tokenizer written as an HF directory gives exactly our ids, so external clients count as we do."""

from __future__ import annotations

import json
import random

from tokenizers import Tokenizer as HFTokenizer

from shadowserve.model.tokenizer import byte_tokenizer


def test_byte_tokenizer_export_encodes_and_decodes_like_ours(tmp_path):
    ours = byte_tokenizer()
    path = ours.save_pretrained(tmp_path / "tok", model_max_length=4096)
    theirs = HFTokenizer.from_file(str(path / "tokenizer.json"))
    rng = random.Random(0)
    texts = ["plain ascii", "tabs\tand\nnewlines  ", "héllo wörld — 日本語 🙂",
             "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(400))]
    for text in texts:
        ids = ours.encode(text)
        assert theirs.encode(text, add_special_tokens=False).ids == ids
        assert theirs.decode(ids) == ours.decode(ids) == text
    ids = [rng.randrange(0, 259) for _ in range(500)]  # specials and invalid UTF-8 too
    assert theirs.decode(ids) == ours.decode(ids)
    assert [theirs.token_to_id(t) for t in ("<pad>", "<s>", "</s>")] == [0, 1, 2]
    config = json.loads((path / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<s>" and config["eos_token"] == "</s>" and config["model_max_length"] == 4096
