"""Tiny random checkpoints of every family, written by transformers in each family's published Hub key layout,
for the acceptance matrix (tests/test_matrix.py) and its multi-device worker (tests/matrix_worker.py).

Each family is built from a transformers config (tiny sizes, eager attention, sliding windows of 8 under
sequences of 20+), every norm weight is set to random non-zero values (Gemma's ``(1 + w)`` RMSNorms would hide
a lost or doubled offset at zero), the other weights to ``randn * scale`` (``FamilyFixture.tuning``), then
``save_pretrained`` writes the folder and the safetensors keys are rewritten where transformers 5 writes them
differently from the checkpoints published on the Hub:

* Gemma 1/2/3 text, Llama 3: ``model.layers.*``, ``model.embed_tokens.weight``, ``model.norm.weight``
  (+ ``lm_head.weight`` for the untied Llama): transformers 5 writes exactly that. Gemma 2 and PaliGemma are
  saved in shards (``model.safetensors.index.json``).
* RecurrentGemma (google/recurrentgemma-2b): ``model.layers.*.temporal_block.*``, ``model.final_norm.weight``,
  ``model.embed_tokens.weight``: as transformers writes it (the Hub port uses transformers' names).
* PaliGemma (google/paligemma-3b-pt-224, paligemma2-*): ``language_model.model.*``,
  ``vision_tower.vision_model.*``, ``multi_modal_projector.linear.*`` and no ``lm_head`` (tied). transformers
  5.x saves ``language_model.model.*`` / ``vision_tower.*`` / ``multi_modal_projector.*`` (its legacy
  mapping reversed), so the vision keys gain the ``vision_model.`` level the published repos have.

The reference transformers model of a family is the one ``from_pretrained`` reads back from the rewritten
folder (checked against the in-memory model), so transformers' own conversion of the published layout is
covered too. A tiny SentencePiece tokenizer (Gemma's special ids; ``"\\n"`` and ``<image>`` single tokens)
sized to the vocabulary is saved as ``tokenizer.model`` in every folder.

Families are ``FamilyFixture`` records in ``FIXTURES``: the built-in ones below, then one per
``tests/fixture_<name>.py`` file, which calls ``register_fixture`` (imported at the end of this module), so a
new family adds its fixture without touching this file.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

PAD, EOS, BOS = 0, 1, 2
SYMBOLS = ("<start_of_turn>", "<end_of_turn>", "\n", "<image>")
VOCAB = 320  # asked of SentencePiece; the models take the size it really gives


@dataclass(frozen=True)
class Vocab:
    """The tiny tokenizer's ids a family's config and inputs need."""

    size: int
    eot: int  # <end_of_turn>
    image: int  # <image>
    newline: int  # "\n"
    first: int  # the first ordinary piece (prompts hold no special ids)


@dataclass
class Inputs:
    """A family's test inputs: ``logits_ids`` [2, T] for the logits cells, ``prompt`` [T0] for generation;
    multimodal families add ``pixel_values`` (one image, [1, ...], repeated per logits row; [1, 3, H, W] for
    SigLIP towers), ``image_inputs`` (other per-image arrays the model reads beside them, e.g. Gemma 4's
    ``image_position_ids``), ``token_type_ids`` [2, T] for the logits cells and ``prompt_types`` [T0] for
    transformers' generate."""

    logits_ids: np.ndarray
    prompt: np.ndarray
    pixel_values: np.ndarray | None = None
    token_type_ids: np.ndarray | None = None
    prompt_types: np.ndarray | None = None
    image_inputs: dict[str, np.ndarray] = field(default_factory=dict)


def text_inputs(cfg: Any, v: Vocab, rng: np.random.RandomState) -> Inputs:
    """Two rows of BOS + 19 random ordinary pieces (longer than the sliding windows of 8); a 12-token prompt."""
    ids = np.concatenate([np.full((2, 1), BOS), rng.randint(v.first, v.size, (2, 19))], 1).astype(np.int32)
    prompt = np.concatenate([[BOS], rng.randint(v.first, v.size, 11)]).astype(np.int32)
    return Inputs(ids, prompt)


def keep_key(key: str) -> str | None:
    """transformers 5 writes the published layout itself."""
    return key


@dataclass(frozen=True)
class FamilyFixture:
    """How the matrix builds one family's tiny checkpoint.

    ``tuning`` is (embedding scale, other weights' scale, seed), picked so that the random model's greedy
    continuation is not one token repeated (a tied embedding echoes the last token when the blocks are
    weak), its top two logits stay apart at every greedy step (no float32 rounding flips a choice) and int8
    stays within the cell's bounds (strong blocks amplify the rounding). ``layout`` maps a key transformers
    5 saves to the published Hub key (None drops it); ``expected_keys`` must be in the rewritten folder, so a
    transformers upgrade that changes what it writes cannot silently test another layout. ``adjust`` runs
    after the random init (for weights that need a particular distribution, e.g. routers). ``types_name``: the
    keyword of the token types (``token_type_ids``; Gemma 4: ``mm_token_type_ids``), in gemmax and transformers
    alike."""

    name: str
    hf_config: Callable[[Vocab], Any]
    tuning: tuple[float, float, int]
    expected_keys: tuple[str, ...]
    hf_class: str = "AutoModelForCausalLM"
    layout: Callable[[str], str | None] = keep_key
    sharded: bool = False
    multimodal: bool = False
    inputs: Callable[[Any, Vocab, np.random.RandomState], Inputs] = text_inputs
    adjust: Callable[[torch.nn.Module, torch.Generator], None] | None = None
    types_name: str = "token_type_ids"


FIXTURES: dict[str, FamilyFixture] = {}


def register_fixture(fx: FamilyFixture) -> FamilyFixture:
    if fx.name in FIXTURES:
        raise ValueError(f"two matrix fixtures named {fx.name!r}")
    FIXTURES[fx.name] = fx
    return fx

#: The tokenizer corpus and the fine-tuning data: short English lines, some of them repeated.
LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "Gemma is a family of lightweight open models.",
    "Hello world, hello tokenizer, hello matrix.",
    "A red square sits on a blue background.",
    "Every family runs through the same interface.",
    "Small models train fast on two cores.",
    "The cat sat on the mat and looked at the dog.",
    "Numbers 0123456789 and symbols !?.,;:",
    "One decode step is shared by many requests.",
    "Low rank adapters learn a small update to the weights.",
]
TRAIN_TEXTS = [
    "the cat sat on the mat. the cat sat on the mat. the cat sat on the mat.",
    "hello world, hello world, hello world, hello world, hello world.",
    "a red square on a blue background. a red square on a blue background.",
    "the quick brown fox jumps over the lazy dog. the quick brown fox jumps.",
]


def train_tokenizer(folder: Path) -> Any:
    """The shared tiny SentencePiece model (``folder/tok.model``): pad 0, eos 1, bos 2, unk 3, then
    ``<start_of_turn>``, ``<end_of_turn>``, ``"\\n"``, ``<image>``."""
    from spm_fixtures import train_tiny_sentencepiece

    tok = train_tiny_sentencepiece(folder, LINES * 20, VOCAB, symbols=SYMBOLS)
    assert [tok.piece_to_id(s) for s in SYMBOLS] == [4, 5, 6, 7]
    return tok


# ---- transformers configs ------------------------------------------------------------------------------


def _gemma_text(vocab: int, kv: int, hidden: int, head_dim: int) -> dict[str, Any]:
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=kv, head_dim=head_dim, max_position_embeddings=256,
                hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, bos_token_id=BOS, eos_token_id=EOS,
                pad_token_id=PAD, tie_word_embeddings=True)


def _gemma_mqa(v: Vocab) -> Any:  # Gemma 1 2B: one KV head
    import transformers as tf

    return tf.GemmaConfig(**_gemma_text(v.size, 1, 32, 8))


def _gemma_mha(v: Vocab) -> Any:  # Gemma 1 7B: as many KV heads as query heads
    import transformers as tf

    return tf.GemmaConfig(**_gemma_text(v.size, 4, 48, 12))


def _gemma2(v: Vocab) -> Any:
    import transformers as tf

    return tf.Gemma2Config(**{**_gemma_text(v.size, 2, 32, 8), "eos_token_id": [EOS, v.eot]},
                           sliding_window=8, query_pre_attn_scalar=8, attn_logit_softcapping=50.0,
                           final_logit_softcapping=30.0, layer_types=["sliding_attention", "full_attention"])


def _gemma3(v: Vocab) -> Any:  # text-only Gemma3ForCausalLM: qk norm, local/global rope, sliding pattern
    import transformers as tf

    return tf.Gemma3TextConfig(**{**_gemma_text(v.size, 2, 32, 8), "num_hidden_layers": 3,
                                  "eos_token_id": [EOS, v.eot]},
                               sliding_window=8, query_pre_attn_scalar=8,
                               layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                               rope_parameters={
                                   "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                      "rope_theta": 1_000_000.0},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})


def _llama3(v: Vocab) -> Any:  # untied head, GQA, llama3 rope scaling
    import transformers as tf

    return tf.LlamaConfig(vocab_size=v.size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                          rms_norm_eps=1e-5, hidden_act="silu", bos_token_id=BOS, eos_token_id=EOS,
                          pad_token_id=PAD, tie_word_embeddings=False,
                          rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 16})


def _recurrent_gemma(v: Vocab) -> Any:  # one period: recurrent, recurrent, attention
    import transformers as tf

    return tf.RecurrentGemmaConfig(vocab_size=v.size, hidden_size=32, lru_width=32, intermediate_size=96,
                                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                                   attention_window_size=8, conv1d_width=4, logits_soft_cap=30.0,
                                   block_types=["recurrent", "recurrent", "attention"], rms_norm_eps=1e-6,
                                   hidden_activation="gelu_pytorch_tanh", bos_token_id=BOS,
                                   eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=True)


def _paligemma(v: Vocab) -> Any:  # PaliGemma 1: SigLIP (28 px, 7 px patches: 16 image tokens) + Gemma 1 MQA
    import transformers as tf

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=28, patch_size=7, vision_use_head=False)
    text = {**_gemma_text(v.size, 1, 32, 8), "model_type": "gemma"}
    return tf.PaliGemmaConfig(vision_config=vision, text_config=text, image_token_id=v.image, projection_dim=32)


def _randomize(model: torch.nn.Module, seed: int, embed_scale: float, scale: float) -> None:
    """Norm weights random non-zero; embeddings randn * embed_scale, other weights randn * scale.
    RecurrentGemma's ``recurrent_param`` keeps Griffin's init (decays in [0.9, 0.999], from the seeded global
    generator); SigLIP's LayerNorm scales are ``1 + randn * 0.3``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("recurrent_param"):
                continue
            if "vision" in name and ("layer_norm" in name or "layernorm" in name):
                p.copy_(1 + r * 0.3 if name.endswith("weight") else r * 0.08)
            elif "norm" in name:
                p.copy_(r * 0.5)
            elif "embed_tokens" in name:
                p.copy_(r * embed_scale)
            else:
                p.copy_(r * scale)


# ---- published key layouts -----------------------------------------------------------------------------


def _paligemma_published(key: str) -> str | None:
    """transformers 5 save key -> google/paligemma-* key (None: drop it)."""
    if key == "lm_head.weight" or key == "language_model.lm_head.weight":
        return None  # tied to the embedding; the published repos have no head
    for new, old in (("model.language_model.", "language_model.model."),
                     ("model.vision_tower.", "vision_tower.vision_model."),
                     ("model.multi_modal_projector.", "multi_modal_projector.")):
        if key.startswith(new):
            return old + key[len(new):]
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + key[len("vision_tower."):]
    return key


def _paligemma_inputs(cfg: Any, v: Vocab, rng: np.random.RandomState) -> Inputs:
    """An image prefix (``<image>`` * 16, BOS, 6 pieces, newline; type 0) then a 5-piece suffix (type 1); the
    second logits row has other prompt text under the same image."""
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    text = rng.randint(v.first, v.size, 6)
    prompt = np.concatenate([[v.image] * n_img, [BOS], text, [v.newline]]).astype(np.int32)  # the prefix
    suffix = rng.randint(v.first, v.size, (2, 5))
    ids = np.concatenate([np.stack([prompt, prompt]), suffix], 1).astype(np.int32)
    ids[1, n_img + 1:n_img + 7] = rng.randint(v.first, v.size, 6)  # a second prompt text, same image
    types = np.concatenate([np.zeros((2, len(prompt))), np.ones((2, 5))], 1).astype(np.int32)
    size = cfg.vision_config.image_size
    pixels = rng.uniform(-1, 1, (1, 3, size, size)).astype(np.float32)  # already normalized as SigLIP's
    return Inputs(ids, prompt, pixels, types, np.zeros(len(prompt), np.int32))


for _fx in (
    FamilyFixture("gemma_mqa", _gemma_mqa, (0.06, 0.2, 1), (
        "model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight", "model.norm.weight")),
    FamilyFixture("gemma_mha", _gemma_mha, (0.04, 0.15, 1), (
        "model.layers.0.self_attn.k_proj.weight", "model.embed_tokens.weight", "model.norm.weight")),
    FamilyFixture("gemma2", _gemma2, (0.04, 0.25, 0), (
        "model.layers.1.pre_feedforward_layernorm.weight", "model.embed_tokens.weight", "model.norm.weight"),
        sharded=True),
    FamilyFixture("gemma3", _gemma3, (0.06, 0.15, 2), (
        "model.layers.2.self_attn.q_norm.weight", "model.embed_tokens.weight", "model.norm.weight")),
    FamilyFixture("llama3", _llama3, (0.04, 0.25, 3), (
        "model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight", "model.norm.weight",
        "lm_head.weight")),
    FamilyFixture("recurrent_gemma", _recurrent_gemma, (0.06, 0.15, 2), (
        "model.layers.0.temporal_block.rg_lru.recurrent_param", "model.layers.2.temporal_block.q_proj.weight",
        "model.embed_tokens.weight", "model.final_norm.weight")),
    FamilyFixture("paligemma", _paligemma, (0.05, 0.18, 8), (
        "language_model.model.layers.0.self_attn.q_proj.weight", "language_model.model.embed_tokens.weight",
        "language_model.model.norm.weight", "vision_tower.vision_model.embeddings.patch_embedding.weight",
        "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
        "vision_tower.vision_model.post_layernorm.weight", "multi_modal_projector.linear.weight"),
        hf_class="PaliGemmaForConditionalGeneration", layout=_paligemma_published, sharded=True,
        multimodal=True, inputs=_paligemma_inputs),
):
    register_fixture(_fx)


BUILT_IN = tuple(FIXTURES)


def fixture_modules() -> list[str]:
    """The ``tests/fixture_*.py`` modules; each registers exactly one more family."""
    return [path.stem for path in sorted(Path(__file__).parent.glob("fixture_*.py"))]


def families() -> tuple[str, ...]:
    """Every family of the matrix: the built-in ones in their order, then the fixture modules' by name.

    Imports the fixture modules not imported yet. Computed when asked, not when this module is imported: a
    test file that imports a fixture module first (``from fixture_x import ...``) imports this module from
    the middle of that one, before its family is registered, and a list frozen then would silently lack it.
    The order does not depend on which module was imported first (the seeds depend on it), and a family
    missing is an error, never a smaller matrix."""
    import importlib
    import sys

    here = str(Path(__file__).parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    modules = fixture_modules()
    for name in modules:
        importlib.import_module(name)
    extra = sorted(set(FIXTURES) - set(BUILT_IN))
    if len(extra) != len(modules):
        raise RuntimeError(f"matrix fixture modules {modules} registered {extra}: a module still being "
                           "imported (an import cycle through matrix_fixtures) has not registered its family")
    return BUILT_IN + tuple(extra)


def rewrite_keys(folder: Path, fn: Callable[[str], str | None]) -> list[str]:
    """Rename (or drop, fn -> None) the tensors of every safetensors file in ``folder`` and its index."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    keys: list[str] = []
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as s:
            meta = s.metadata() or {}
            tensors = {k: s.get_tensor(k) for k in s.keys()}
        out = {}
        for k, v in tensors.items():
            new = fn(k)
            if new is not None:
                out[new] = v.contiguous()
        save_file(out, str(f), metadata={**meta, "format": "pt"})
        keys += list(out)
    if index is not None:
        index["weight_map"] = {fn(k): v for k, v in index["weight_map"].items() if fn(k) is not None}
        index_path.write_text(json.dumps(index, indent=2))
    return sorted(keys)


# ---- one family's checkpoint ------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    family: str
    folder: Path
    hf: Any  # the transformers model read back from ``folder`` (float32, eval)
    vocab: int
    multimodal: bool
    logits_ids: np.ndarray  # [2, T] int32
    prompt: np.ndarray  # [T0] int32, the generation prompt
    pixel_values: np.ndarray | None = None  # [n, 3, H, W] float32 (multimodal)
    token_type_ids: np.ndarray | None = None  # [2, T] (multimodal, transformers' meaning for the family)
    eos_ids: tuple[int, ...] = (EOS,)
    keys: list[str] = field(default_factory=list)
    greedy_margin: float = float("nan")
    hf_class: str = "AutoModelForCausalLM"
    prompt_types: np.ndarray | None = None  # [T0] token_type_ids of ``prompt`` (multimodal)
    image_inputs: dict[str, np.ndarray] = field(default_factory=dict)  # per-image arrays beside pixel_values
    types_name: str = "token_type_ids"

    def images(self, rows: int) -> dict[str, np.ndarray]:
        """``pixel_values`` and the other per-image inputs of the one image, repeated for ``rows`` rows."""
        return {k: np.repeat(v, rows, axis=0) for k, v in {"pixel_values": self.pixel_values,
                                                           **self.image_inputs}.items()}

    @property
    def logits_kwargs(self) -> dict[str, Any]:
        """The extra arguments of ``lm.logits`` for ``logits_ids`` (the image and the token types)."""
        if not self.multimodal:
            return {}
        return {**self.images(2), self.types_name: self.token_type_ids}

    @property
    def generate_kwargs(self) -> dict[str, Any]:
        """The extra arguments of ``lm.generate`` for ``prompt`` (multimodal: its image)."""
        return self.images(1) if self.multimodal else {}

    def hf_model_class(self) -> Any:
        import transformers

        return getattr(transformers, self.hf_class)

    def hf_logits(self, model: Any = None, ids: np.ndarray | None = None) -> np.ndarray:
        """float32 logits of a transformers model (default: the reference) on ``logits_ids``."""
        model = self.hf if model is None else model
        ids = self.logits_ids if ids is None else ids
        kw = {}
        if self.multimodal:
            kw = {k: torch.tensor(v) for k, v in self.images(len(ids)).items()}
            kw[self.types_name] = torch.tensor(self.token_type_ids[:len(ids)], dtype=torch.long)
        with torch.no_grad():
            return model(input_ids=torch.tensor(ids, dtype=torch.long), **kw).logits.float().numpy()

    def hf_greedy(self, max_new_tokens: int = 8) -> np.ndarray:
        """transformers' greedy ``generate`` on ``prompt``: prompt + new tokens."""
        ids = torch.tensor(self.prompt[None], dtype=torch.long)
        kw: dict[str, Any] = {"attention_mask": torch.ones_like(ids)}
        if self.multimodal:
            kw.update({k: torch.tensor(v) for k, v in self.images(1).items()})
            kw[self.types_name] = torch.tensor(self.prompt_types[None], dtype=torch.long)
        with torch.no_grad():
            out = self.hf.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=PAD,
                                   output_logits=True, return_dict_in_generate=True, **kw)
        top2 = np.sort(np.stack([x[0].float().numpy() for x in out.logits]), -1)[:, -2:]
        self.greedy_margin = float((top2[:, 1] - top2[:, 0]).min())  # how far each pick is from a tie
        return out.sequences[0].numpy().astype(np.int32)


def build_checkpoint(family: str, folder: Path, tokenizer_model: Path, tok: Any) -> Checkpoint:
    """Write ``family``'s tiny checkpoint into ``folder`` in the published layout and return its description
    (with the transformers model read back from it)."""
    fx = FIXTURES[family]
    v = Vocab(tok.vocab_size, tok.piece_to_id("<end_of_turn>"), tok.piece_to_id("<image>"),
              tok.piece_to_id("\n"), len(SYMBOLS) + 4)
    cfg = fx.hf_config(v)
    embed_scale, scale, seed = fx.tuning
    seed_all = 1000 * seed + families().index(family)
    torch.manual_seed(seed_all)  # the weights _randomize keeps (recurrent_param)
    import transformers

    cls = getattr(transformers, fx.hf_class)
    model = cls.from_config(cfg, attn_implementation="eager") if fx.hf_class.startswith("Auto") else cls(cfg)
    model.config._attn_implementation = "eager"
    _randomize(model, seed_all, embed_scale, scale)
    if fx.adjust is not None:
        fx.adjust(model, torch.Generator().manual_seed(seed_all + 1))
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, **({"max_shard_size": "20KB"} if fx.sharded else {}))
    keys = rewrite_keys(folder, fx.layout)
    missing = [k for k in fx.expected_keys if k not in keys]
    assert not missing, f"{family}: the rewritten checkpoint lacks published keys {missing}; it has {keys[:8]}..."
    if fx.sharded:
        assert (folder / "model.safetensors.index.json").exists() and len(list(folder.glob("*.safetensors"))) > 1
    shutil.copy(tokenizer_model, folder / "tokenizer.model")

    x = fx.inputs(cfg, v, np.random.RandomState(1000 * seed + 1))
    eos = cfg.get_text_config().eos_token_id
    ck = Checkpoint(family, folder, None, v.size, fx.multimodal, x.logits_ids, x.prompt, x.pixel_values,
                    x.token_type_ids, tuple(eos) if isinstance(eos, list) else (eos,), keys,
                    hf_class=fx.hf_class, prompt_types=x.prompt_types, image_inputs=x.image_inputs,
                    types_name=fx.types_name)
    # transformers reads the published layout back (converting it where it must) to the same model
    loaded = cls.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    want, got = ck.hf_logits(model), ck.hf_logits(loaded)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), f"{family}: transformers' reload differs"
    ck.hf = loaded
    return ck


def write_jsonl(path: Path, texts: list[str] = TRAIN_TEXTS) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path
