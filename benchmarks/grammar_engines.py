"""The three grammar engines gemmax could use for structured output, on Gemma 3's real vocabulary.

llguidance (the one gemmax uses), xgrammar and outlines-core each get the 262,144 tokens of the bundled
Gemma 3 270M's tokenizer as bytes (``gemmax.engine.constrain.token_bytes``), a nested JSON schema and a
document that matches it, fed token by token: vocabulary setup time, schema compile time, next-token
mask time (mean and max), whether each document token is allowed and the end allowed; then which of 13
schema features each one compiles. The other two are not gemmax dependencies:

    pip install xgrammar outlines-core
    python benchmarks/grammar_engines.py [--engines llguidance,xgrammar,outlines-core]

Each engine runs in its own subprocess (xgrammar imports torch), one after the other.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

import numpy as np

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "pattern": "^[A-Z][a-z]+$"},
    "age": {"type": "integer", "minimum": 0},
    "tags": {"type": "array", "items": {"type": "object", "properties": {
        "k": {"type": "string", "enum": ["a", "b"]}, "v": {"type": "number"}}, "required": ["k", "v"]}},
    "ok": {"type": "boolean"}}, "required": ["name", "age", "tags"], "additionalProperties": False}
DOC = json.dumps({"name": "Alice", "age": 31, "tags": [{"k": "a", "v": 1.5}, {"k": "b", "v": -2}], "ok": True})
PROBES = {
    "integer range": {"type": "integer", "minimum": 3, "maximum": 17},
    "string length": {"type": "string", "minLength": 2, "maxLength": 5},
    "pattern": {"type": "string", "pattern": "^[a-z]{3}-[0-9]+$"},
    "anyOf": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
    "recursive $ref": {"$defs": {"n": {"type": "object", "properties": {"c": {"type": "array",
                                                                                "items": {"$ref": "#/$defs/n"}}}}},
                       "$ref": "#/$defs/n"},
    "format date-time": {"type": "string", "format": "date-time"},
    "minItems / maxItems": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
    "additionalProperties schema": {"type": "object", "additionalProperties": {"type": "integer"}},
    "const": {"const": "x"},
    "oneOf": {"oneOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                        {"type": "null"}]},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}, {"required": ["a"]}]},
    "exclusive bounds": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "uniqueItems": {"type": "array", "uniqueItems": True},
}


def _bit(mask: Any, t: int) -> int:
    return (int(mask[t // 32]) >> (t % 32)) & 1


def run_llguidance(tok: Any, tbytes: list[bytes], special: list[int], ids: list[int]) -> dict[str, Any]:
    import llguidance as llg

    from gemmax.engine.constrain import Constraint, vocabulary

    t0 = time.perf_counter()
    voc = vocabulary(tok, tok.vocab_size, tok.stop_ids)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = Constraint.json_schema(SCHEMA).matcher(voc)
    compile_s = time.perf_counter() - t0
    mask = np.zeros(voc.words, np.int32)

    def step(t: int | None) -> int:
        m.fill(mask)
        if t is not None:
            m.consume(t)
        return _bit(mask, t if t is not None else tok.eos_id)

    probes = {}
    for k, s in PROBES.items():
        err, msgs = llg.LLMatcher.validate_grammar_with_warnings(llg.LLMatcher.grammar_from_json_schema(s))
        probes[k] = f"refused: {msgs[0][:60]}" if err else "ok"
    return {"setup_s": setup, "compile_s": compile_s, **_walk(step, ids), "probes": probes}


def run_xgrammar(tok: Any, tbytes: list[bytes], special: list[int], ids: list[int]) -> dict[str, Any]:
    import xgrammar as xgr

    t0 = time.perf_counter()
    comp = xgr.GrammarCompiler(xgr.TokenizerInfo(tbytes, xgr.VocabType.RAW, stop_token_ids=list(tok.stop_ids)))
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = xgr.GrammarMatcher(comp.compile_json_schema(json.dumps(SCHEMA)))
    compile_s = time.perf_counter() - t0
    mask = xgr.allocate_token_bitmask(1, tok.vocab_size)

    def step(t: int | None) -> int:
        m.fill_next_token_bitmask(mask)
        if t is not None:
            m.accept_token(t)
        return _bit(mask[0], t if t is not None else tok.eos_id)

    probes = {}
    for k, s in PROBES.items():
        try:
            t0 = time.perf_counter()
            comp.compile_json_schema(json.dumps(s))
            probes[k] = f"ok ({1000 * (time.perf_counter() - t0):.0f} ms)"
        except Exception as e:  # noqa: BLE001 - the engine's own error is the result
            probes[k] = "refused: " + " ".join(str(e).split())[:60]
    return {"setup_s": setup, "compile_s": compile_s, **_walk(step, ids), "probes": probes}


def run_outlines(tok: Any, tbytes: list[bytes], special: list[int], ids: list[int]) -> dict[str, Any]:
    import outlines_core as oc
    from outlines_core.json_schema import build_regex_from_schema

    t0 = time.perf_counter()
    table: dict[bytes, list[int]] = {}
    for i, b in enumerate(tbytes):
        if b and i not in special and i != tok.eos_id:
            table.setdefault(b, []).append(i)
    voc = oc.Vocabulary(tok.eos_id, table)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    g = oc.Guide(oc.Index(build_regex_from_schema(json.dumps(SCHEMA)), voc))
    compile_s = time.perf_counter() - t0

    def step(t: int | None) -> int:
        allowed = g.get_tokens()
        if t is not None:
            g.advance(t)
            return int(t in allowed)
        return int(tok.eos_id in allowed)

    probes = {}
    for k, s in PROBES.items():
        try:
            build_regex_from_schema(json.dumps(s))
            probes[k] = "ok"
        except Exception as e:  # noqa: BLE001 - the engine's own error is the result
            probes[k] = "refused: " + " ".join(str(e).split())[:60]
    return {"setup_s": setup, "compile_s": compile_s, **_walk(step, ids), "probes": probes}


def _walk(step: Any, ids: list[int]) -> dict[str, Any]:
    """Feed the document's tokens, timing each mask; then whether the end (EOS) is allowed."""
    times, ok = [], True
    for t in ids:
        t0 = time.perf_counter()
        ok &= bool(step(t))
        times.append(time.perf_counter() - t0)
    return {"mask_ms_mean": 1000 * float(np.mean(times)), "mask_ms_max": 1000 * float(np.max(times)),
            "doc_allowed": ok, "eos_allowed": bool(step(None))}


ENGINES = {"llguidance": run_llguidance, "xgrammar": run_xgrammar, "outlines-core": run_outlines}


def child(name: str) -> None:
    from gemmax.engine.constrain import token_bytes
    from gemmax.io.bundled import default_model_path
    from gemmax.io.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(default_model_path())
    tbytes, special = token_bytes(tok)
    ids = tok.encode(DOC, add_bos=False)
    print(json.dumps({"engine": name, "doc_tokens": len(ids), **ENGINES[name](tok, tbytes, special, ids)}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return 0
    results = []
    for name in args.engines.split(","):
        p = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            print(f"{name}: failed\n{p.stderr[-2000:]}")
            continue
        results.append(json.loads(p.stdout.strip().splitlines()[-1]))
    if not results:
        return 1
    names = [r["engine"] for r in results]
    rows = [("vocabulary setup, s", "setup_s", "{:.2f}"), ("schema compile, ms", "compile_s", "{:.1f}"),
            ("mask mean, ms", "mask_ms_mean", "{:.3f}"), ("mask max, ms", "mask_ms_max", "{:.3f}"),
            ("document accepted", "doc_allowed", "{}"), ("EOS allowed at its end", "eos_allowed", "{}")]
    print(f"document: {results[0]['doc_tokens']} tokens\n")
    print("| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for label, key, fmt in rows:
        scale = 1000 if key == "compile_s" else 1
        print(f"| {label} | " + " | ".join(fmt.format(r[key] * scale if scale != 1 else r[key])
                                           for r in results) + " |")
    for k in PROBES:
        print(f"| {k} | " + " | ".join(r["probes"][k] for r in results) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
