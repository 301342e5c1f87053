"""Subprocess of tests/test_matrix.py: greedy generation of every family on 8 fake CPU devices (mesh 2x4,
axes ("batch", "model"), the family's ``get_layout_map``) next to the same generation on one device: two
prompts of different lengths as one batch (PaliGemma: two image prompts, one call each).

The device count must be fixed before jax is imported, hence a fresh process. It reads a JSON spec (a list of
{"family", "folder", "prompts", "images"}; "images": the per-image inputs by name, one image per prompt, or
null) and writes a JSON result per family: the one-device and the sharded tokens and the sharding specs of the
loaded weights, or the error (type and message) that stopped it.

    python tests/matrix_worker.py SPEC.json RESULT.json
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any

if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from gemmax import CausalLM  # noqa: E402
from gemmax import distribution as gd  # noqa: E402


def greedy(lm: Any, prompts: list[np.ndarray], images: dict[str, np.ndarray] | None) -> list[list[int]]:
    """Text prompts as one batch; image prompts one by one, each with its image's inputs (``pixel_values``...;
    a batch of image prompts is not part of the interface)."""
    if images is None:
        return [np.asarray(a).tolist() for a in lm.generate(prompts, max_new_tokens=8)]
    return [np.asarray(lm.generate(p, max_new_tokens=8, **{k: v[i:i + 1] for k, v in images.items()})).tolist()
            for i, p in enumerate(prompts)]


def run_family(spec: dict[str, Any]) -> dict[str, Any]:
    prompts = [np.asarray(p, np.int32) for p in spec["prompts"]]
    pixels = None if spec.get("images") is None else {k: np.asarray(v, np.float32 if k == "pixel_values" else np.int32)
                                                         for k, v in spec["images"].items()}
    lm = CausalLM.from_preset(spec["folder"])
    reference = greedy(lm, prompts, pixels)
    mesh = gd.DeviceMesh((2, 4), ("batch", "model"), gd.list_devices())
    layout = gd.get_layout_map(lm.config, mesh)
    dist = gd.ModelParallel(mesh, layout, batch_dim_name="batch")
    with gd.use_distribution(dist):
        sharded = CausalLM.from_preset(spec["folder"])  # each device reads its shard while loading
        specs = sorted({f"{path}: {leaf.sharding.spec}" for path, leaf in sharded.weights()})
        got = greedy(sharded, prompts, pixels)
    return {"reference": reference, "sharded": got, "specs": specs, "devices": len(jax.devices())}


def main(spec_path: str, out_path: str) -> None:
    specs = json.loads(open(spec_path).read())
    results: dict[str, Any] = {}
    for spec in specs:
        try:
            results[spec["family"]] = run_family(spec)
        except Exception as e:  # noqa: BLE001 - reported per family to the test
            results[spec["family"]] = {"error": f"{type(e).__name__}: {e}",
                                       "traceback": traceback.format_exc()[-3000:]}
        with open(out_path, "w") as f:  # after each family, so a timeout still reports the finished ones
            json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
