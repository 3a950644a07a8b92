"""How every maskgen command line ends: one-line user errors, tracebacks for bugs, documented exit codes.

    0   finished
    75  preempted: a checkpoint was written, rerun the same command to resume
        (EX_TEMPFAIL; `MASKGEN_PREEMPT_EXIT_CODE=N` changes it for schedulers that requeue on N)
    2   usage error: a bad flag or flag combination (nothing was written)
    1   everything else: a user error (bad file, incompatible checkpoint, held lock, full disk) or a bug

Why one place: schedulers (SLURM, TPU queues, shell loops) decide from the exit status whether to requeue,
and a user reads the last line of stderr. A user error is printed as one line
`maskgen: error: <what, naming the flag or file, and what to do>`; its traceback only appears with
`--verbose` or `MASKGEN_VERBOSE=1`. Anything that is not a user error is an internal error and keeps its
traceback, so bugs stay debuggable.

User errors are `UserError` (and its `UsageError`, exit 2), `ValueError` and `FileNotFoundError`
(CONTRIBUTING: host-side validation raises ValueError naming the key or flag), and absl's / argparse's
flag-parse errors. The entry points (`train.py`, `sample.py`, `python -m maskgen.eval`,
`python -m maskgen.convert`) run their `main` through `run_absl` or `run`.
"""
import logging
import os
import sys
import traceback
from typing import Any, Callable, NoReturn, Optional, Sequence

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PREEMPTED_DEFAULT = 75  # EX_TEMPFAIL from sysexits.h: "try again later"
PREEMPT_EXIT_ENV = "MASKGEN_PREEMPT_EXIT_CODE"
VERBOSE_ENV = "MASKGEN_VERBOSE"
PREFIX = "maskgen: error: "


class UserError(Exception):
    """An error caused by the user's input or environment: printed as one line, exit 1."""

    exit_code = EXIT_FAILURE


class UsageError(UserError):
    """A bad flag value or flag combination, found before anything was written: exit 2."""

    exit_code = EXIT_USAGE


class Preempted(UserError):
    """The run stopped on SIGTERM after writing a checkpoint; the same command resumes it."""

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return preempt_exit_code()


def preempt_exit_code() -> int:
    """The exit status for "preempted, checkpoint written": 75 unless MASKGEN_PREEMPT_EXIT_CODE says."""
    text = os.environ.get(PREEMPT_EXIT_ENV, "").strip()
    if not text:
        return EXIT_PREEMPTED_DEFAULT
    try:
        code = int(text)
    except ValueError:
        code = -1
    if not 0 <= code <= 255:
        print(f"{PREFIX}{PREEMPT_EXIT_ENV}={text!r} is not an exit status 0..255; using "
              f"{EXIT_PREEMPTED_DEFAULT}", file=sys.stderr)
        return EXIT_PREEMPTED_DEFAULT
    return code


def verbose(argv: Optional[Sequence[str]] = None) -> bool:
    """True when tracebacks of user errors were asked for (`--verbose` or MASKGEN_VERBOSE=1)."""
    if os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    args = sys.argv[1:] if argv is None else argv
    return any(a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1") for a in args)


def is_user_error(err: BaseException) -> bool:
    """Errors a user causes and can fix (see the module docstring); everything else is a bug."""
    return isinstance(err, (UserError, ValueError, FileNotFoundError, NotADirectoryError,
                            IsADirectoryError, PermissionError))


def one_line(err: BaseException) -> str:
    """The error as the single line a user sees (newlines folded, no type name for our own errors)."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, OSError) and not isinstance(err, UserError) and err.filename and \
            str(err.filename) not in text:
        text = f"{err.filename}: {text}"
    return text


def report(err: BaseException, argv: Optional[Sequence[str]] = None) -> int:
    """Prints `err` the way the CLIs do and returns the exit status it maps to."""
    if isinstance(err, KeyboardInterrupt):
        print(f"{PREFIX}interrupted", file=sys.stderr)
        return 130
    if isinstance(err, Preempted):
        print(f"maskgen: {one_line(err)}", file=sys.stderr)
        return err.exit_code
    if is_user_error(err):
        if verbose(argv):
            traceback.print_exception(err, file=sys.stderr)
        print(PREFIX + one_line(err), file=sys.stderr)
        return getattr(err, "exit_code", EXIT_FAILURE)
    traceback.print_exception(err, file=sys.stderr)
    print(f"{PREFIX}internal error ({type(err).__name__}: {one_line(err)[:300]}); the traceback above "
          "is a bug report", file=sys.stderr)
    return EXIT_FAILURE


def exit_now(code: int) -> NoReturn:
    """Flushes and exits without waiting for background threads.

    After a failed or timed-out checkpoint save, orbax's writer threads and their event loops may
    never finish; a normal interpreter shutdown would then wait on them forever (issue 16: a full
    disk hung the process until SIGKILL) or print pages of "Event loop is closed".
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed pipe must not change the exit status
            pass
    os._exit(code)


def quiet_library_errors() -> None:
    """Drops orbax's own ERROR tracebacks unless verbose: a failed save is reported once, by us."""
    if verbose():
        return

    class _DropOrbax(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "/orbax/" not in record.pathname.replace(os.sep, "/") or record.levelno < logging.ERROR

    for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
        handler.addFilter(_DropOrbax())

    # tensorstore reports callbacks into orbax's already-closed asyncio loops (after a failed write)
    # through sys.excepthook / unraisablehook, dozens of times: the same failure, already reported by us.
    previous = sys.excepthook

    def hook(kind: str, value: BaseException | None, tb: Any) -> None:
        if isinstance(value, RuntimeError) and "Event loop is closed" in str(value):
            return
        previous(kind, value, tb)

    sys.excepthook = hook
    previous_unraisable = sys.unraisablehook

    def unraisable(info: Any) -> None:
        if isinstance(info.exc_value, RuntimeError) and "Event loop is closed" in str(info.exc_value):
            return
        previous_unraisable(info)

    sys.unraisablehook = unraisable


def run(main: Callable[[Optional[Sequence[str]]], Optional[int]],
        argv: Optional[Sequence[str]] = None) -> NoReturn:
    """Runs an argparse-style `main(argv) -> exit status` and exits with the mapped status."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        code = main(args)
    except SystemExit as err:  # argparse exits 2 on usage errors itself
        code = err.code if isinstance(err.code, int) else (EXIT_OK if err.code is None else EXIT_FAILURE)
    except BaseException as err:  # noqa: BLE001 - every failure becomes an exit status
        exit_now(report(err, args))
    sys.exit(EXIT_OK if code is None else int(code))


def _absl_flags_parser(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing with a one-line message and exit 2 (absl itself exits 1)."""
    from absl import flags
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        message = one_line(err)
    except (AttributeError, KeyError) as err:  # ml_collections: an override naming a key the config lacks
        key = str(err).strip("\"'")
        bad = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.") and key in a.split("=", 1)[0]]
        message = (f"{bad[0] if bad else 'a --config override'}: the config has no key {key!r} (typo? "
                   "configs/common.py lists every key)")
    print(PREFIX + message + f" (see {os.path.basename(argv[0])} --helpfull)", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def run_absl(main: Callable[[Sequence[str]], Optional[int]]) -> NoReturn:
    """`absl.app.run(main)` with maskgen's exit codes and one-line user errors."""
    from absl import app

    def wrapped(argv: Sequence[str]) -> int | None:
        try:
            code = main(argv)
        except app.UsageError as err:
            exit_now(report(UsageError(str(err))))
        except SystemExit:
            raise
        except BaseException as err:  # noqa: BLE001
            exit_now(report(err))
        return code

    app.run(wrapped, flags_parser=_absl_flags_parser)
    sys.exit(EXIT_OK)
