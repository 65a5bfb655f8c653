"""``torchdiffusion studio RUN [--host 127.0.0.1] [--port 0]``: a local web page to explore a trained run.

The first line on stdout is ``serving http://HOST:PORT/``; Ctrl-C or SIGTERM stops the server, removes its
stored results and the command returns 0.
The server binds the loopback address unless ``--host`` names another one (then it says so on stderr).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from torchdiffusion._tensor import check_count
from torchdiffusion.cli.commands import command
from torchdiffusion.studio import is_loopback, make_server


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder written by `torchdiffusion train` (a diffusion or latent run)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes the page)")
    p.add_argument("--port", type=int, default=0, help="port (default 0: any free port)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads while sampling (default: the run's sample.threads, 1; 0 = torch's default)")


def _run(a) -> int:
    if not 0 <= a.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {a.port}")
    if a.threads is not None:
        check_count(a.threads, "--threads", 0)
    try:
        server = make_server(a.run, a.host, a.port, ema=not a.no_ema, device=a.device, threads=a.threads)
    except OSError as e:
        raise ValueError(f"cannot listen on {a.host}:{a.port}: {e.strerror or e}") from None

    def stop(signum, frame) -> None:  # SIGTERM (a service manager, `kill`) stops like Ctrl-C, cleaning up
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if main_thread else None
    try:
        print(f"serving {server.url}", flush=True)
        if not is_loopback(a.host):
            print(f"torchdiffusion: warning: listening on {a.host}, reachable from other machines",
                  file=sys.stderr, flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        server.server_close()
        server.studio.close()
    return 0


command("studio", "serve a local web page to explore a trained run (samplers, reverse process, compare)")(
    (_args, _run))
