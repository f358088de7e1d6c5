"""`python -m client`: generate text or check health against a Lepton (Triton) server."""

from __future__ import annotations

import argparse
import sys
from contextlib import closing

from client.api import DEFAULT_TIMEOUT_S, DEFAULT_URLS, HEALTH_TIMEOUT_S, PROTOCOLS, generate, health
from client.errors import ClientError
from client.request import MODEL_NAME
from client.stats import GenerationStats

EXIT_INTERRUPTED = 130
SUMMARY_HELP = """\
After the text, one line goes to stderr: finish_reason, input_tokens, output_tokens,
ttft_ms (request to first text; to the whole text without --stream), total_s, and
tokens_per_s (output tokens over total_s). Server errors print `error: <message>` and exit 1.
Ctrl-C stops the request (gRPC cancels it; HTTP closes the connection) and exits 130."""


def main(argv: list[str] | None = None) -> int:
    """Parse argv, run the command, return the exit code."""
    args = _parser().parse_args(argv)
    args.url = args.url or DEFAULT_URLS[args.protocol]
    try:
        return args.run(args)
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def run_generate(args: argparse.Namespace) -> int:
    """Print the completion as it arrives, then the summary line on stderr."""
    sampling = {name: getattr(args, name) for name in
                ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")}
    sampling["ignore_eos"] = True if args.ignore_eos else None
    chunks = generate(args.prompt, protocol=args.protocol, url=args.url, stream=args.stream,
                      model=args.model, timeout=args.timeout, **sampling)
    stats = GenerationStats()  # NOTE: after generate() (it imports the protocol's module), before sending
    try:
        with closing(chunks):
            for chunk in chunks:
                stats.observe(chunk)
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        _end_line()
        print(f"cancelled after {stats.num_output_tokens} output tokens", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ClientError:
        if stats.ended_at is not None:
            _end_line()  # end the partial text before the error line
        raise
    _end_line()
    print(stats.summary(), file=sys.stderr)
    return 0


def run_health(args: argparse.Namespace) -> int:
    """Print each check; exit 0 only if every check passed."""
    print(f"checking {args.url} over {args.protocol}")
    checks = health(protocol=args.protocol, url=args.url, model=args.model, timeout=args.timeout)
    for check in checks:
        detail = f" ({check.detail})" if check.detail else ""
        print(f"  {check.name}: {'yes' if check.ok else 'no'}{detail}")
    return 0 if len(checks) == 3 and all(c.ok for c in checks) else 1


def _end_line() -> None:
    sys.stdout.write("\n")
    sys.stdout.flush()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m client", description="Generate text or check health against a Lepton (Triton) server.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(commands)
    _add_health(commands)
    return parser


def _add_generate(commands) -> None:
    gen = commands.add_parser(
        "generate", help="generate a completion of a prompt", description=(
            "Generate a completion of PROMPT and print it (the prompt itself is not printed).\n"
            "Sampling options left out take the server's defaults."),
        epilog=SUMMARY_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    gen.add_argument("prompt", help="the text to complete")
    gen.add_argument("--stream", action="store_true",
                     help="ask for the text in pieces as tokens are generated (default: all at once at the end)")
    gen.add_argument("--max-tokens", type=int, metavar="N",
                     help="generate at most N tokens (default: the server's, 128 unless configured)")
    gen.add_argument("--temperature", type=float, metavar="T",
                     help="sampling temperature; 0 is greedy (server default: 1.0)")
    gen.add_argument("--top-p", type=float, metavar="P",
                     help="nucleus sampling mass, in (0, 1] (server default: 1.0)")
    gen.add_argument("--top-k", type=int, metavar="K",
                     help="sample among the K most likely tokens; 0 means all (server default: 0)")
    gen.add_argument("--seed", type=int, metavar="S",
                     help="seed that makes sampling reproducible (default: unseeded)")
    gen.add_argument("--stop", action="append", metavar="STR",
                     help="stop when STR is generated; STR is not printed (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    _add_connection_options(gen)
    gen.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT_S, metavar="S",
                     help=f"give up on the request after S seconds (default: {DEFAULT_TIMEOUT_S:g})")
    gen.set_defaults(run=run_generate)


def _add_health(commands) -> None:
    check = commands.add_parser(
        "health", help="check that the server and the model are ready",
        description="Check server live, server ready and model ready; exit 0 if all are, else 1.")
    _add_connection_options(check)
    check.add_argument("--timeout", type=_seconds, default=HEALTH_TIMEOUT_S, metavar="S",
                       help=f"seconds each check may take (default: {HEALTH_TIMEOUT_S:g})")
    check.set_defaults(run=run_health)


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--protocol", choices=PROTOCOLS, default="grpc",
                        help="how to talk to the server (default: grpc)")
    parser.add_argument("--url", metavar="HOST:PORT", help=(
        f"server address (default: {DEFAULT_URLS['grpc']} for grpc, {DEFAULT_URLS['http']} for http)"))
    parser.add_argument("--model", default=MODEL_NAME, help=f"model name (default: {MODEL_NAME})")


def _seconds(text: str) -> float:
    """argparse type: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


if __name__ == "__main__":
    sys.exit(main())
