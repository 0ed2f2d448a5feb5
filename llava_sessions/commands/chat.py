"""``llava-sessions chat``: an interactive, streaming conversation with an endpoint.

Reads one prompt per line from stdin (a terminal or a pipe), streams the answer token by token
to stdout, and closes the session at ``/quit`` or end of input. Ctrl-C during an answer stops
it (the session goes on); Ctrl-C at the prompt ends the chat. Notices go to stderr, so stdout
holds only the prompts and answers.
"""

from __future__ import annotations

import argparse
import sys
import unicodedata
import warnings

HELP = """commands:
  /image PATH   attach an image (path, s3:// or https:// URL) to your next message
  /history      show the conversation so far
  /quit         close the session and leave (so does end of input, Ctrl-D)
Ctrl-C stops an answer; Ctrl-C at the prompt leaves."""


def register(commands) -> None:
    chat = commands.add_parser(
        "chat",
        help="interactive streaming chat with a deployed (or local) endpoint",
        description="Open a session about the images and chat, one line per message; answers stream token by "
        "token. If the session is lost (expiry, a replaced instance) it is reopened and the conversation "
        "replayed.",
        epilog=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    chat.add_argument("--endpoint", required=True, help="SageMaker endpoint name")
    chat.add_argument("--endpoint-url", help="sagemaker-runtime URL, e.g. a local runtime's http://127.0.0.1:PORT")
    chat.add_argument("--region", help="AWS region (default: the AWS environment / profile)")
    chat.add_argument("--profile", help="AWS profile")
    chat.add_argument("--image", action="append", default=[], metavar="PATH",
                      help="image to open the session with (path, s3:// or https:// URL); repeatable")
    chat.add_argument("--max-new-tokens", type=int, help="answer length limit per turn (default: the endpoint's)")
    chat.add_argument("--temperature", type=float, help="0 is greedy (the endpoint's default)")
    chat.add_argument("--top-p", type=float)
    chat.add_argument("--no-stream", action="store_true", help="print each answer whole instead of streaming it")
    chat.add_argument("--s3-staging", metavar="S3_URI",
                      help="s3://bucket/prefix/ for images over the 6 MB request limit")
    chat.add_argument("--no-replay", action="store_true",
                      help="fail instead of reopening and replaying a lost session")
    chat.set_defaults(run=cmd_chat)


def cmd_chat(args) -> int:
    from botocore.exceptions import BotoCoreError, ClientError
    from llava_sessions.deploy.client import (
        ReplayDivergenceWarning,
        SessionClient,
        SessionError,
    )

    client = SessionClient(
        args.endpoint,
        region=args.region,
        profile=args.profile,
        endpoint_url=args.endpoint_url,
        s3_staging=args.s3_staging,
        replay=not args.no_replay,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
    )
    try:
        session = client.open(images=args.image)
    except (SessionError, BotoCoreError, ClientError, OSError, ValueError, TypeError) as exc:
        _note(f"could not open a session on {args.endpoint}: {exc}")
        return 1
    expires = f" until {session.expires_at:%H:%M:%SZ}" if session.expires_at else ""
    _note(f"session {session.id} open{expires} with {len(args.image)} image(s); /help for commands, /quit to leave")
    code = 0
    with warnings.catch_warnings():
        warnings.simplefilter("always", ReplayDivergenceWarning)
        warnings.showwarning = _show_warning
        try:
            _loop(session, stream=not args.no_stream)
        except KeyboardInterrupt:
            print(file=sys.stdout, flush=True)
        finally:
            try:
                session.close()
                _note(f"session {session.id} closed")
            except (SessionError, BotoCoreError, ClientError, OSError) as exc:
                _note(f"closing the session failed: {exc}")
                code = 1
    return code


def _loop(session, stream: bool) -> None:
    from botocore.exceptions import BotoCoreError, ClientError
    from llava_sessions.deploy.client import SessionError

    attached: list[str] = []
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(flush=True)
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return
        if text == "/help":
            _note(HELP)
            continue
        if text == "/history":
            for message in session.messages():
                print(f"[{message['role']}] {printable(message['content'])}", flush=True)
            continue
        if text.startswith("/image"):
            path = text[len("/image"):].strip()
            if path:
                attached.append(path)
                _note(f"{path} goes with your next message")
            else:
                _note("usage: /image PATH")
            continue
        if text.startswith("/"):
            _note(f"unknown command {text.split()[0]}; /help lists them")
            continue
        reopened = session.reopened
        try:
            _answer(session, line, attached, stream)
            attached = []
        except SessionError as exc:
            _note(f"error {exc}")
        except (BotoCoreError, ClientError, OSError, ValueError, TypeError) as exc:
            _note(f"error: {exc}")
        if session.reopened != reopened:
            _note(f"the session was lost ({session.last_reopen_reason}); reopened as {session.id} "
                  f"and replayed the conversation")


def _answer(session, line: str, images: list[str], stream: bool) -> None:
    if not stream:
        print(printable(session.ask(line, images=images)), flush=True)
        return
    turn = None
    try:
        turn = session.stream(line, images=images)
        for piece in turn:
            sys.stdout.write(printable(piece))
            sys.stdout.flush()
    except KeyboardInterrupt:
        if turn is not None:
            turn.close()
        print(flush=True)
        _note("stopped: that answer is not part of the conversation; the next question follows the last whole one")
        return
    print(flush=True)


def printable(text: str) -> str:
    """Model output as the terminal should show it: control characters (an ESC that would start a
    terminal escape sequence, a bell, a carriage return that overwrites the line) are dropped;
    newlines and tabs stay."""
    return "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) != "Cc")


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    _note(f"warning: {message}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llava-sessions")
    register(parser.add_subparsers(required=True))
    args = parser.parse_args(["chat", *(argv or [])])
    return args.run(args)
