"""Take docs/images/chat_page.png: the chat page of ``gemmax serve`` answering with the real Gemma 3 270M.

Run from the repository root (needs Debian's chromium at /usr/bin/chromium and the test extra's playwright):

    python docs/chat_page_screenshot.py [--out docs/images/chat_page.png] [--prompt TEXT]

It serves the bundled model on a free loopback port, opens the page in headless Chromium, sets the sampling
settings, sends one prompt, waits for the streamed answer to finish and saves a screenshot. The bundled model is
a base (pretrained) model, so the answer is a continuation rather than an assistant's reply.
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from playwright.sync_api import expect, sync_playwright

from gemmax.api import CausalLM
from gemmax.io.bundled import default_model_path
from gemmax.serve.server import create_app

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
PROMPT = "Here is a Python function that checks whether a word is a palindrome:"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/images/chat_page.png"))
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--max-tokens", type=int, default=110)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=6)
    args = ap.parse_args()

    lm = CausalLM.from_preset(default_model_path())
    app = create_app(lm, max_batch=1, max_len=1024)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    while not srv.started:
        if not th.is_alive():
            raise SystemExit("the server did not start")
        time.sleep(0.1)
    try:
        with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
            ctx = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=ARGS,
                                                       viewport={"width": 900, "height": 680})
            page = ctx.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            expect(page.locator("#model option")).to_have_count(1, timeout=60_000)
            page.click("#settings summary")
            page.fill("#temperature", str(args.temperature))
            page.fill("#top_p", "0.95")
            page.fill("#top_k", "64")
            page.fill("#max_tokens", str(args.max_tokens))
            page.fill("#seed", str(args.seed))
            page.click("#settings summary")
            page.fill("#prompt", args.prompt)
            page.press("#prompt", "Enter")
            expect(page.locator(".msg.assistant")).to_have_attribute("data-state", "done", timeout=300_000)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out))
            print(page.locator(".msg.assistant .body").inner_text())
            print(page.locator("#status").inner_text())
            ctx.close()
    finally:
        srv.should_exit = True
        th.join(30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
