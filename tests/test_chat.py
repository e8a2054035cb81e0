"""`edgelm chat` and the `Conversation` under it: turns through the chat template, equal to `Model.chat` on
the same messages; the oldest turns dropped to stay within the context; plain continuation without a
template; slash commands; Ctrl-C stops an answer and keeps the conversation."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMALL, make_checkpoint

import edgelm
from edgelm.errors import EdgelmError
from edgelm.generation.conversation import Conversation
from edgelm.tokenizer import Tokenizer

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
GREEDY = {"temperature": 0.0}


def with_template(checkpoint: Path) -> Path:
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    (checkpoint / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return checkpoint


@pytest.fixture
def chat_model(tmp_path: Path, small_tokenizer: Tokenizer) -> Path:
    """A random checkpoint with a chat template and a context of 256."""
    config = dataclasses.replace(SMALL, max_position_embeddings=256)
    return with_template(make_checkpoint(tmp_path / "chat", small_tokenizer, config))


def test_turns_are_what_model_chat_answers(chat_model: Path) -> None:
    with edgelm.load(chat_model, device="cpu") as model:
        conversation = Conversation(model, system="be brief")
        messages: list[dict[str, str]] = [{"role": "system", "content": "be brief"}]
        for text in ("def f(x):", "class A:", "import os"):
            stream, dropped = conversation.answer(text, 12, **GREEDY)
            answer = "".join(stream)
            conversation.add_answer(answer)
            messages.append({"role": "user", "content": text})
            assert dropped == 0
            with edgelm.load(chat_model, device="cpu") as fresh:
                assert fresh.chat(messages, max_new_tokens=12, **GREEDY) == answer
            messages.append({"role": "assistant", "content": answer})
        conversation.reset()
        assert conversation.turns == [] and conversation.system == "be brief"


def test_the_oldest_turns_are_dropped_to_fit_the_context(chat_model: Path) -> None:
    with edgelm.load(chat_model, device="cpu", context=96) as model:
        conversation = Conversation(model)
        long = "x = 1\n" * 8  # about 20 tokens a turn with its answer
        drops = []
        for _ in range(6):
            stream, dropped = conversation.answer(long, 12, **GREEDY)
            conversation.add_answer("".join(stream))
            drops.append(dropped)
            prompt = model.tokenize(model.chat_prompt(conversation.turns[:-1]))
            assert len(prompt) <= 96 - 12
            assert conversation.turns[0]["role"] == "user"
        assert sum(drops) > 0 and drops[0] == 0
        before = list(conversation.turns)
        with pytest.raises(EdgelmError, match="shorten it"):
            conversation.answer("y = 2\n" * 200, 12, **GREEDY)
        assert conversation.turns == before  # refused before any turn was dropped


def test_without_a_template_the_text_runs_on(checkpoint: Path) -> None:
    with edgelm.load(checkpoint, device="cpu") as model:
        conversation = Conversation(model, system="# notes\n")
        assert not conversation.templated
        first = "".join(conversation.answer("def f(x):", 6, **GREEDY)[0])
        conversation.add_answer(first)
        second = "".join(conversation.answer("\nclass A:", 6, **GREEDY)[0])
        assert second == model.generate("# notes\ndef f(x):" + first + "\nclass A:", 6, **GREEDY)


def chat(model: Path, *args: str, text: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "edgelm", "chat", str(model), "--temperature", "0", *args]
    return subprocess.run(command, input=text, capture_output=True, text=True, timeout=300)


def test_the_command_answers_each_line_and_takes_commands(chat_model: Path) -> None:
    done = chat(
        chat_model,
        "--max-new-tokens",
        "8",
        text="def f(x):\n/reset\n/system terse\nclass A:\n/nope\n/bye\nx\n",
    )
    assert done.returncode == 0, done.stderr
    with edgelm.load(chat_model, device="cpu") as model:
        first = model.chat([{"role": "user", "content": "def f(x):"}], max_new_tokens=8, **GREEDY)
        messages = [{"role": "system", "content": "terse"}, {"role": "user", "content": "class A:"}]
        second = model.chat(messages, max_new_tokens=8, **GREEDY)
    assert done.stdout == f"{first}\n{second}\n"  # nothing after /bye
    assert "(started over)" in done.stderr and "(system message set; started over)" in done.stderr
    assert "unknown command /nope" in done.stderr


def test_without_a_template_the_command_says_so(checkpoint: Path) -> None:
    done = chat(checkpoint, "--max-new-tokens", "4", text="def\n")
    assert done.returncode == 0 and "no chat template: plain continuation" in done.stderr
    with edgelm.load(checkpoint, device="cpu") as model:
        assert done.stdout == model.generate("def", 4, **GREEDY) + "\n"


def test_ctrl_c_stops_the_answer_and_keeps_the_conversation(
    tmp_path: Path, small_tokenizer: Tokenizer
) -> None:
    config = dataclasses.replace(SMALL, max_position_embeddings=8192)
    model = with_template(make_checkpoint(tmp_path / "long", small_tokenizer, config))
    command = [sys.executable, "-m", "edgelm", "chat", str(model), "--max-new-tokens", "6000", "--seed", "0"]
    process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write("def f(x):\n")
    process.stdin.flush()
    first = process.stdout.read(1)  # the answer has begun
    process.send_signal(signal.SIGINT)
    rest, err = process.communicate("/bye\n", timeout=120)
    out = first + rest
    assert process.returncode == 0, err
    assert "(stopped)" in err and "interrupted" not in err
    assert len(out) > 1 and out.endswith("\n")  # what was shown, then a newline
