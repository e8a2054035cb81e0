"""Constrained decoding (`json_schema=`, the server's `response_format`): whatever the model and the
sampling, the text is JSON that `jsonschema` (the oracle) finds valid against the schema."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jsonschema
import pytest
from conftest import SMALL
from test_chat import TEMPLATE, with_template

import edgelm
from edgelm.errors import EdgelmError
from edgelm.tokenizer import Tokenizer
from edgelm.training.random_checkpoint import random_checkpoint

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "kind": {"enum": ["a", "bc"]},
    },
    "required": ["name", "count", "ok", "kind"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_text_follows_the_schema(checkpoint: Path, temperature: float) -> None:
    """A random model, which left alone writes no JSON at all, writes values the schema accepts, and stops
    at the value's end."""
    with edgelm.load(checkpoint, device="cpu") as model:
        assert not _is_json(model.generate("x", max_new_tokens=20, temperature=0))
        for seed in range(4):
            with model.stream("x", 80, temperature, seed=seed, json_schema=SCHEMA) as stream:
                text = "".join(stream)
            jsonschema.validate(json.loads(text), SCHEMA)
            assert stream.finish_reason == "stop", text


def test_chat_and_any_object(checkpoint: Path) -> None:
    with edgelm.load(with_template(checkpoint), device="cpu") as model:
        assert model.tokenizer.chat_template == TEMPLATE
        messages = [{"role": "user", "content": "a JSON object, please"}]
        text = model.chat(messages, 80, 0.0, json_schema=SCHEMA)
        jsonschema.validate(json.loads(text), SCHEMA)
        short = {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]}
        short["additionalProperties"] = False
        assert json.loads(model.generate("x", 40, 0.5, seed=1, json_schema=short)) in (
            {"a": True},
            {"a": False},
        )
        with model.stream("x", 30, 0.0, json_schema={"type": "object"}) as stream:
            text = "".join(stream)
        assert text.startswith("{") and (
            stream.finish_reason == "length" or isinstance(json.loads(text), dict)
        )


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "nonsense"}, "json_schema"),
        ("{}", "must be a JSON schema object"),
        ([1], "JSON schema object"),
    ],
)
def test_a_bad_schema_is_refused_at_the_call(checkpoint: Path, schema: object, message: str) -> None:
    with edgelm.load(checkpoint, device="cpu") as model, pytest.raises(EdgelmError, match=message):
        model.stream("x", json_schema=schema)  # type: ignore[arg-type]


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def test_a_model_with_more_rows_than_tokens(tmp_path: Path, small_tokenizer: Tokenizer) -> None:
    """Hub models pad their vocabulary (Qwen2.5: 151,936 rows for 151,665 tokens): the rows past the
    tokenizer's are never allowed."""
    config = dataclasses.replace(SMALL, vocab_size=small_tokenizer.vocab_size + 24)
    checkpoint = random_checkpoint(tmp_path / "padded", config, small_tokenizer, seed=1)
    with edgelm.load(checkpoint, device="cpu") as model:
        assert model.config.vocab_size > model.tokenizer.vocab_size
        with model.stream("x", 80, 1.0, seed=3, json_schema=SCHEMA, logprobs=20) as stream:
            text = "".join(stream)
        jsonschema.validate(json.loads(text), SCHEMA)
