"""`make run-model`: the bridge in front of a real model, in one command.

Starts llama-server (SmolLM2-135M-Instruct from `.venv-model`, slot files in
var/slots) on a loopback port, waits until it has loaded the model, then runs
the bridge as `make run` does (`sessionbridge demo`, which prints a demo key
and curl lines) with the OpenAI-compatible flavor pointed at it. Once the
bridge answers, it also prints a few lines of Python for the official
``openai`` SDK (the Responses API, with ``previous_response_id``). When the
bridge stops (Ctrl-C, SIGTERM), llama-server is stopped too.

    python bench/run_model.py [--db var/model.db] [--slot-dir var/slots] [--llama-port N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType

from llama_server import (
    MODEL_ALIAS,
    MODEL_NAME,
    REPO,
    LlamaServer,
    LlamaServerFailed,
    ModelMissing,
)

# The instruct model ends most replies by itself well before this; the cap
# keeps a rambling one to about two seconds on two cores (~100 tokens/s).
DEFAULT_MAX_TOKENS = "200"
BRIDGE_READY_DEADLINE = 60.0


def bridge_url() -> str:
    """Where `sessionbridge demo` listens: its defaults unless the environment moves it."""
    host = os.environ.get("SESSIONBRIDGE_HOST", "127.0.0.1")
    port = os.environ.get("SESSIONBRIDGE_PORT", "8080")
    return f"http://{host}:{port}"


def wait_for_bridge(bridge: subprocess.Popen[bytes], url: str) -> bool:
    """True once the bridge's /healthz answers 200; False if it exited or took too long."""
    give_up = time.monotonic() + BRIDGE_READY_DEADLINE
    while time.monotonic() < give_up and bridge.poll() is None:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    return False


def demo_token(db: Path) -> str | None:
    """The demo key's token, from the file `sessionbridge demo` keeps beside its database."""
    try:
        return db.with_name(db.name + ".demo-token").read_text().strip() or None
    except OSError:
        return None


def sdk_snippet(url: str, token: str | None) -> str:
    """Lines of Python to paste: two turns through the Responses API of the openai SDK."""
    key = json.dumps(token or "<the demo API key above>")
    return f"""
Or in Python, with the official openai SDK (pip install openai), the Responses API;
previous_response_id carries the conversation on:

  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key={key})
  first = client.responses.create(model="{MODEL_ALIAS}", input="Hello! Who are you?")
  print(first.output_text)
  second = client.responses.create(model="{MODEL_ALIAS}", input="What can you help me with?",
                                   previous_response_id=first.id)
  print(second.output_text)

Ctrl-C stops the bridge, then llama-server.
"""


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
        print(f"run-model: llama-server is up: {MODEL_NAME}, a small *instruct* model (it"
              " chats, but it is tiny: it gets facts wrong; it is here to show the mechanics,"
              " not to know things)", flush=True)
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
            url = bridge_url()
            if wait_for_bridge(bridge, url):
                print(sdk_snippet(url, demo_token(db)), flush=True)
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
