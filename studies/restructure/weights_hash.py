"""Hashes that say whether two training runs gave the same model: sha256 of the model's and the EMA's
tensors (by parameter name, in sorted order) in a last.pt, and of an inpaint_metrics.json without its
timings and versions.

    python studies/restructure/weights_hash.py outputs/inpaint/last.pt results/inpaint_metrics.json
"""
import hashlib
import json
import sys

import torch

TIMINGS = {"seconds", "wall_time_s", "images_per_s", "eval_seconds", "train_seconds"}


def tensors_hash(state: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def without(value, keys):
    """The JSON value with the named keys dropped at every depth."""
    if isinstance(value, dict):
        return {k: without(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [without(v, keys) for v in value]
    return value


def metrics_hash(path: str, drop=()) -> str:
    result = without(json.load(open(path)), TIMINGS | {"versions", "perception_judge", *drop})
    return hashlib.sha256(json.dumps(result["metrics"], sort_keys=True).encode()).hexdigest()


if __name__ == "__main__":
    ckpt = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
    print(f"model {tensors_hash(ckpt['model'])}\nema   {tensors_hash(ckpt['ema'])}\nstep  {ckpt['step']}")
    if len(sys.argv) > 2:
        print(f"metrics (timings dropped) {metrics_hash(sys.argv[2])}")
