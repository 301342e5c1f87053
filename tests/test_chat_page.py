"""The chat page of ``gemmax serve`` in a real browser: Playwright driving Debian's Chromium against a real server
(uvicorn on a loopback port) with tiny random models: a text model, a LoRA adapter over it and a Gemma 3 with
images. The page must show exactly what the API answers for the same greedy request, send the picker's model,
the settings, the conversation and an uploaded image, stop an answer (the server frees the slot), and render
markdown without letting model text become markup."""

from __future__ import annotations

import base64
import dataclasses
import importlib
import io
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jax
import numpy as np
import pytest
from server_fixtures import serving
from spm_fixtures import train_tiny_sentencepiece

import gemmax
from gemmax.api import CausalLM
from gemmax.io.tokenizer import Tokenizer
from gemmax.models import gemma3_vision as g3
from gemmax.models.gemma import model as gm
from gemmax.nn import lora
from gemmax.serve.server import create_app

uvicorn = importlib.import_module("uvicorn")
sync_api = importlib.import_module("playwright.sync_api")

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; Playwright never downloads a browser here
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "sk-page-key"
MAX_LEN = 160
WAIT_MS = 30_000
LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "Gemma is a family of lightweight open models.",
    "Hello world, hello tokenizer, hello server.",
    "describe the picture please, a red square on a blue background",
] * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return train_tiny_sentencepiece(tmp_path_factory.mktemp("spm"), LINES, 160, add_dummy_prefix=False)


@pytest.fixture(scope="module")
def models(tok: Tokenizer) -> dict[str, CausalLM]:
    v = tok.vocab_size
    # named as an instruction-tuned checkpoint; the vision model keeps a base model's empty name
    text_cfg = dataclasses.replace(gemmax.tiny_config("gemma3", vocab_size=v), name="tiny-gemma-it")
    text = CausalLM.from_config(text_cfg, seed=3, tokenizer=tok)
    vision_cfg = g3.tiny_config(text_vocab_size=v, image_token_id=v - 1, boi_token_id=v - 3, eoi_token_id=v - 2)
    return {"tiny": text, "tiny-vision": CausalLM.from_config(vision_cfg, seed=1, tokenizer=tok)}


@pytest.fixture(scope="module")
def adapter(models: dict[str, CausalLM], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter with non-zero B over the text model, so that it answers differently."""
    lm = models["tiny"]
    p = lora.add_lora(lm.params, lm.linear_nodes, rank=2, targets=("query", "value"), seed=0)
    flat = gm.flatten(p)
    rng = np.random.default_rng(7)
    for k in flat:
        if k.endswith("lora_b"):
            flat[k] = jax.numpy.asarray(rng.normal(0, 0.5, flat[k].shape).astype(np.float32))
    return lora.save_adapter(tmp_path_factory.mktemp("tiny-a"), gm.unflatten(flat), lm.linear_nodes)



@pytest.fixture(scope="module")
def server(models: dict[str, CausalLM], adapter: Path) -> Iterator[tuple[str, object]]:
    app = create_app(models, api_key=KEY, max_batch=4, chunk=4, max_len=MAX_LEN, adapters={"tiny-a": adapter})
    with serving(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def url(server: tuple[str, object]) -> str:
    return server[0]


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Chromium with a fresh profile, headless, with nothing that talks to the network on its own."""
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: `make setup` installs Debian's chromium (apt-get install)"
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1000, "height": 800})
        yield ctx
        ctx.close()


@pytest.fixture
def page(browser, url: str) -> Iterator[object]:
    """A fresh tab on the chat page, with the API key entered and the models listed; every URL the page asks
    for is recorded (``page.seen``) to check that nothing comes from outside the server."""
    pg = browser.new_page()
    pg.seen = []
    pg.on("request", lambda r: pg.seen.append(r.url))
    pg.goto(url + "/")
    _enter_key(pg)
    yield pg
    pg.close()


def _enter_key(pg) -> None:
    pg.fill("#api_key", KEY)
    pg.dispatch_event("#api_key", "change")
    sync_api.expect(pg.locator("#model option")).to_have_count(3, timeout=WAIT_MS)


def _api_answer(url: str, body: dict) -> str:
    """The API's own (non-streamed) answer to a request."""
    r = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def _ask(pg, text: str, model: str = "tiny", **settings: object) -> tuple[dict, object]:
    """Pick ``model``, set ``settings``, type ``text`` and press Enter; (the posted body, the finished answer's
    message element)."""
    pg.select_option("#model", model)
    for k, v in settings.items():
        pg.fill(f"#{k}", str(v))
    n = pg.locator(".msg.assistant").count()
    pg.fill("#prompt", text)
    with pg.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as req:
        pg.press("#prompt", "Enter")
    msg = pg.locator(".msg.assistant").nth(n)
    sync_api.expect(msg).to_have_attribute("data-state", re.compile("^(done|stopped|error)$"), timeout=WAIT_MS)
    return req.value.post_data_json, msg


def _png(seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# ---- the page against the API ---------------------------------------------------------------------------


def test_key_and_chat_stream_show_the_api_answer(browser, url: str) -> None:
    """Without the key the page asks for it; with it, a typed prompt's streamed answer is the API's answer to
    the same greedy request, the second turn carries the first, and Clear starts over. Everything the page
    loads comes from the server."""
    pg = browser.new_page()
    seen: list[str] = []
    pg.on("request", lambda r: seen.append(r.url))
    r = httpx.get(url + "/", timeout=10)
    assert r.status_code == 200 and "default-src 'self'" in r.headers["content-security-policy"]
    pg.goto(url + "/")
    sync_api.expect(pg.locator("#status")).to_contain_text("API key", timeout=WAIT_MS)
    assert pg.locator("#settings").get_attribute("open") is not None
    pg.fill("#prompt", "Hello world")
    pg.press("#prompt", "Enter")
    sync_api.expect(pg.locator("#status")).to_contain_text("No model to send to")
    assert pg.locator(".msg").count() == 0 and not any(u.endswith("/chat/completions") for u in seen)
    _enter_key(pg)
    assert pg.locator("#status").inner_text() == ""

    body, msg = _ask(pg, "Hello world", temperature=0, max_tokens=12, seed=5)
    assert msg.get_attribute("data-state") == "done" and msg.get_attribute("aria-busy") is None
    assert body["stream"] is True and body["model"] == "tiny"
    assert body["temperature"] == 0 and body["max_tokens"] == 12 and body["seed"] == 5 and "top_p" not in body
    first = [{"role": "user", "content": "Hello world"}]
    assert body["messages"] == first
    want = _api_answer(url, {"model": "tiny", "messages": first, "temperature": 0, "max_tokens": 12})
    assert want.strip() and msg.locator(".body").inner_text() == want.strip()
    sync_api.expect(pg.locator("#status")).to_contain_text("tok/s")

    body, msg = _ask(pg, "Gemma is")
    second = [*first, {"role": "assistant", "content": want}, {"role": "user", "content": "Gemma is"}]
    assert body["messages"] == second
    want2 = _api_answer(url, {"model": "tiny", "messages": second, "temperature": 0, "max_tokens": 12})
    assert msg.locator(".body").inner_text() == want2.strip()

    pg.click("#clear")
    assert pg.locator(".msg").count() == 0
    body, _ = _ask(pg, "lazy dog")
    assert body["messages"] == [{"role": "user", "content": "lazy dog"}]
    assert seen and all(u.startswith(url + "/") for u in seen), seen
    pg.close()


def test_model_picker_and_image_upload(page, url: str) -> None:
    """The picker lists /v1/models and the answer comes from the picked model (an adapter answers as the API
    answers for it); the image upload is offered only for the model that reads images, and the image goes out
    as an ``image_url`` data: URI part."""
    cards = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()["data"]
    assert {c["id"]: c["input_modalities"] for c in cards} == {
        "tiny": ["text"], "tiny-vision": ["text", "image"], "tiny-a": ["text"]}
    assert {c["id"]: c["instruction_tuned"] for c in cards} == {"tiny": True, "tiny-vision": False, "tiny-a": True}
    ids = page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
    assert ids == ["tiny", "tiny-vision", "tiny-a"]
    assert page.locator("#image-picker").is_hidden()
    assert page.locator("#notice").is_hidden()  # an instruction-tuned model: no base-model notice

    body, msg = _ask(page, "Hello world", model="tiny-a", temperature=0, max_tokens=8)
    assert body["model"] == "tiny-a"
    want = _api_answer(url, {"model": "tiny-a", "messages": body["messages"], "temperature": 0, "max_tokens": 8})
    plain = _api_answer(url, {"model": "tiny", "messages": body["messages"], "temperature": 0, "max_tokens": 8})
    assert want != plain and msg.locator(".body").inner_text() == want.strip()
    page.click("#clear")

    page.select_option("#model", "tiny-vision")
    sync_api.expect(page.locator("#image-picker")).to_be_visible()
    sync_api.expect(page.locator("#notice")).to_be_visible()  # a base model is named up front
    assert "tiny-vision is a base (pretrained) model" in page.locator("#notice").inner_text()
    page.set_input_files("#image", files=[{"name": "x.gif", "mimeType": "image/gif", "buffer": b"GIF89a"}])
    sync_api.expect(page.locator("#status")).to_have_text("Only PNG and JPEG images can be sent.")
    assert page.locator("#attachment").is_hidden()
    png = _png()
    page.set_input_files("#image", files=[{"name": "x.png", "mimeType": "image/png", "buffer": png}])
    sync_api.expect(page.locator("#attachment")).to_be_visible()
    body, msg = _ask(page, "describe the picture", model="tiny-vision")
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    parts = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "describe the picture"}]
    assert body["messages"] == [{"role": "user", "content": parts}]
    assert msg.get_attribute("data-state") == "done"
    want = _api_answer(url, {"model": "tiny-vision", "messages": body["messages"], "temperature": 0,
                             "max_tokens": 8})
    assert msg.locator(".body").inner_text() == want.strip()
    assert page.locator("#attachment").is_hidden() and page.locator(".msg.user img.thumb").count() == 1

    page.select_option("#model", "tiny")  # a text-only model: no upload offered
    assert page.locator("#image-picker").is_hidden()
    assert page.locator("#notice").is_hidden()


def test_stop_frees_the_slot(page, url: str, server) -> None:
    """Stop, pressed while the answer streams, ends it on the page (the text so far stays) and the server
    cancels the request; the page then answers again. Decode steps are slowed so the answer is still running
    when the click lands."""
    scheduler = server[1].state.scheduler
    step = scheduler._step

    def slow_step(*a: object) -> None:
        time.sleep(0.1)
        step(*a)

    before = httpx.get(url + "/health", timeout=10).json()["cancelled"]
    scheduler._step = slow_step
    try:
        page.select_option("#model", "tiny")
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "120")
        page.fill("#prompt", "The quick brown fox")
        page.press("#prompt", "Enter")
        msg = page.locator(".msg.assistant").last
        sync_api.expect(msg.locator(".body")).not_to_be_empty(timeout=WAIT_MS)
        assert msg.get_attribute("data-state") == "streaming" and msg.get_attribute("aria-busy") == "true"
        page.click("#stop")
        sync_api.expect(msg).to_have_attribute("data-state", "stopped")
        deadline = time.time() + 10
        while (h := httpx.get(url + "/health", timeout=10).json())["live"] or h["cancelled"] == before:
            assert time.time() < deadline, f"the stopped request still holds its slot: {h}"
            time.sleep(0.05)
        assert msg.locator(".body").inner_text().strip()
        assert page.locator("#send").is_enabled() and page.locator("#stop").is_disabled()
        page.click("#clear")
        page.fill("#prompt", "Gemma is")  # Clear while an answer streams: it stops, and nothing of it stays
        page.press("#prompt", "Enter")
        second = page.locator(".msg.assistant").first
        sync_api.expect(second.locator(".body")).not_to_be_empty(timeout=WAIT_MS)
        assert second.get_attribute("data-state") == "streaming"
        page.click("#clear")
    finally:
        scheduler._step = step
    assert page.locator(".msg").count() == 0
    page.fill("#max_tokens", "4")
    body, again = _ask(page, "Hello world")
    assert body["messages"] == [{"role": "user", "content": "Hello world"}]
    assert again.get_attribute("data-state") == "done"


def test_errors_show_the_server_message(page) -> None:
    """A request the server refuses shows its message; the refused turn is not kept in the conversation."""
    _, msg = _ask(page, "Hello world", top_p=5, temperature=0, max_tokens=4)
    assert msg.get_attribute("data-state") == "error"
    assert "'top_p' must be between 0.0 and 1.0" in msg.locator(".error").inner_text()
    page.fill("#top_p", "")
    body, msg = _ask(page, "Gemma is")
    assert body["messages"] == [{"role": "user", "content": "Gemma is"}] and msg.get_attribute("data-state") == "done"


# ---- the page on its own --------------------------------------------------------------------------------


MARKDOWN = [
    ("# Title\n\nSome **bold**, *em*, _also em_ and `x < y`.",
     "<h1>Title</h1><p>Some <strong>bold</strong>, <em>em</em>, <em>also em</em> and <code>x &lt; y</code>.</p>"),
    ("```python\nif a < b:\n    print('<b>')\n```\nafter",
     '<pre><code class="language-python">if a &lt; b:\n    print(\'&lt;b&gt;\')</code></pre><p>after</p>'),
    ("- one\n- two *2*\n\n3. three\n4. four",
     '<ul><li>one</li><li>two <em>2</em></li></ul><ol start="3"><li>three</li><li>four</li></ol>'),
    ("line one\nline two", "<p>line one<br>line two</p>"),
    ("see [the docs](https://example.com/a?b=1&c=2)",
     '<p>see <a href="https://example.com/a?b=1&amp;c=2" rel="noopener noreferrer nofollow" target="_blank">'
     "the docs</a></p>"),
    ('<img src=x onerror="window.pwned=1"> [x](javascript:window.pwned=1) <script>window.pwned=1</script>',
     '<p>&lt;img src=x onerror="window.pwned=1"&gt; [x](javascript:window.pwned=1) '
     "&lt;script&gt;window.pwned=1&lt;/script&gt;</p>"),
    ("```\nstill streaming <i>", "<pre><code>still streaming &lt;i&gt;</code></pre>"),
    ("2 * 3 * 4 and snake_case_name", "<p>2 * 3 * 4 and snake_case_name</p>"),
]


def test_markdown_rendering_is_safe(page) -> None:
    """Answers render as markdown (headings, emphasis, code, lists, links) and model text never becomes markup:
    HTML, scripts and javascript: links come out as text."""
    got = page.evaluate("""cases => cases.map(t => {
        const div = document.createElement("div");
        div.append(window.gemmax.renderMarkdown(t));
        document.body.append(div);
        return div.innerHTML;
    })""", [m for m, _ in MARKDOWN])
    assert got == [h for _, h in MARKDOWN]
    assert page.evaluate("window.pwned") is None
    assert all(u.startswith(page.url.rsplit("/", 1)[0]) for u in page.seen), page.seen


def test_phone_width_and_labels(page) -> None:
    """At a phone's width nothing scrolls sideways, and every control has an accessible name."""
    page.set_viewport_size({"width": 360, "height": 740})
    page.fill("#prompt", "Hello world " * 40)
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    unnamed = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea, button')]
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
        .map(e => e.id)""")
    assert unnamed == []
