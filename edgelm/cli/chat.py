"""`edgelm chat`: an interactive conversation in the terminal, as `llama-cli -cnv` and `ollama run`."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any

from edgelm.cli.flags import MODEL_HELP, add_runtime_and_device, add_sampling, runtime_options
from edgelm.errors import EdgelmError

if TYPE_CHECKING:
    from edgelm.generation.conversation import Conversation

DESCRIPTION = """\
An interactive chat through the model's chat template, each answer streamed. The conversation stays in
the runtime's cache, so each turn prefills only what it adds; the oldest turns are dropped when it
outgrows the context (and it says so). A model without a chat template continues one running text
instead. Lines from a pipe are answered in turn.

"""
COMMANDS = """\
  /system TEXT   set the system message and start over
  /reset         start over (the system message stays)
  /help          this list
  /bye           leave (as Ctrl-D does)
Ctrl-C stops an answer and keeps the conversation."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    """The `chat` subcommand and its flags."""
    chat = commands.add_parser(
        "chat",
        help="chat with a model in the terminal",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=DESCRIPTION + COMMANDS,
    )
    chat.add_argument("model", help=MODEL_HELP)
    chat.add_argument("--system", default=None, help="the system message")
    add_sampling(chat)
    add_runtime_and_device(chat)
    chat.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Read lines, answer each; commands start with a slash."""
    from edgelm.generation.api import load
    from edgelm.generation.conversation import Conversation

    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    sampling |= {"seed": args.seed, "stop": args.stop}
    with load(args.model, runtime=args.runtime, device=args.device, **runtime_options(args)) as model:
        conversation = Conversation(model, args.system)
        if not conversation.templated:
            say("this model has no chat template: plain continuation, each line continues the text")
        say("/help for commands, Ctrl-D or /bye to leave")
        for line in _lines():
            if line.startswith("/"):
                if not _command(conversation, line):
                    return
            elif line.strip():
                _answer(conversation, line, args.max_new_tokens, sampling)


def _command(conversation: Conversation, line: str) -> bool:
    """Carry out a slash command; False to leave."""
    name, _, rest = line.partition(" ")
    if name in ("/bye", "/exit", "/quit"):
        return False
    if name == "/reset":
        conversation.reset()
        say("(started over)")
    elif name == "/system":
        conversation.system = rest.strip() or None
        conversation.reset()
        say("(system message set; started over)" if conversation.system else "(no system message)")
    else:
        say(COMMANDS if name == "/help" else f"unknown command {name}; /help lists them")
    return True


def _answer(conversation: Conversation, text: str, max_new_tokens: int, sampling: dict[str, Any]) -> None:
    """Stream the answer to `text` to standard output; Ctrl-C stops it and keeps what was shown."""
    try:
        stream, dropped = conversation.answer(text, max_new_tokens, **sampling)
    except EdgelmError as e:
        say(f"error: {e}")
        return
    except KeyboardInterrupt:  # while the prompt was being prepared: the message is not sent
        say("(stopped)")
        return
    if dropped:
        say(f"(dropped the {dropped} oldest exchange{'s' * (dropped > 1)} to stay within the context)")

    def stop(signum: int, frame: FrameType | None) -> None:
        stream.cancel()

    previous = signal.signal(signal.SIGINT, stop)
    shown = []
    try:
        with stream:
            for piece in stream:
                shown.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
    finally:
        signal.signal(signal.SIGINT, previous)
    sys.stdout.write("\n")
    sys.stdout.flush()
    conversation.add_answer("".join(shown))
    if stream.finish_reason == "cancelled":
        say("(stopped)")
    elif stream.finish_reason == "length":
        say(f"(cut at {stream.completion_tokens} tokens: --max-new-tokens or the end of the context)")


def _lines() -> Iterator[str]:
    """Input lines, with a prompt and line editing on a terminal; Ctrl-C at the prompt asks again."""
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401 - line editing and history for input(), where Python has it
    while True:
        try:
            line = input(">>> ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        except KeyboardInterrupt:
            say("\n(Ctrl-D or /bye to leave)")
            continue
        if not interactive:
            if not line:
                return
            line = line.rstrip("\n")
        yield line


def say(text: str) -> None:
    """A message of the chat itself (not the model's): on standard error."""
    print(text, file=sys.stderr, flush=True)
