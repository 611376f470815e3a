"""`make run-model`: the bridge in front of a real model, in one command.

Starts llama-server (Gemma 3 270M from `.venv-model`, slot files in
var/slots) on a loopback port, waits until it has loaded the model, then runs
the bridge as `make run` does (`sessionbridge demo`, which prints a demo key
and curl lines) with the OpenAI-compatible flavor pointed at it. When the
bridge stops (Ctrl-C, SIGTERM), llama-server is stopped too.

    python bench/run_model.py [--db var/model.db] [--slot-dir var/slots] [--llama-port N]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from types import FrameType

from llama_server import REPO, LlamaServer, LlamaServerFailed, ModelMissing

# Replies of a few dozen tokens keep a turn to a second or two on two cores;
# the base model rambles to whatever limit it is given.
DEFAULT_MAX_TOKENS = "64"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="run_model.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default="var/model.db", help="the bridge's database")
    parser.add_argument("--slot-dir", default="var/slots", help="llama-server's --slot-save-path")
    parser.add_argument("--llama-port", type=int, default=0,
                        help="llama-server's port (default: a free one)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    slot_dir = (REPO / args.slot_dir).resolve()
    db = (REPO / args.db).resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    log_path = db.parent / "llama-server.log"
    try:
        llama = LlamaServer(slot_dir, log_path, port=args.llama_port or None)
    except ModelMissing as exc:
        print(f"run-model: {exc}", file=sys.stderr)
        return 1
    bridge: subprocess.Popen[bytes] | None = None

    def stop(signum: int, frame: FrameType | None) -> None:
        # SIGTERM to this process: let the bridge stop gracefully, then llama-server.
        if bridge is not None and bridge.poll() is None:
            bridge.send_signal(signal.SIGTERM)
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        print(f"run-model: starting llama-server on {llama.root} (log: {log_path}) ...",
              flush=True)
        try:
            llama.start()
        except LlamaServerFailed as exc:
            print(f"run-model: {exc}", file=sys.stderr)
            return 1
        print("run-model: llama-server is up: Gemma 3 270M, a small *base* model (it often"
              " echoes or rambles; it is here to show the mechanics, not to chat well)",
              flush=True)
        env = {k: v for k, v in os.environ.items() if k not in (
            "SESSIONBRIDGE_UPSTREAM_USER", "SESSIONBRIDGE_UPSTREAM_PASSWORD")}
        env.update(
            SESSIONBRIDGE_UPSTREAM_FLAVOR="openai",
            SESSIONBRIDGE_UPSTREAM_URL=llama.base_url,
            SESSIONBRIDGE_SLOT_SAVE="on",
            SESSIONBRIDGE_SLOT_DIR=str(slot_dir),
        )
        env.setdefault("SESSIONBRIDGE_DEFAULT_MAX_TOKENS", DEFAULT_MAX_TOKENS)
        bridge = subprocess.Popen(
            [sys.executable, "-m", "sessionbridge", "demo", "--db", str(db)], env=env,
        )
        try:
            return bridge.wait()
        except KeyboardInterrupt:
            # Ctrl-C in a terminal reaches the bridge too (same process group);
            # an interrupt sent to this process alone must stop it as well.
            if bridge.poll() is None:
                bridge.send_signal(signal.SIGTERM)
            try:
                return bridge.wait(timeout=60)
            except subprocess.TimeoutExpired:
                bridge.kill()
                return bridge.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        if bridge is not None and bridge.poll() is None:
            bridge.kill()
            bridge.wait()
        llama.stop()
        print("run-model: llama-server stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
