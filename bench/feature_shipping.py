"""Should learners recompute target features, or receive them from the rollout actors?

Measures, for one SFT batch: the target forward that makes the features (what a learner would
redo with its own frozen target copy), the experience's payload bytes, and the time to move
that experience from one Ray actor to another through the object store (what shipping costs).

    .venv/bin/python bench/feature_shipping.py            # tiny test target + SmolLM2-135M shape
    .venv/bin/python bench/feature_shipping.py --json out.json

CPU only, random weights (timing depends on shapes, not values), one torch thread per process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import ray
import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    # name: (hidden, layers, heads, kv heads, intermediate, vocab, draft vocab, batch, length)
    "tiny-test": (32, 8, 4, 2, 64, 49152, 256, 2, 48),
    "smollm2-135m": (576, 30, 9, 3, 1536, 49152, 4096, 2, 256),
}


def build(shape: tuple) -> tuple:
    from actors.target_worker import TargetWorker
    from speculative.target import TargetModel

    hidden, layers, heads, kv, inter, vocab, draft, _, _ = shape
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    target = TargetModel(LlamaForCausalLM(config).eval())
    return TargetWorker(target, torch.arange(draft))


def batch(shape: tuple) -> dict[str, torch.Tensor]:
    *_, b, t = shape
    ids = torch.randint(0, shape[5], (b, t))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}


@ray.remote(num_cpus=1)
class Producer:
    def __init__(self, shape: tuple):
        torch.set_num_threads(1)
        self.worker, self.shape = build(shape), shape

    def forward_seconds(self, reps: int) -> tuple[float, int]:
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            experience = self.worker.sft_experience(batch(self.shape))
            times.append(time.perf_counter() - start)
        return statistics.median(times), experience.nbytes()

    def experience(self):
        return self.worker.sft_experience(batch(self.shape))


@ray.remote(num_cpus=1)
class Consumer:
    def fetch_seconds(self, refs: list) -> float:
        start = time.perf_counter()
        experience = ray.get(refs[0])
        assert experience.num_tokens > 0
        return time.perf_counter() - start


def measure(name: str, reps: int) -> dict[str, float]:
    shape = SHAPES[name]
    producer, consumer = Producer.remote(shape), Consumer.remote()
    forward_s, nbytes = ray.get(producer.forward_seconds.remote(reps))
    fetches = []
    for _ in range(reps):
        ref = producer.experience.remote()
        ray.wait([ref])
        fetches.append(ray.get(consumer.fetch_seconds.remote([ref])))
    tokens = shape[-2] * shape[-1]
    fetch_s = statistics.median(fetches)
    return {"shape": name, "tokens": tokens, "experience_bytes": nbytes, "bytes_per_token": nbytes / tokens,
            "target_forward_ms": 1e3 * forward_s, "object_store_fetch_ms": 1e3 * fetch_s,
            "fetch_over_forward": fetch_s / forward_s,
            "break_even_GBps": nbytes / forward_s / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = [measure(name, args.reps) for name in args.shapes.split(",")]
    ray.shutdown()
    for row in rows:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
