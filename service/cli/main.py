"""The ``bulkhook`` command line.

Exit codes: 0 success, 1 a negative answer (``verify``: invalid), 2 usage errors
(a bad setting included), 3 ``serve`` or ``sandbox`` could not start (a taken port, a
store that cannot be opened).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from typing import BinaryIO, NoReturn

from service import __version__
from service.callbacks import signatures
from service.cli.export import add_export_command
from service.cli.instances import add_instances_command
from service.cli.remote import CommandError, add_job_commands, report
from service.values import is_clean

__all__ = ["main"]

USAGE_ERROR = 2
CANNOT_START = 3
_MAX_PORT = 65535


class _UsageError(Exception):
    """A mistake in how the command was called: one line on stderr, exit 2."""


def _read_body(name: str, stdin: BinaryIO) -> bytes:
    """The body exactly as stored: no newline added or stripped."""
    if name == "-":
        return stdin.read()
    try:
        with open(name, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise _UsageError(f"cannot read {name}: {exc.strerror or exc}") from None


def _keys(given: list[str] | None) -> list[str]:
    """The keys of ``--key`` when given (an empty one is a mistake, never a quiet
    fallback to ``OC_SIGNATURE_KEYS`` nor a key to verify with), else the
    environment's. A key is text: HMAC runs over its UTF-8 bytes, as the service's
    does, so bytes that are not UTF-8 can be no instance's key."""
    if given is not None:
        if any(not key.strip() for key in given):
            raise _UsageError("--key is empty")
        keys, source = given, "--key"
    else:
        from_env = [k.strip() for k in os.environ.get("OC_SIGNATURE_KEYS", "").split(",")]
        keys, source = [k for k in from_env if k], "OC_SIGNATURE_KEYS"
    if not keys:
        raise _UsageError("no signature key: pass --key K or set OC_SIGNATURE_KEYS")
    if not all(is_clean(key) for key in keys):  # not UTF-8: lone surrogates in argv
        raise _UsageError(f"a key in {source} is not valid UTF-8 text")
    return keys


def _verify(args: argparse.Namespace, stdin: BinaryIO) -> int:
    keys = _keys(args.key)
    body = _read_body(args.file, stdin)
    result = signatures.verify(args.signature, body, keys)
    if result.ok:
        print("valid")
        return 0
    print(f"invalid: {result.reason}")
    if result.verdict is signatures.Verdict.MISMATCH and body.endswith(b"\n"):
        print(f"hint: {_newline_hint(args.signature, body, keys)}", file=sys.stderr)
    return 1


def _newline_hint(header: str, body: bytes, keys: list[str]) -> str:
    """The usual cause of a mismatch by hand: a body saved or piped with a newline the
    sender never signed (``echo`` adds one)."""
    for trimmed in (body[:-1], body.rstrip(b"\r\n")):
        if signatures.verify(header, trimmed, keys).ok:
            return (
                "the signature matches the body without its trailing newline: it is signed"
                " like any other byte (echo adds one, printf '%s' does not)"
            )
    return (
        "the body ends with a newline, which is signed like any other byte"
        " (echo adds one, printf '%s' does not)"
    )


def _sign(args: argparse.Namespace, stdin: BinaryIO) -> int:
    key = _keys(None if args.key is None else [args.key])[0]
    body = _read_body(args.file, stdin)
    print(signatures.sign(key, body, args.algo))
    return 0


def _sandbox(args: argparse.Namespace, stdin: BinaryIO) -> int:
    import uvicorn

    from service.sandbox import API_PREFIX, Sandbox, SandboxOptions
    from service.server.thread import bind_socket

    _check_port(args.port)
    try:
        options = SandboxOptions(
            signature_key=args.signature_key,
            signature_algo=args.signature_algo,
            job_seconds=args.job_seconds,
            drop_callbacks=args.drop_callbacks,
            duplicate_callbacks=args.duplicate_callbacks,
            callback_delay=args.callback_delay,
            wrong_key=args.wrong_key,
            fail_rate=args.fail_rate,
            fail_whole=args.fail_whole,
            **(
                {"fail_whole_message": args.fail_whole_message}
                if args.fail_whole_message is not None
                else {}
            ),
            retry_after=args.retry_after,
            callback_retries=args.callback_retries,
            callback_retry_base=args.callback_retry_base,
            legacy_status_names=args.legacy_status_names,
            callback_url=args.callback_url,
            retention=args.retention,
            generated_records=args.generated_records,
            seed=args.seed,
        )
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    signing = (
        f"signed with {options.signature_algo}" + (" by a WRONG key" if options.wrong_key else "")
        if options.signature_key
        else "unsigned (no --signature-key)"
    )
    # Bound before anything claims to listen: a taken port is one line, as for serve,
    # not uvicorn's log of its failed start.
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        print(f"bulkhook sandbox: error: {exc.strerror or exc}", file=sys.stderr)
        return CANNOT_START
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"bulkhook sandbox: Open Connectors simulator at "
        f"http://{host}:{sock.getsockname()[1]}{API_PREFIX}; callbacks {signing}",
        flush=True,
    )
    config = uvicorn.Config(Sandbox(options).app, log_level="info")
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def _serve(args: argparse.Namespace, stdin: BinaryIO) -> int:
    from service.config import ConfigError, Settings
    from service.server.serve import StartupError, serve

    _check_port(args.port)
    try:
        settings = Settings.from_env()
        settings.check_bind(args.host)
    except ConfigError as exc:
        raise _UsageError(str(exc)) from None
    try:
        return serve(settings, args.host, args.port)
    except StartupError as exc:
        print(f"bulkhook serve: error: {exc}", file=sys.stderr)
        return CANNOT_START


def _demo(args: argparse.Namespace, stdin: BinaryIO) -> int:
    from service.cli.demo import run_demo

    return run_demo()


def _check_port(port: int) -> None:
    if not 0 <= port <= _MAX_PORT:
        raise _UsageError(f"--port must be from 0 to {_MAX_PORT}, got {port}")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1: {text}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number: {text}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bulkhook",
        description="Submit Open Connectors bulk jobs and receive their verified callbacks.",
    )
    parser.add_argument("--version", action="version", version=f"bulkhook {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    verify = commands.add_parser(
        "verify",
        help="check an Elements-Webhook-Signature against a body",
        description="Exit 0 and print 'valid' when the signature matches the raw bytes "
        "under any key; exit 1 and print 'invalid: <reason>' when not; exit 2 on usage "
        "errors. Keys default to OC_SIGNATURE_KEYS.",
    )
    verify.add_argument("--key", action="append", help="signature key (repeat for rotation)")
    verify.add_argument("--signature", required=True, help="the header value, e.g. 'sha256=…'")
    verify.add_argument("file", nargs="?", default="-", help="body file, or - for stdin")
    verify.set_defaults(run=_verify)

    sign = commands.add_parser("sign", help="print the signature header value for a body")
    sign.add_argument("--key", help="signature key (default: first of OC_SIGNATURE_KEYS)")
    sign.add_argument("--algo", choices=signatures.ALGORITHMS, default="sha256")
    sign.add_argument("file", nargs="?", default="-", help="body file, or - for stdin")
    sign.set_defaults(run=_sign)

    sandbox = commands.add_parser("sandbox", help="run the Open Connectors simulator alone")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8900)
    sandbox.add_argument("--signature-key", help="the instance's signature key")
    sandbox.add_argument("--signature-algo", choices=signatures.ALGORITHMS, default="sha256")
    sandbox.add_argument("--job-seconds", type=_seconds, default=2.0, help="how long a job runs")
    sandbox.add_argument("--drop-callbacks", type=_fraction, default=0.0, metavar="F")
    sandbox.add_argument("--duplicate-callbacks", type=_fraction, default=0.0, metavar="F")
    sandbox.add_argument("--callback-delay", type=_seconds, default=0.0, metavar="S")
    sandbox.add_argument(
        "--wrong-key",
        action="store_true",
        help="sign with a key not the instance's",
    )
    sandbox.add_argument(
        "--fail-rate",
        type=_fraction,
        default=0.0,
        metavar="F",
        help="share of API calls failing 500/429",
    )
    sandbox.add_argument(
        "--fail-whole",
        type=_fraction,
        default=0.0,
        metavar="F",
        help="share of jobs failing as a whole: ABORTED, with an error",
    )
    sandbox.add_argument(
        "--fail-whole-message",
        metavar="TEXT",
        help="the error of those jobs (default: \"All prospects require either 'email' or 'id'\")",
    )
    sandbox.add_argument("--retry-after", type=_seconds, default=1.0, metavar="S")
    sandbox.add_argument("--callback-retries", type=int, default=9, metavar="N")
    sandbox.add_argument("--callback-retry-base", type=_seconds, default=1.0, metavar="S")
    sandbox.add_argument("--legacy-status-names", action="store_true")
    sandbox.add_argument("--callback-url", help="the instance-wide callback URL")
    sandbox.add_argument(
        "--retention",
        type=_seconds,
        default=3 * 86400.0,
        metavar="S",
        help="seconds a job's status and failed records are kept after it ends",
    )
    sandbox.add_argument(
        "--generated-records",
        type=int,
        default=0,
        metavar="N",
        help="offer the object 'generated' with N computed records to bulk queries",
    )
    sandbox.add_argument("--seed", type=int, help="seed for the fault dice")
    sandbox.set_defaults(run=_sandbox)

    serve = commands.add_parser("serve", help="run the service")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(run=_serve)

    add_job_commands(commands)
    add_export_command(commands)
    add_instances_command(commands)

    demo = commands.add_parser("demo", help="show the whole flow on embedded defaults")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None, stdin: BinaryIO | None = None) -> NoReturn:
    args = _parser().parse_args(argv)
    try:
        code = args.run(args, stdin or sys.stdin.buffer)
    except _UsageError as exc:
        print(f"bulkhook {args.command}: error: {exc}", file=sys.stderr)
        code = USAGE_ERROR
    except CommandError as exc:
        code = report(exc, args.command)
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        # The reader went away (`| head`): say nothing more, as the Python docs advise
        # for SIGPIPE, and keep the interpreter's last flush from failing too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    sys.exit(code)
