"""What every ``python -m talkformer_core.X`` command shares: the help formatter (every option's
default shown) and the one way a run ends (an input error: one line, exit 2; Ctrl-C: one line,
exit 130; never a traceback for either)."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

EXIT_INPUT = 2  # a bad input or output path, found before the long work
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), the shell's convention


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, minus the noise: no "(default: None)" or "(default: False)"
    for unset options and flags, nothing added where the help already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        h = action.help or ""
        if ("default" in h or not action.option_strings or action.required
                or action.default is None or action.default is False or action.default == argparse.SUPPRESS):
            return h
        return h + " (default: %(default)s)"


def parser(module: str, description: str, **kw) -> argparse.ArgumentParser:
    """An ArgumentParser named ``python -m talkformer_core.<module>`` with HelpFormatter."""
    return argparse.ArgumentParser(prog=f"python -m talkformer_core.{module}", description=description,
                                   formatter_class=HelpFormatter, **kw)


def error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return EXIT_INPUT


def interrupted(msg: str = "interrupted") -> int:
    print(f"\n{msg}", file=sys.stderr)
    return EXIT_INTERRUPTED


def run(body: Callable[[], int], on_interrupt: str = "interrupted") -> int:
    """``body()`` with the shared endings: TalkFormerError -> error line, 2; KeyboardInterrupt ->
    ``on_interrupt`` line, 130."""
    from .errors import TalkFormerError

    try:
        return body()
    except TalkFormerError as e:
        return error(str(e))
    except KeyboardInterrupt:
        return interrupted(on_interrupt)
