"""sample_apps/python-chat: the terminal chat, run as a user runs it, on the tiny build's GGUF.

Its streamed replies (stdout) must equal llama-cpp-python's own non-streamed replies for the same
conversation: greedy (temperature 0) as the plain check, and seeded sampling for the multi-turn one
(the tiny student's greedy reply is newlines whatever the history; a seeded sample differs with the
history, so it shows the app sends the conversation it should).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CHAT = Path(__file__).resolve().parents[1] / "sample_apps" / "python-chat" / "chat.py"
TARGET = "phone-4gb"


@pytest.fixture(scope="module")
def gguf(tiny_build) -> Path:
    res, out, _ = tiny_build
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out / TARGET / "model-q4_0.gguf"


# One llama.cpp thread in the app and here: its worker threads spin-wait, and with more of them than
# free cores (a busy 2-core CI host) each token takes ~10x longer.
def chat(gguf: Path, *args, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHAT), str(gguf), "--threads", "1", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=120)


def replies(gguf: Path, turns: list[str | None], *, system: str | None = None, **sampling) -> list[str]:
    """llama-cpp-python's non-streamed replies, one Llama for the whole chat as the app has; a None
    turn starts the conversation over (/reset)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=0, n_threads=1, verbose=False)
    start = [{"role": "system", "content": system}] if system else []
    try:
        history, out = list(start), []
        for turn in turns:
            if turn is None:
                history = list(start)
                continue
            history.append({"role": "user", "content": turn})
            reply = llm.create_chat_completion(history, **sampling)["choices"][0]["message"]["content"]
            history.append({"role": "assistant", "content": reply})
            out.append(reply)
        return out
    finally:
        llm.close()


def test_streamed_reply_is_the_greedy_reply(gguf):
    res = chat(gguf, "--max-tokens", 8, "--temperature", 0, stdin="What is the capital of France?\n")
    assert res.returncode == 0, res.stderr
    [want] = replies(gguf, ["What is the capital of France?"], max_tokens=8, temperature=0.0)
    assert want and res.stdout == want + "\n"  # stdin's EOF ended the chat


def test_history_reset_and_quit(gguf):
    stdin = "Hello there.\nAnd then?\n/reset\nTell me a story.\n/quit\nnever answered\n"
    res = chat(gguf, "--max-tokens", 8, "--temperature", 0.8, "--seed", 7, stdin=stdin)
    assert res.returncode == 0, res.stderr
    want = replies(gguf, ["Hello there.", "And then?", None, "Tell me a story."], max_tokens=8, temperature=0.8,
                   seed=7)
    assert len(set(want)) == 3  # sampled replies that tell the three conversations apart
    assert res.stdout == "".join(w + "\n" for w in want)
    assert "(conversation reset)" in res.stderr


def test_one_shot_prompt_with_system_message(gguf):
    sampling = {"max_tokens": 6, "temperature": 0.8, "seed": 3}
    res = chat(gguf, "--prompt", "Hi!", "--system", "You are a pirate.", "--max-tokens", 6, "--temperature", 0.8,
               "--seed", 3, stdin="this is not read\n")
    assert res.returncode == 0, res.stderr
    [want] = replies(gguf, ["Hi!"], system="You are a pirate.", **sampling)
    assert want != replies(gguf, ["Hi!"], **sampling)[0]  # the system message makes a difference
    assert res.stdout == want + "\n"


def test_missing_model_is_one_line_and_exit_2(tmp_path):
    res = chat(tmp_path / "nope.gguf", "--prompt", "hi")
    assert res.returncode == 2 and res.stdout == ""
    assert "nope.gguf" in res.stderr and "Traceback" not in res.stderr
