#!/usr/bin/env python3
"""A terminal chat on a GGUF model through llama-cpp-python, streaming the reply token by token.

    python chat.py MODEL.gguf [--system TEXT] [--max-tokens N] [--threads N]
                              [--temperature T] [--seed N] [--ctx N]
    python chat.py MODEL.gguf --prompt "Hello"      # one answer, then exit

The chat template, special tokens and context length all come from the GGUF file itself.
Type a message and press Enter; /reset forgets the conversation, /quit or Ctrl-D exits.
Replies go to stdout, everything else to stderr, so the replies can be piped.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Chat with a GGUF model (llama-cpp-python).")
    ap.add_argument("model", help="path to a .gguf file")
    ap.add_argument("--system", help="system message (default: the chat template's own, if any)")
    ap.add_argument("--max-tokens", type=int, default=512, help="most tokens per reply (default 512)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: llama.cpp's choice)")
    ap.add_argument("--temperature", type=float, default=0.7, help="0 = greedy, deterministic (default 0.7)")
    ap.add_argument("--seed", type=int, default=None, help="sampling seed, for repeatable replies")
    ap.add_argument("--ctx", type=int, default=0, help="context length in tokens (default: the model's)")
    ap.add_argument("--prompt", help="answer this one message and exit")
    return ap.parse_args(argv)


def load(path: str, threads: int | None, ctx: int):
    from llama_cpp import Llama

    return Llama(model_path=path, n_ctx=ctx, n_threads=threads, n_threads_batch=threads, verbose=False)


def stream_reply(llm, messages: list[dict], args) -> str:
    """Print the assistant's reply as it is generated; return its full text."""
    parts = []
    chunks = llm.create_chat_completion(messages, stream=True, max_tokens=args.max_tokens,
                                        temperature=args.temperature, seed=args.seed)
    for chunk in chunks:
        piece = chunk["choices"][0]["delta"].get("content")
        if piece:
            sys.stdout.write(piece)
            sys.stdout.flush()
            parts.append(piece)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(parts)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        llm = load(args.model, args.threads, args.ctx)
    except (ValueError, OSError) as e:  # a missing or unreadable file
        print(f"cannot load {args.model}: {e}", file=sys.stderr)
        return 2
    start = [{"role": "system", "content": args.system}] if args.system else []

    if args.prompt is not None:
        stream_reply(llm, start + [{"role": "user", "content": args.prompt}], args)
        return 0

    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {args.model} (context {llm.n_ctx()} tokens); /reset, /quit", file=sys.stderr)
    history = list(start)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            break
        if not line:  # EOF (Ctrl-D)
            break
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            break
        if text == "/reset":
            history = list(start)
            print("(conversation reset)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        try:
            reply = stream_reply(llm, history, args)
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
            print("\n(interrupted)", file=sys.stderr)
            history.pop()
            continue
        except ValueError as e:  # the conversation no longer fits the context
            print(f"\n{e}; /reset to start over", file=sys.stderr)
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})
    if interactive:
        print(file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
