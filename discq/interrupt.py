"""Stopping a long run: Ctrl-C (SIGINT) and SIGTERM.

In the library, Ctrl-C raises `KeyboardInterrupt` as usual, after `quantize_` has put every
weight back; checkpoints written so far stay on disk. Inside a Lightning fit (DiscQuant,
fine-tuning), where Lightning would exit the process, it is `Interrupted`, a `KeyboardInterrupt`
that knows its signal. Under `signals_raise` SIGTERM raises `Interrupted` too, instead of killing
the process before anything is restored. The command line and the demo run under
`exit_on_signals`, which returns the shell's code for a signalled process: 130 for SIGINT, 143
for SIGTERM (128 + the signal number), never 0.
"""
from __future__ import annotations

import contextlib
import signal
import sys


class Interrupted(KeyboardInterrupt):
    """A run stopped by signal `signum`; `exit_code` is what a command line should return."""

    def __init__(self, signum: int = signal.SIGINT):
        self.signum = int(signum)
        super().__init__(f"stopped by {signal.Signals(self.signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def as_interrupted(exc: BaseException) -> Interrupted | None:
    """`exc` as an `Interrupted` when it stands for a signal (Ctrl-C, SIGTERM), else None."""
    if isinstance(exc, Interrupted):
        return exc
    if isinstance(exc, KeyboardInterrupt):
        return Interrupted(signal.SIGINT)
    return None


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_raise():
    """Inside: SIGINT and SIGTERM raise `Interrupted` (SIGTERM would otherwise kill the process
    before anything is restored or reported). The previous handlers come back on exit."""
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def exit_on_signals(main, what: str, aftermath: str = "") -> int:
    """Run `main()` (returns an exit code) with `signals_raise`; a signal ends it with one line
    on stderr (`what`: stopped by SIGTERM; `aftermath`) and 128 + the signal number."""
    try:
        with signals_raise():
            return main()
    except KeyboardInterrupt as e:
        stop = as_interrupted(e)
        print(f"\n{what}: {stop}" + (f"; {aftermath}" if aftermath else ""), file=sys.stderr)
        return stop.exit_code
