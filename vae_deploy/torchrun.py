"""``python -m vae_deploy.torchrun [--hint TEXT] TORCHRUN-ARGS``: torchrun whose failures end in one line.

The same launcher as the ``torchrun`` command (``torch.distributed.run``), used by ``vae-deploy
train --nproc N``. Only its reporting differs: torchrun's own log lines and its multi-line failure
report (a traceback and a table) are left out. A rank that ends with an error has printed it in
one line itself, so nothing is added; a rank killed by a signal (SIGKILL, the OOM killer) is named
in one line ending with ``TEXT``. The exit code is the failed rank's (128 + signal when killed).
``VAE_DEPLOY_DEBUG=1`` keeps torchrun's logs and report.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from vae_deploy.errors import first_line


def main(argv: list[str] | None = None) -> int:
    """Run torchrun with ``argv``; return the exit code described above."""
    args = list(sys.argv[1:] if argv is None else argv)
    hint = ""
    if args[:1] == ["--hint"] and len(args) >= 2:
        hint, args = args[1], args[2:]
    debug = os.environ.get("VAE_DEPLOY_DEBUG") == "1"
    if not debug:
        logging.disable(logging.ERROR)  # torchrun's warnings and its failure log lines (this process only)

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(args))
    except ChildFailedError as exc:
        if debug:
            raise
        rank, failure = exc.get_first_failure()
        if failure.exitcode >= 0:
            return failure.exitcode or 1  # that rank (or rank 0 for errors every rank shares) said why
        try:
            name = signal.Signals(-failure.exitcode).name
        except ValueError:
            name = f"signal {-failure.exitcode}"
        tail = f"; {hint}" if hint else ""
        print(
            f"error: rank {rank} (pid {failure.pid}) was killed by {name}; torchrun stopped the other ranks{tail}",
            file=sys.stderr,
            flush=True,
        )
        return 128 - failure.exitcode
    except SignalException as exc:  # Ctrl-C / SIGTERM: forwarded to the ranks, which stopped cleanly
        return 128 + int(exc.sigval)
    except Exception as exc:  # noqa: BLE001 - torchrun itself failed (rendezvous, bad option): one line
        if debug:
            raise
        print(f"error: torchrun failed: {first_line(exc)}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
