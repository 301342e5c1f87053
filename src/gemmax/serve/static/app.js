// The chat page of `gemmax serve`: plain script, no build step, nothing fetched from anywhere but this server.
//
// It talks to the same OpenAI-compatible API as any client: GET v1/models fills the picker, and each turn is
// one streamed POST v1/chat/completions whose server-sent events are read with fetch + ReadableStream (an
// EventSource cannot POST). Stop aborts that fetch; the server sees the connection go and frees the slot.
// Model text only ever reaches the page as text nodes (see renderMarkdown): it is never parsed as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const MAX_IMAGE_BYTES = 8 << 20; // under the server's default body limit (16 MiB) once base64-encoded
  const SAFE_SCHEMES = new Set(["http:", "https:", "mailto:"]);

  // ---- markdown -----------------------------------------------------------------------------------------
  // A small renderer that builds DOM nodes directly. Escaping is structural: every piece of model text ends
  // up in a text node (or a <code>'s textContent), so no markup in it can become an element or an attribute.
  // Blocks: ``` fences (an unclosed fence, as while streaming, runs to the end), # headings, - / * / + and
  // 1. lists, paragraphs. Inline: `code`, **strong**, *em* / _em_, [links](http://...) with safe schemes.

  const INLINE = [
    { kind: "code", re: /`([^`\n]+)`/ },
    { kind: "link", re: /\[([^\]\n]+)\]\(([^()\s]+)\)/ },
    { kind: "strong", re: /\*\*(?=\S)([^\n]*?\S)\*\*|__(?=\S)([^\n]*?\S)__/ },
    { kind: "em", re: /\*(?=[^\s*])([^\n*]*?[^\s*])\*|(?<![\w])_(?=\S)([^\n_]*?\S)_(?![\w])/ },
  ];

  function safeHref(url) {
    try {
      const u = new URL(url, document.baseURI);
      return SAFE_SCHEMES.has(u.protocol) ? u.href : null;
    } catch {
      return null;
    }
  }

  function appendInline(parent, text) {
    while (text) {
      let best = null;
      for (const { kind, re } of INLINE) {
        const m = re.exec(text);
        if (m && (best === null || m.index < best.m.index)) best = { kind, m };
      }
      if (best === null) {
        parent.append(text);
        return;
      }
      const { kind, m } = best;
      if (m.index) parent.append(text.slice(0, m.index));
      const inner = m[1] !== undefined ? m[1] : m[2];
      if (kind === "code") {
        const el = document.createElement("code");
        el.textContent = inner;
        parent.append(el);
      } else if (kind === "link") {
        const href = safeHref(m[2]);
        if (href === null) {
          parent.append(m[0]); // an unsafe scheme (javascript:, data:...) stays visible as plain text
        } else {
          const a = document.createElement("a");
          a.href = href;
          a.rel = "noopener noreferrer nofollow";
          a.target = "_blank";
          appendInline(a, inner);
          parent.append(a);
        }
      } else {
        const el = document.createElement(kind);
        appendInline(el, inner);
        parent.append(el);
      }
      text = text.slice(m.index + m[0].length);
    }
  }

  const FENCE = /^\s{0,3}```\s*([\w+#.-]*)\s*$/;
  const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const ITEM = /^\s{0,3}(?:([-*+])|(\d{1,9})[.)])\s+(.*)$/;

  function renderMarkdown(text) {
    const out = document.createDocumentFragment();
    const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if ((m = FENCE.exec(line))) {
        const body = [];
        for (i++; i < lines.length && !/^\s{0,3}```\s*$/.test(lines[i]); i++) body.push(lines[i]);
        i++; // the closing fence, if there is one
        const pre = document.createElement("pre");
        const code = document.createElement("code");
        if (m[1]) code.className = "language-" + m[1];
        code.textContent = body.join("\n");
        pre.append(code);
        out.append(pre);
      } else if ((m = HEADING.exec(line))) {
        const h = document.createElement("h" + m[1].length);
        appendInline(h, m[2]);
        out.append(h);
        i++;
      } else if ((m = ITEM.exec(line))) {
        const ordered = m[2] !== undefined;
        const list = document.createElement(ordered ? "ol" : "ul");
        if (ordered && m[2] !== "1") list.start = Number(m[2]);
        while (i < lines.length && (m = ITEM.exec(lines[i])) && (m[2] !== undefined) === ordered) {
          const li = document.createElement("li");
          appendInline(li, m[3]);
          list.append(li);
          i++;
        }
        out.append(list);
      } else if (!line.trim()) {
        i++;
      } else {
        const p = document.createElement("p");
        for (let first = true; i < lines.length && lines[i].trim() && !FENCE.test(lines[i]) &&
             !HEADING.test(lines[i]) && !ITEM.test(lines[i]); i++, first = false) {
          if (!first) p.append(document.createElement("br"));
          appendInline(p, lines[i]);
        }
        out.append(p);
      }
    }
    return out;
  }

  // ---- server-sent events -------------------------------------------------------------------------------

  // The `data:` payloads of an SSE response body, in order, as they arrive.
  async function* sseData(response) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf = (buf + value).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, end);
        buf = buf.slice(end + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
        if (data.length) yield data.join("\n");
      }
    }
  }

  // ---- state and page -----------------------------------------------------------------------------------

  const state = {
    models: new Map(), // id -> model card
    history: [], // {role, content} as sent to the API
    controller: null, // the AbortController of the answer being streamed
    image: null, // data: URI of the image attached to the next message
    epoch: 0, // bumped by Clear, so that an answer still finishing cannot write into the new conversation
  };

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = $("api_key").value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  function setStatus(text) {
    $("status").textContent = text;
  }

  async function errorMessage(response) {
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) return body.error.message;
    } catch {
      // not JSON: fall through to the status line
    }
    return `HTTP ${response.status} ${response.statusText}`;
  }

  function readsImages(card) {
    return Boolean(card && Array.isArray(card.input_modalities) && card.input_modalities.includes("image"));
  }

  function onModelChange() {
    const card = state.models.get($("model").value);
    const info = [];
    if (card && card.parent) info.push(`adapter over ${card.parent}`);
    if (card && card.max_model_len) info.push(`${card.max_model_len} tokens of context`);
    if (readsImages(card)) info.push("reads images");
    $("model-info").textContent = info.join(" · ");
    const base = Boolean(card) && card.instruction_tuned === false;
    $("notice").hidden = !base;
    $("notice").textContent = base
      ? `${card.id} is a base (pretrained) model: it continues text rather than following instructions, so ` +
        "answers may ramble or repeat. For chat, start the server with an instruction-tuned checkpoint " +
        "(for example gemma-3-270m-it)."
      : "";
    $("image-picker").hidden = !readsImages(card);
    if (!readsImages(card)) clearImage();
    if (card) localStorage.setItem("gemmax.model", card.id);
  }

  async function loadModels() {
    let response;
    try {
      response = await fetch("v1/models", { headers: headers() });
    } catch (e) {
      setStatus(`Cannot reach the server: ${e.message}`);
      return;
    }
    if (response.status === 401) {
      $("settings").open = true;
      setStatus("This server needs an API key: enter it under Settings.");
      $("api_key").focus();
      return;
    }
    if (!response.ok) {
      setStatus(`Listing the models failed: ${await errorMessage(response)}`);
      return;
    }
    const cards = (await response.json()).data || [];
    const select = $("model");
    const previous = select.value || localStorage.getItem("gemmax.model");
    state.models = new Map(cards.map((c) => [c.id, c]));
    select.replaceChildren(...cards.map((c) => {
      const label = c.parent ? `${c.id} (adapter)` : c.id;
      return new Option(label, c.id, false, c.id === previous);
    }));
    onModelChange();
    setStatus(cards.length ? "" : "The server lists no models.");
  }

  function addMessage(role, text, image) {
    const div = document.createElement("div");
    div.className = `msg ${role}`;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Model";
    div.append(who);
    if (image) {
      const img = document.createElement("img");
      img.src = image;
      img.alt = "Attached image";
      img.className = "thumb";
      div.append(img);
    }
    const body = document.createElement("div");
    body.className = "body";
    if (role === "user") body.textContent = text;
    else body.append(renderMarkdown(text));
    div.append(body);
    $("log").append(div);
    div.scrollIntoView({ block: "end" });
    return div;
  }

  function numberSetting(id, parse) {
    const raw = $(id).value.trim();
    if (!raw) return undefined;
    const v = parse(raw);
    if (!Number.isFinite(v)) throw new Error(`${$(id).labels[0].textContent} must be a number`);
    return v;
  }

  function requestBody() {
    const body = { model: $("model").value, stream: true, stream_options: { include_usage: true } };
    const settings = {
      temperature: numberSetting("temperature", Number),
      top_p: numberSetting("top_p", Number),
      top_k: numberSetting("top_k", (s) => Number.parseInt(s, 10)),
      max_tokens: numberSetting("max_tokens", (s) => Number.parseInt(s, 10)),
      seed: numberSetting("seed", (s) => Number.parseInt(s, 10)),
    };
    for (const [k, v] of Object.entries(settings)) if (v !== undefined) body[k] = v;
    const system = $("system").value.trim();
    body.messages = system ? [{ role: "system", content: system }, ...state.history] : [...state.history];
    return body;
  }

  function setBusy(busy) {
    $("send").disabled = busy;
    $("stop").disabled = !busy;
    $("model").disabled = busy;
  }

  async function send(event) {
    event.preventDefault();
    if (state.controller) return;
    const text = $("prompt").value;
    if (!text.trim() && !state.image) return;
    if (!$("model").value) {
      setStatus("No model to send to: the model list did not load (the API key under Settings?).");
      return;
    }
    let body;
    const content = state.image
      ? [{ type: "image_url", image_url: { url: state.image } }, { type: "text", text }]
      : text;
    state.history.push({ role: "user", content });
    try {
      body = requestBody();
    } catch (e) {
      state.history.pop();
      setStatus(e.message);
      return;
    }
    addMessage("user", text, state.image);
    $("prompt").value = "";
    clearImage();
    await stream(body);
  }

  async function stream(body) {
    const msg = addMessage("assistant", "");
    const out = msg.querySelector(".body");
    msg.dataset.state = "streaming";
    msg.setAttribute("aria-busy", "true"); // screen readers read the answer once it is whole, not every delta
    const controller = new AbortController();
    const epoch = state.epoch;
    state.controller = controller;
    setBusy(true);
    setStatus("Waiting for the model…");
    let answer = "";
    let usage = null;
    let finish = null;
    let pending = false;
    const log = $("log");
    const render = () => {
      pending = false;
      const following = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
      out.replaceChildren(renderMarkdown(answer));
      if (following) log.scrollTop = log.scrollHeight; // keep up with the answer unless the reader scrolled up
    };
    const started = performance.now();
    try {
      const response = await fetch("v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      setStatus("Answering…");
      for await (const data of sseData(response)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || "the server reported an error");
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) answer += choice.delta.content;
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        if (!pending) {
          pending = true;
          requestAnimationFrame(render);
        }
      }
      render();
      msg.dataset.state = "done";
      const secs = (performance.now() - started) / 1000;
      const parts = [];
      if (usage) parts.push(`${usage.completion_tokens} tokens, ${(usage.completion_tokens / secs).toFixed(1)} tok/s`);
      if (finish === "length") parts.push("stopped at the token limit");
      setStatus(parts.join(" · "));
    } catch (e) {
      render();
      if (e.name === "AbortError") {
        msg.dataset.state = "stopped";
        setStatus("Stopped.");
      } else {
        msg.dataset.state = "error";
        const err = document.createElement("p");
        err.className = "error";
        err.textContent = `Error: ${e.message}`;
        msg.append(err);
        setStatus("");
      }
    } finally {
      msg.removeAttribute("aria-busy");
      if (state.controller === controller) {
        state.controller = null;
        setBusy(false);
      }
    }
    if (state.epoch !== epoch) return; // cleared meanwhile
    if (msg.dataset.state === "error" && !answer) {
      state.history.pop(); // the request failed whole: drop its user turn so the next one is not refused too
    } else {
      state.history.push({ role: "assistant", content: answer });
    }
  }

  function stop() {
    if (state.controller) state.controller.abort();
  }

  function clearConversation() {
    stop();
    state.controller = null;
    setBusy(false);
    state.epoch++;
    state.history = [];
    $("log").replaceChildren();
    clearImage();
    setStatus("");
    $("prompt").focus();
  }

  function clearImage() {
    state.image = null;
    $("image").value = "";
    $("attachment").hidden = true;
    $("preview").removeAttribute("src");
  }

  function pickImage() {
    const file = $("image").files[0];
    if (!file) return;
    if (!["image/png", "image/jpeg"].includes(file.type)) {
      setStatus("Only PNG and JPEG images can be sent.");
      clearImage();
      return;
    }
    if (file.size > MAX_IMAGE_BYTES) {
      setStatus(`The image is larger than ${MAX_IMAGE_BYTES >> 20} MiB.`);
      clearImage();
      return;
    }
    const reader = new FileReader();
    reader.onload = () => {
      state.image = reader.result;
      $("preview").src = reader.result;
      $("attachment").hidden = false;
    };
    reader.onerror = () => setStatus("The image could not be read.");
    reader.readAsDataURL(file);
  }

  function init() {
    $("composer").addEventListener("submit", send);
    $("prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        $("composer").requestSubmit();
      }
    });
    $("stop").addEventListener("click", stop);
    $("clear").addEventListener("click", clearConversation);
    $("model").addEventListener("change", onModelChange);
    $("image").addEventListener("change", pickImage);
    $("remove-image").addEventListener("click", clearImage);
    $("api_key").value = sessionStorage.getItem("gemmax.api_key") || "";
    $("api_key").addEventListener("change", () => {
      sessionStorage.setItem("gemmax.api_key", $("api_key").value.trim());
      loadModels();
    });
    setBusy(false);
    loadModels();
  }

  window.gemmax = { renderMarkdown }; // for the browser console and the page's tests
  init();
})();
