"""CPU inference latency of our DistilBERT vs transformers.DistilBertModel with the same weights.

    python benchmarks/student_latency.py [--config "distilbert-base-uncased (66M)"] [--repeats 20]

Prints the median latency (ms) at batch 1 and 32, sequence 128, for both, and ours/theirs ratios.
Both run in the same process, interleaved, under torch.inference_mode, fp32.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
import transformers

from students import DistilBERTModel, create_model_config


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="distilbert-base-uncased (66M)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()

    config = create_model_config(args.config)
    ours = DistilBERTModel(config).eval()
    theirs = transformers.DistilBertModel(config).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
          f"attn {theirs.config._attn_implementation}, config {args.config!r}, seq {args.seq}")
    for B in args.batches:
        ids = torch.randint(1000, config.vocab_size, (B, args.seq))
        mask = torch.ones_like(ids)
        ours_fn = functools.partial(ours, ids, mask)
        theirs_fn = functools.partial(theirs, input_ids=ids, attention_mask=mask)
        repeats = args.repeats if B == 1 else max(3, args.repeats // 3)
        with torch.inference_mode():
            # Three interleaved rounds, so drift in machine load affects both implementations alike.
            rounds = [(median_ms(ours_fn, repeats), median_ms(theirs_fn, repeats)) for _ in range(3)]
        a = statistics.median(r[0] for r in rounds)
        b = statistics.median(r[1] for r in rounds)
        print(f"batch {B:3d}: ours {a:8.2f} ms   transformers {b:8.2f} ms   ratio {a / b:.3f}")


if __name__ == "__main__":
    main()
