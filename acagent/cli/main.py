"""The command line: ``acagent [run|check] --serverUrl URL --apiKeyFile FILE``, ``acagent demo``.

``main`` dispatches the subcommands; ``run`` runs the agent with the settings
that ``options`` reads from flags and environment. This module is the only place
that installs signal handlers: SIGTERM/SIGINT once = graceful stop, twice =
stop now; SIGUSR1 = log a status line; SIGHUP = re-read ``--apiKeyFile``.
Exit codes: ``EXIT_*`` below (docs/operations.md, "Exit codes").
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any, Optional, Sequence

from ..errors import ConfigError, SpoolLockedError
from .options import FLAG_OF_FIELD, read_settings, startup_line

log = logging.getLogger("acagent.cli")

#: stopped, every result delivered
EXIT_OK = 0
#: stopped because the agent cannot go on (an agent thread died)
EXIT_FATAL = 1
#: bad settings, or nothing could start (spool locked, health port taken)
EXIT_SETTINGS = 2
#: stopped before every result was delivered (the shutdown deadline or a
#: second signal): the rest is kept in the spool for the next start
EXIT_KEPT = 3



def run(argv: Sequence[str]) -> int:
    from .. import logs
    from ..health import ListenError
    from ..pipeline import Pipeline

    if hasattr(signal, "SIGHUP"):
        # until the reload handler is in place below, SIGHUP must not end the agent
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    settings = read_settings(argv)
    config = settings.config
    logs.register_secret(config.api_key)
    for secret in (config.coordination_password, _url_password(config.coordination_url)):
        if secret:
            logs.register_secret(secret)
    logs.setup_logging(
        log_format=config.log_format,
        debug=config.debug_mode,
        stdout=config.enable_stdout_logging,
        file_dir=config.resolved_log_dir() if config.enable_file_logging else None,
        index=config.index,
    )
    log.info("%s", startup_line(config))
    for line in settings.warnings:
        log.warning("%s", line)
    try:
        pipeline = Pipeline(config)
    except ConfigError as exc:  # a setting only a live service can judge (a Redis password)
        flag = FLAG_OF_FIELD.get(exc.field, exc.field)
        print(f"acagent: error: argument {flag}: {exc.message}", file=sys.stderr)
        return EXIT_SETTINGS
    signals_seen = 0

    def on_stop_signal(signum: int, _frame: Any) -> None:
        # Flags only (Pipeline.signal_stop): a handler that takes a lock can
        # hang the process when the main thread holds that lock right now.
        nonlocal signals_seen
        signals_seen += 1
        pipeline.signal_stop(hurry=signals_seen > 1)

    signal.signal(signal.SIGTERM, on_stop_signal)
    signal.signal(signal.SIGINT, on_stop_signal)
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, lambda *_: pipeline.signal_status())
    if hasattr(signal, "SIGHUP"):
        # the default action would end the agent; the reload runs off the handler
        signal.signal(signal.SIGHUP, lambda *_: pipeline.signal_reload())
    try:
        drained = pipeline.run_forever()
    except SpoolLockedError as exc:
        print(f"acagent: {exc}", file=sys.stderr)
        return EXIT_SETTINGS
    except ListenError as exc:  # nothing was started
        print(
            f"acagent: error: argument --healthAddr: {exc}; "
            "free that port or give another host:port",
            file=sys.stderr,
        )
        return EXIT_SETTINGS
    except OSError as exc:  # nothing was started
        print(f"acagent: cannot start: {exc}", file=sys.stderr)
        return EXIT_SETTINGS
    if pipeline.fatal_reason is not None:
        log.critical("exiting: %s", pipeline.fatal_reason)
        print(f"acagent: stopped because {pipeline.fatal_reason}", file=sys.stderr)
        return EXIT_FATAL
    if not drained:
        log.warning(
            "exiting (exit code %d): results not delivered are kept in the spool", EXIT_KEPT
        )
        return EXIT_KEPT
    log.info("exiting (all results delivered)")
    return EXIT_OK


def _url_password(url: Optional[str]) -> Optional[str]:
    from urllib.parse import urlsplit

    return urlsplit(url).password if url else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``acagent [run|check|demo] ...`` (``USAGE``): run the subcommand, then exit with its code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "demo":
        if any(a == "--agents" or a.startswith("--agents=") for a in args[1:]):
            from .demo_multi import main as demo_main
        else:
            from .demo import main as demo_main

        code = demo_main(args[1:])
    elif args and args[0] == "check":
        from .check import main as check_main

        code = check_main(args[1:])
    else:
        if args and args[0] == "run":
            args = args[1:]
        code = run(args)
    # Executor threads blocked in a target read would hold interpreter exit
    # until their timeout; every result is delivered or spooled by now.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
