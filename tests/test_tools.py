"""Tool calling: each family's published function-calling format rendered exactly, calls parsed out of text
(single, parallel, malformed), the streaming splitter, forced calls and their schema check, the request
checks (400s), and round trips with the official ``openai`` client against a tiny model whose logits the test
scripts, streaming and not, through a tool-result turn."""

from __future__ import annotations

import dataclasses
import importlib
import json

import httpx
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest
from server_fixtures import serving
from spm_fixtures import train_tiny_sentencepiece

import gemmax
from gemmax.api import CausalLM
from gemmax.engine.generate import Engine
from gemmax.io.tokenizer import apply_chat_template
from gemmax.io.tool_calls import ToolCall, call_start, call_state, parse_calls
from gemmax.models import base
from gemmax.serve.errors import APIError
from gemmax.serve.server import create_app
from gemmax.serve.tools import ToolStream, finish_answer, forced_call, parse_request

openai = importlib.import_module("openai")
uvicorn = importlib.import_module("uvicorn")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}},
                                       "required": ["tz"], "additionalProperties": False}}}
CALLED = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
          {"role": "assistant", "content": None, "tool_calls": [
              {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
          {"role": "tool", "tool_call_id": "c1", "content": "18 C, sunny"}]


# ---- rendering: each family's published format ----------------------------------------------------------


def test_gemma3_format() -> None:
    """Gemma 3: the declarations (JSON, indented 2) open the first user turn after the system text, a call is
    its JSON object in the model turn, a result a ```tool_output block in a user turn (Google's format)."""
    decl = json.dumps([WEATHER["function"]], indent=2)
    assert apply_chat_template(CALLED, family="gemma", tools=[WEATHER]) == (
        "<bos><start_of_turn>user\nBe brief.\n\n"
        "You can call the functions listed below. To call one, answer with nothing but a JSON object "
        '{"name": function name, "parameters": dictionary of argument names and values}; to call several, '
        "answer with a JSON list of such objects. A call holds no other text.\n"
        f"{decl}\n\nWeather in Paris?<end_of_turn>\n"
        '<start_of_turn>model\n{"name": "get_weather", "parameters": {"city": "Paris"}}<end_of_turn>\n'
        "<start_of_turn>user\n```tool_output\n18 C, sunny\n```<end_of_turn>\n<start_of_turn>model\n")
    parallel = [CALLED[1], {"role": "assistant", "content": "Both.", "tool_calls": [
        {"id": "a", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
        {"id": "b", "function": {"name": "get_time", "arguments": {"tz": "CET"}}}]},
        {"role": "tool", "tool_call_id": "a", "content": "1"}, {"role": "tool", "tool_call_id": "b", "content": "2"},
        {"role": "user", "content": "Thanks"}]
    assert apply_chat_template(parallel, family="gemma", add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nWeather in Paris?<end_of_turn>\n<start_of_turn>model\nBoth.\n"
        '[{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "get_time", "parameters": '
        '{"tz": "CET"}}]<end_of_turn>\n<start_of_turn>user\n```tool_output\n1\n```\n```tool_output\n2\n```\n'
        "Thanks<end_of_turn>\n")


def test_llama31_format() -> None:
    """Llama 3.1's published template (custom tools in the first user message), the exact text derived from
    it: a text tool result is written as JSON (quoted), as the template's ``tojson`` does."""
    tool = json.dumps(WEATHER, indent=4)
    got = apply_chat_template(CALLED, family="llama3", tools=[WEATHER], date="26 Jul 2024")
    assert got == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please respond with a JSON "
        "for a function call with its proper arguments that best answers the given prompt.\n\n"
        'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
        f"Do not use variables.\n\n{tool}\n\nWeather in Paris?<|eot_id|>"
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "Paris"}}'
        '<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n"18 C, sunny"<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    two = dict(CALLED[2], tool_calls=CALLED[2]["tool_calls"] * 2)
    with pytest.raises(ValueError, match="one tool call per assistant message"):
        apply_chat_template([CALLED[1], two], family="llama3")
    with pytest.raises(ValueError, match="first user message"):
        apply_chat_template([CALLED[0]], family="llama3", tools=[WEATHER])


def test_gemma4_format() -> None:
    """Gemma 4's published template: declarations with upper-case types, enums, arrays and nested objects;
    results inside the model's turn, which the model continues (no new turn after them)."""
    tool = {"type": "function", "function": {"name": "plan", "description": "Plan a trip", "parameters": {
        "type": "object", "required": ["city"], "properties": {
            "city": {"type": "string", "description": "Where"}, "days": {"type": "array", "items": {"type": "integer"}},
            "opts": {"type": "object", "properties": {"fast": {"type": "boolean", "nullable": True}},
                     "required": ["fast"]},
            "mode": {"type": "string", "enum": ["car", "train"]}}}}}
    msgs = [CALLED[1], {"role": "assistant", "content": "", "tool_calls": [
        {"id": "p", "function": {"name": "plan",
                                 "arguments": '{"city": "Nice", "days": [1, 2], "opts": {"fast": true}}'}}]},
        {"role": "tool", "tool_call_id": "p", "content": "booked"}]
    q = '<|"|>'
    assert apply_chat_template(msgs, family="gemma4", tools=[tool]) == (
        f"<bos><|turn>system\n<|tool>declaration:plan{{description:{q}Plan a trip{q},parameters:{{properties:{{"
        f"city:{{description:{q}Where{q},type:{q}STRING{q}}},days:{{items:{{type:{q}INTEGER{q}}},type:{q}ARRAY{q}}},"
        f"mode:{{enum:[{q}car{q},{q}train{q}],type:{q}STRING{q}}},opts:{{properties:{{fast:{{nullable:true,"
        f"type:{q}BOOLEAN{q}}}}},required:[{q}fast{q}],type:{q}OBJECT{q}}}}},required:[{q}city{q}],"
        f"type:{q}OBJECT{q}}}}}<tool|><turn|>\n<|turn>user\nWeather in Paris?<turn|>\n<|turn>model\n"
        f"<|tool_call>call:plan{{city:{q}Nice{q},days:[1,2],opts:{{fast:true}}}}<tool_call|>"
        f"<|tool_response>response:plan{{value:{q}booked{q}}}<tool_response|>")
    # a reply after the results continues the same model turn; a call with no result yet cues the response
    assert apply_chat_template(msgs + [{"role": "assistant", "content": "Done."}], family="gemma4").endswith(
        f"{q}booked{q}}}<tool_response|>Done.<turn|>\n<|turn>model\n")
    assert apply_chat_template(msgs[:2], family="gemma4").endswith("<tool_call|><|tool_response>")


# ---- parsing ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gemma", "llama3"])
def test_parse_json_formats(family: str) -> None:
    p = parse_calls('Let me look. {"name": "get_weather", "parameters": {"city": "Paris"}}', family)
    assert (p.content, p.calls, p.error) == ("Let me look.", [ToolCall("get_weather", {"city": "Paris"})], None)
    for text in ('[{"name": "a", "parameters": {}}, {"name": "b", "parameters": {"x": [1, null]}}]',
                 '{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": [1, null]}}',
                 '```json\n{"name": "a", "arguments": {}}\n{"name": "b", "parameters": "{\\"x\\": [1, null]}"}\n```'):
        assert parse_calls(text, family).calls == [ToolCall("a", {}), ToolCall("b", {"x": [1, None]})], text
    for bad in ('{"name": "a", "parameters": {"x": 1}', '{"name": 3, "parameters": {}}', '{"name": "a", '
                '"parameters": [1]}', '{"name": "a", "parameters": {}} and more', '{"nom": "a"}', "[]"):
        p = parse_calls("Sure: " + bad, family)
        assert p.calls == [] and p.content == "Sure: " + bad and p.error, bad
    assert parse_calls("Sets like {1, 2} are not calls.", family).calls == []


def test_parse_gemma4() -> None:
    q = '<|"|>'
    p = parse_calls(f"Checking.<|tool_call>call:get_weather{{city:{q}Paris, FR{q},days:[1,2.5],"
                    f"o:{{deep:true,none:null}}}}<tool_call|><|tool_call>call:get_time{{}}<tool_call|>", "gemma4")
    assert p.content == "Checking." and p.calls == [
        ToolCall("get_weather", {"city": "Paris, FR", "days": [1, 2.5], "o": {"deep": True, "none": None}}),
        ToolCall("get_time", {})]
    assert parse_calls('<|tool_call>call:get_time{"tz": "CET"}<tool_call|>', "gemma4").calls == [
        ToolCall("get_time", {"tz": "CET"})]  # JSON arguments: what a schema-constrained forced call writes
    for bad in (f"<|tool_call>call:f{{a:{q}x}}<tool_call|>", "<|tool_call>call:f{a:1}",
                "<|tool_call>f{a:1}<tool_call|>", "<|tool_call>call:f{a 1}<tool_call|>"):
        p = parse_calls(bad, "gemma4")
        assert p.calls == [] and p.content == bad and p.error, bad
    assert parse_calls("plain text", "gemma4").calls == []


def test_stream_splitter() -> None:
    """Content before a call streams as it comes; from where a call may start the text is held, then the calls
    come at the end. Fed one character at a time, the pieces add up to the content."""
    req = parse_request({"tools": [WEATHER, TIME]}, "gemma4")
    text = 'Sure, one moment. <|tool_call>call:get_time{tz:<|"|>CET<|"|>}<tool_call|>'
    s = ToolStream(req)
    sent = "".join(s.feed(ch) for ch in text)
    assert sent == "Sure, one moment. "
    rest, calls, reason = s.finish("stop")
    assert (sent + rest).strip() == "Sure, one moment." and calls == [ToolCall("get_time", {"tz": "CET"})]
    assert reason == "tool_calls"
    s = ToolStream(req)
    assert "".join(s.feed(ch) for ch in "a <|tool_ x") == "a <|tool_ x"  # not an opener after all
    req = parse_request({"tools": [WEATHER]}, "gemma")
    s = ToolStream(req)
    assert s.feed("Use {braces}") == "Use {braces}" and s.finish("stop") == ("", [], "stop")  # not a call
    assert call_start("no call", "gemma") is None
    # JSON formats: text is held only while it may still open a call, then to the end once one has opened
    text = 'Set {x} and [1, 2], then:\n```json\n{ "name": "get_weather", "parameters": {"city": "Oslo"}}\n```'
    for piece_len in (1, 3, 1000):
        s = ToolStream(req)
        sent = "".join(s.feed(text[i:i + piece_len]) for i in range(0, len(text), piece_len))
        assert sent == "Set {x} and [1, 2], then:\n", (piece_len, sent)
        rest, calls, reason = s.finish("stop")
        assert rest == "" and calls == [ToolCall("get_weather", {"city": "Oslo"})] and reason == "tool_calls"
    for held, state in (("{", "maybe"), ('{ "na', "maybe"), ('{"name"', "yes"), ('[{"arguments"', "yes"),
                        ("```", "maybe"), ("```py", "no"), ("{x", "no"), ("[1", "no"), ("<|tool_", "no")):
        assert call_state(held, "gemma") == state, held
    assert [call_state(t, "gemma4") for t in ("<|tool_", "<|tool_call>call:", "<|toolx")] == ["maybe", "yes", "no"]


def test_forced_calls_and_schema_check() -> None:
    """The forced call's opener and schema per family; answers off the schema never come back as calls."""
    f = forced_call([WEATHER, TIME], "get_time", "gemma")
    assert (f.opener, f.schema, f.closer) == ('{"name": "get_time", "parameters": ',
                                              TIME["function"]["parameters"], "}")
    f = forced_call([WEATHER, TIME], "required", "llama3")
    assert f.opener == "" and [s["properties"]["name"]["const"] for s in f.schema["anyOf"]] == ["get_weather",
                                                                                               "get_time"]
    assert forced_call([WEATHER], "required", "gemma4").opener == "<|tool_call>call:get_weather"
    forced = parse_request({"tools": [WEATHER, TIME], "tool_choice": {"type": "function",
                                                                      "function": {"name": "get_time"}}}, "gemma")
    assert finish_answer('{"tz": "UTC"}}', "stop", forced)[1:] == ([ToolCall("get_time", {"tz": "UTC"})],
                                                                   "tool_calls")
    assert finish_answer('{"tz": "UTC"}', "stop", forced)[1] == [ToolCall("get_time", {"tz": "UTC"})]  # closer added
    for bad in ('{"tz": 5}}', '{"zone": "UTC"}}', "no idea"):
        with pytest.raises(APIError) as e:
            finish_answer(bad, "stop", forced)
        assert e.value.status == 500 and e.value.code == "invalid_tool_call"
    assert finish_answer('{"tz": "U', "length", forced) == ('{"name": "get_time", "parameters": {"tz": "U', [],
                                                            "length")
    auto = parse_request({"tools": [WEATHER, TIME]}, "gemma")
    assert finish_answer('{"name": "get_time", "parameters": {"tz": 5}}', "stop", auto) == (
        '{"name": "get_time", "parameters": {"tz": 5}}', [], "stop")  # off its schema: stays text
    assert finish_answer('{"name": "nope", "parameters": {}}', "stop", auto)[1] == []
    dangling = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}
    assert finish_answer('{"name": "f", "parameters": {"a": 1}}', "stop",
                         parse_request({"tools": [dangling]}, "gemma"))[1:] == ([], "stop")  # no 500, no fetch
    single = parse_request({"tools": [WEATHER, TIME], "parallel_tool_calls": False}, "gemma")
    two = '[{"name": "get_time", "parameters": {"tz": "A"}}, {"name": "get_time", "parameters": {"tz": "B"}}]'
    assert finish_answer(two, "stop", single)[1] == [ToolCall("get_time", {"tz": "A"})]


# ---- the server: a tiny model whose logits the test scripts ---------------------------------------------

MAX_LEN = 256
#: a space between the braces keeps them two tokens: a forced call is constrained to the arguments' schema,
#: which ends at the first "}" (the grammar then allows only the end), while under "auto" the whole call is
#: the model's own text
CALL_ARGS = '{"city": "Paris"} }'
ANSWER = "It is 18 C and sunny in Paris."
#: the tokenizer's training text: the conversation as the template writes it, so the prompts stay short
LINES = apply_chat_template(CALLED, family="gemma", tools=[WEATHER, TIME]).splitlines() * 5 + [ANSWER] * 5


def _steered(fam: base.Family) -> base.Family:
    """The family with its logits overridden where ``params["script"][position]`` names a token: the model
    then writes the script's token at that position and is itself elsewhere."""

    def steer(logits, script, nxt):
        forced = script[jnp.clip(nxt, 0, script.shape[0] - 1)]
        hot = jnp.where(jnp.arange(logits.shape[-1])[None] == forced[:, None], 1e4, -1e4)
        return jnp.where(forced[:, None] >= 0, hot, logits)

    def prefill(params, cfg, tokens, lengths, max_len, backend, **inputs):
        own = {k: v for k, v in params.items() if k != "script"}
        logits, cache = fam.prefill(own, cfg, tokens, lengths, max_len, backend, **inputs)
        return steer(logits, params["script"], lengths), cache

    def decode_step(params, cfg, cache, tokens, pos, backend):
        own = {k: v for k, v in params.items() if k != "script"}
        logits, cache = fam.decode_step(own, cfg, cache, tokens, pos, backend)
        return steer(logits, params["script"], pos + 1), cache

    # no extend/commit: the script steers prefill and decode only, so prompts are never prefix-cached (a
    # cached prefix would be extended unsteered) and nothing decodes speculatively
    return dataclasses.replace(fam, name=fam.name + "-scripted", prefill=prefill, decode_step=decode_step,
                               extend=None, commit=None)


def _prompt(tok, msgs: list[dict], tools: list[dict] | None) -> list[int]:
    return tok.encode(apply_chat_template(msgs, family="gemma", tools=tools), add_bos=True)


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> CausalLM:
    """A tiny Gemma 3 whose logits follow a script: after the first turn's prompt it writes the call (as the
    forced call's opener then its arguments, so a forced request primed with that opener goes on the same
    way); after the tool-result turn's prompt it writes the answer; elsewhere it is itself."""
    tok = train_tiny_sentencepiece(tmp_path_factory.mktemp("spm"), LINES, 1000, add_dummy_prefix=False,
                                   remove_extra_whitespaces=False, normalization_rule_name="identity",
                                   byte_fallback=True, allow_whitespace_only_pieces=True, split_by_whitespace=False)
    cfg = gemmax.tiny_config("gemma3", vocab_size=tok.vocab_size, max_position_embeddings=MAX_LEN)
    plain = CausalLM.from_config(cfg, seed=0, tokenizer=tok)
    eot = tok.end_of_turn_id
    script = np.full(MAX_LEN, -1, np.int32)
    first, second = _prompt(tok, CALLED[:2], [WEATHER, TIME]), _prompt(tok, CALLED, [WEATHER, TIME])
    opener = tok.encode('{"name": "get_weather", "parameters": ', add_bos=False)
    call = opener + tok.encode(CALL_ARGS, add_bos=False) + [eot]
    answer = tok.encode(ANSWER, add_bos=False) + [eot]
    assert tok.decode(call[:-1]) == '{"name": "get_weather", "parameters": ' + CALL_ARGS
    assert tok.decode(answer[:-1]) == ANSWER and len(first) + len(call) < len(second)
    assert len(second) + 12 <= MAX_LEN
    script[len(first): len(first) + len(call)] = call
    script[len(second): len(second) + len(answer)] = answer
    return CausalLM(cfg, dict(plain.params, script=jnp.asarray(script)), tok, family=_steered(plain.family))


@pytest.fixture(scope="module")
def url(lm: CausalLM):
    """The server over the scripted model (one slot, chunks of 4 and a 256-token context: the shapes
    ``lm.chat`` compiles too, so the two share their compilations)."""
    app = create_app({"tiny": lm}, max_batch=1, chunk=4, max_len=MAX_LEN)
    m = app.state.models["tiny"]
    m.engine = Engine(m.params, m.config, max_batch=1, max_len=MAX_LEN, chunk=4, family=lm.family,
                      tokenizer=m.tokenizer)
    with serving(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def _stream(client, **kw) -> tuple[str, list, str]:
    """A streamed answer reassembled by the openai client's own stream accumulator (with the usage chunk)."""
    with client.chat.completions.stream(model="tiny", stream_options={"include_usage": True}, **kw) as s:
        for _ in s:
            pass
        final = s.get_final_completion()
    assert final.usage.completion_tokens > 0 and final.usage.prompt_tokens > 100
    c = final.choices[0]
    return c.message.content or "", c.message.tool_calls or [], c.finish_reason


def test_round_trip(client) -> None:
    """A call comes back (whole and streamed, auto and forced), its result goes back as a tool message, and the
    model's answer to it comes back as text."""
    kw = {"messages": CALLED[:2], "tools": [WEATHER, TIME], "max_tokens": 24, "temperature": 0}
    for choice in ("auto", {"type": "function", "function": {"name": "get_weather"}}, "required"):
        r = client.chat.completions.create(model="tiny", **dict(kw, tool_choice=choice))
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and not c.message.content, (choice, c)
        (call,) = c.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        content, calls, reason = _stream(client, **dict(kw, tool_choice=choice))
        assert reason == "tool_calls" and not content and len(calls) == 1, choice
        assert calls[0].id.startswith("call_")
        if choice == "required":
            # two tools: the whole call object is constrained to "any tool's {name, parameters}", whose
            # formatting the grammar fixes where the script spelled it otherwise, so the scripted arguments
            # do not survive; what must hold is a call to one of the tools that satisfies its schema
            for got in (call, calls[0]):
                schema = {"get_weather": WEATHER, "get_time": TIME}[got.function.name]["function"]["parameters"]
                jsonschema.validate(json.loads(got.function.arguments), schema)
            continue
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
        assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments) == {
            "city": "Paris"}
        weather_call = call
    call = weather_call
    turn = CALLED[:2] + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                         {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"}]
    kw["max_tokens"] = 12
    r = client.chat.completions.create(model="tiny", **dict(kw, messages=turn))
    assert r.choices[0].message.content == ANSWER and r.choices[0].finish_reason == "stop"
    assert not r.choices[0].message.tool_calls
    assert _stream(client, **dict(kw, messages=turn)) == (ANSWER, [], "stop")
    r = client.chat.completions.create(model="tiny", **dict(kw, tool_choice="none"))
    assert r.choices[0].finish_reason != "tool_calls" and not r.choices[0].message.tool_calls


def test_forced_call_is_constrained_to_its_schema(url: str) -> None:
    """Forced to call get_time, the scripted model would write get_weather's arguments; the sampler is held
    to get_time's schema, so the answer is a valid get_time call (whole and streamed). Cut short by
    ``max_tokens``, the unfinished call comes back as text with finish_reason "length"."""
    body = {"model": "tiny", "messages": CALLED[:2], "tools": [WEATHER, TIME], "max_tokens": 24, "temperature": 0,
            "tool_choice": {"type": "function", "function": {"name": "get_time"}}}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    (call,) = r.json()["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_time"
    jsonschema.validate(json.loads(call["function"]["arguments"]), TIME["function"]["parameters"])
    r = httpx.post(url + "/v1/chat/completions", json=dict(body, stream=True), timeout=120)
    events = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls" and r.text.rstrip().endswith("[DONE]")
    r = httpx.post(url + "/v1/chat/completions", json=dict(body, max_tokens=2), timeout=120)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text
    r = httpx.post(url + "/v1/chat/completions",
                   json=dict(body, response_format={"type": "json_object"}), timeout=120)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", r.text
    assert httpx.get(url + "/health").json()["status"] == "ok"


@pytest.mark.parametrize("change,param,words", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope'"),
    ({"tool_choice": "sometimes"}, "tool_choice", "must be"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls", "boolean"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.[0].function.name", "name"),
    ({"tools": [{"type": "retrieval"}]}, "tools.[0].type", "'function'"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "two tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                             "properties": {"a": {"type": 5}}}}}]},
     "tools.[0].function.parameters", "not a valid JSON schema"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice", "only allowed when 'tools'"),
    ({"tool_choice": "auto", "tools": []}, "tool_choice", "only allowed when 'tools'"),
    ({"messages": CALLED[:3] + [{"role": "tool", "tool_call_id": "zz", "content": "x"}]}, "messages.[3].tool_call_id",
     "'zz'"),
    ({"messages": CALLED[:3] + [{"role": "tool", "content": "x"}]}, "messages.[3].tool_call_id", "required"),
    ({"messages": [CALLED[1], {"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {
        "name": "f", "arguments": "{oops"}}]}]}, "messages.[1].tool_calls.[0].function.arguments", "JSON"),
])
def test_bad_requests(url: str, change: dict, param: str, words: str) -> None:
    body = dict({"model": "tiny", "messages": CALLED[:2], "tools": [WEATHER], "max_tokens": 2}, **change)
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param and words in err["message"], err


def test_chat_api(lm: CausalLM) -> None:
    """``CausalLM.chat(tools=...)`` returns an assistant message carrying the call, ready to append to the
    conversation; a forced call the model does not make raises; a tool_choice naming no tool is refused."""
    out = lm.chat(CALLED[:2], max_new_tokens=24, tools=[WEATHER, TIME], temperature=0, chunk=4)
    assert out["role"] == "assistant" and out["content"] is None
    (call,) = out["tool_calls"]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {
        "city": "Paris"}
    turn = CALLED[:2] + [out, {"role": "tool", "tool_call_id": call["id"], "content": "18 C, sunny"}]
    assert lm.chat(turn, max_new_tokens=12, tools=[WEATHER, TIME], temperature=0, chunk=4) == {
        "role": "assistant", "content": ANSWER}
    # a forced call the script does not make: the arguments are constrained to the tool's schema, so the
    # model's own (random) choices still make a valid call; cut short, the call is unfinished and raises
    forced = lm.chat(CALLED[:2], max_new_tokens=24, tools=[WEATHER, TIME], tool_choice="get_time", temperature=0,
                     chunk=4)
    (call,) = forced["tool_calls"]
    assert call["function"]["name"] == "get_time"
    jsonschema.validate(json.loads(call["function"]["arguments"]), TIME["function"]["parameters"])
    with pytest.raises(ValueError, match="not a valid call"):
        lm.chat(CALLED[:2], max_new_tokens=2, tools=[WEATHER, TIME], tool_choice="get_time", temperature=0,
                chunk=4)
    with pytest.raises(ValueError, match="names no tool"):
        lm.chat(CALLED[:2], tools=[TIME], tool_choice="get_weather")


def test_gemma4_forced_calls_are_constrained(lm: CausalLM) -> None:
    """Gemma 4: a forced call's text after ``<|tool_call>call:`` is constrained too: one named tool's JSON
    arguments, or under "required" among several tools one tool's name and then its arguments (a grammar),
    so an untrained model's answer is still a valid call of one of them."""
    import gemmax.models.gemma4 as g4

    f = forced_call([WEATHER, TIME], "required", "gemma4")
    assert f.opener == "<|tool_call>call:" and f.schema is None and list(f.alternatives) == ["get_weather",
                                                                                            "get_time"]
    cfg = g4.tiny_config(vocab_size=lm.tokenizer.vocab_size, max_position_embeddings=512)
    g4lm = CausalLM.from_config(cfg, seed=1, tokenizer=lm.tokenizer)
    assert g4lm.chat_format == "gemma4"
    # strings of bounded length: an untrained model inside a JSON string need never close it
    short = {"type": "string", "maxLength": 6}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
                 "type": "object", "properties": {"city": short, "unit": {"enum": ["c", "f"]}},
                 "required": ["city", "unit"], "additionalProperties": False}}},
             {"type": "function", "function": {"name": "get_time", "parameters": {
                 "type": "object", "properties": {"tz": short}, "required": ["tz"], "additionalProperties": False}}}]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for choice, names in (("required", ("get_weather", "get_time")), ("get_time", ("get_time",))):
        out = g4lm.chat(CALLED[:2], max_new_tokens=48, tools=tools, tool_choice=choice, temperature=0, chunk=4)
        (call,) = out["tool_calls"]
        fn = call["function"]
        assert fn["name"] in names, out
        jsonschema.validate(json.loads(fn["arguments"]), schemas[fn["name"]])
