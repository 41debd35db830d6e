"""`gpt chat` driven through a pseudo-terminal, as a user types: each reply equals the front door's
(gpt.generate.generate_chat) on the same conversation; /reset forgets, --system is used, a long conversation is
trimmed with a notice, Ctrl-C stops a reply and the chat goes on, Ctrl-D / `/exit` quit cleanly."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import sys
import time
from pathlib import Path

import pytest

from gpt.chat import ChatTemplate
from gpt.cli import main
from gpt.generate import SamplingSpec, generate_chat, make_generator, trim_chat
from gpt.model_dir import load

ROOT = Path(__file__).resolve().parents[1]
MAX_NEW = 8


class Terminal:
    """A child process on a pseudo-terminal (its controlling terminal, so Ctrl-C is a real SIGINT)."""

    def __init__(self, argv: list[str]):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TERM": "dumb"}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child
            os.chdir(ROOT)
            os.execve(sys.executable, [sys.executable, "-m", "gpt.cli", *argv], env)
        self.buffer = ""
        self.seen = ""  # everything consumed so far

    def expect(self, pattern: str, timeout: float = 60.0) -> re.Match:
        """Read until `pattern` (a regex) matches the unread output; consume through the match."""
        deadline = time.time() + timeout
        while True:
            match = re.search(pattern, self.buffer)
            if match:
                self.seen += self.buffer[:match.end()]
                self.buffer = self.buffer[match.end():]
                return match
            left = deadline - time.time()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}; output so far: {self.buffer!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:  # the child exited (EIO)
                    data = b""
                if not data:
                    raise AssertionError(f"child exited waiting for {pattern!r}; output: {self.buffer!r}")
                self.buffer += data.decode("utf-8", "replace").replace("\r\n", "\n")

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def reply(self, line: str) -> str:
        """Type a message; return the assistant's streamed reply."""
        self.send(line + "\n")
        self.expect(r"assistant> ")
        return self.expect(r"(.*)\n")[1]

    def wait(self, timeout: float = 30.0) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            with_data, _, _ = select.select([self.fd], [], [], 0.1)
            if with_data:
                try:
                    self.buffer += os.read(self.fd, 4096).decode("utf-8", "replace").replace("\r\n", "\n")
                except OSError:
                    pass
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError(f"gpt chat did not exit; output: {self.buffer!r}")


@pytest.fixture(scope="module")
def chat_model(tiny_model_dir):
    loaded = load(tiny_model_dir)
    return loaded, ChatTemplate(loaded.tokenizer)


def expected_reply(chat_model, messages, max_new_tokens=MAX_NEW) -> str:
    loaded, template = chat_model
    spec = SamplingSpec(max_new_tokens=max_new_tokens, temperature=0.0)
    return generate_chat(loaded.model, template, messages, spec).text


def test_multi_turn_reset_and_trimming(tiny_model_dir, chat_model):
    loaded, template = chat_model
    term = Terminal(["chat", "-c", str(tiny_model_dir), "-t", "0", "-m", str(MAX_NEW)])
    term.expect(r"64-token context")
    first = term.reply("the cat saw")
    history = [{"role": "user", "content": "the cat saw"}, {"role": "assistant", "content": first}]
    assert first == expected_reply(chat_model, history[:1])
    second = term.reply("and then the dog")  # the second turn sees the first
    assert second == expected_reply(chat_model, history + [{"role": "user", "content": "and then the dog"}])

    term.send("/reset\n")
    term.expect(r"\[new conversation\]")
    assert term.reply("the cat saw") == first  # greedy, and nothing remembered
    term.send("/exit\n")
    assert term.wait() == 0


def test_a_long_conversation_is_trimmed_with_a_notice(tiny_model_dir, chat_model):
    """Sampled replies (seeded: the CLI and this test draw from one generator each, in the same order) until the
    64-token context, less room for an 8-token reply, cannot hold the history."""
    loaded, template = chat_model
    term = Terminal(["chat", "-c", str(tiny_model_dir), "-t", "1", "--top-p", "1", "--seed", "3",
                     "-m", str(MAX_NEW)])
    term.expect(r"64-token context")
    spec = SamplingSpec(max_new_tokens=MAX_NEW, temperature=1.0, top_p=1.0, seed=3)
    gen = make_generator(3)
    notice = r"\[history trimmed: the (\d+) oldest messages no longer fit the 64-token context\]"
    history: list[dict] = []
    for turn in range(12):
        message = {"role": "user", "content": f"Day {turn}: the birds saw rivers"}
        reply = term.reply(message["content"])
        trimmed = trim_chat(template, history + [message], loaded.max_seq_len - MAX_NEW)
        assert reply == generate_chat(loaded.model, template, trimmed.messages, spec, gen).text
        history = [*trimmed.messages, {"role": "assistant", "content": reply}]
        if not reply.strip():  # like gpt chat: an empty reply is no turn (and no valid assistant message)
            history = history[:-2]
        if trimmed.num_dropped:
            assert int(re.search(notice, term.seen)[1]) == trimmed.num_dropped
            break
    else:
        raise AssertionError("the conversation never outgrew the context")
    term.send("/exit\n")
    assert term.wait() == 0


def test_system_prompt_and_ctrl_d(tiny_model_dir, chat_model):
    term = Terminal(["chat", "-c", str(tiny_model_dir), "-t", "0", "-m", str(MAX_NEW), "--system", "Be brief."])
    term.expect(r"context")
    reply = term.reply("the cat saw")
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the cat saw"}]
    assert reply == expected_reply(chat_model, system)
    assert reply != expected_reply(chat_model, system[1:])  # the system prompt changed the conversation
    term.expect(r"you> ")
    term.send("\x04")  # Ctrl-D on an empty line: end of input
    assert term.wait() == 0
    assert "Traceback" not in term.seen + term.buffer


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(tiny_model_dir):
    # greedy for 100k tokens: the tiny model never ends a reply by itself, so only Ctrl-C can
    term = Terminal(["chat", "-c", str(tiny_model_dir), "-t", "0", "-m", "100000"])
    term.expect(r"context")
    term.send("the cat saw\n")
    term.expect(r"assistant> .{10}")
    term.send("\x03")  # Ctrl-C: SIGINT from the terminal
    term.expect(r"\[reply stopped\]")
    term.expect(r"you> ")
    term.send("/reset\n")  # still chatting
    term.expect(r"\[new conversation\]")
    term.expect(r"you> ")
    term.send("\x03")  # Ctrl-C at the prompt: one line, exit 130
    assert term.wait() == 130
    # the last line (the terminal may echo "^C" before it, depending on when readline set the terminal up)
    assert term.buffer.strip().splitlines()[-1] == "gpt chat: interrupted"
    assert "Traceback" not in term.seen + term.buffer


def test_bad_values_fail_in_one_line(tiny_model_dir, tmp_path, capsys):
    assert main(["chat", "-c", str(tiny_model_dir), "--temperature", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "gpt chat: error: --temperature/-t: must be >= 0 (0 = greedy), got -1.0"
    assert main(["chat", "-c", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpt chat: error:") and "\n" not in err
