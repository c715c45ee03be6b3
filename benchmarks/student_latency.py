"""Inference latency of our DistilBERT vs transformers.DistilBertModel with the same weights.

    python benchmarks/student_latency.py [--config "distilbert-base-uncased (66M)"] [--repeats 20]
    python benchmarks/student_latency.py --device cuda --bf16 --repeats 50

Prints the median latency (ms) at batch 1 and 32, sequence 128, for both, and ours/theirs ratios.
Both run in the same process, in interleaved rounds (distill.mechanics.latency), under torch.inference_mode,
fp32 unless --bf16 (weights in bf16); transformers with SDPA attention.
"""

from __future__ import annotations

import argparse

import torch
import transformers

from distill.mechanics import latency
from students import DistilBERTModel, create_model_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="distilbert-base-uncased (66M)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    args = p.parse_args()

    config = create_model_config(args.config)
    config._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    ours = DistilBERTModel(config).eval()
    theirs = transformers.DistilBertModel(config).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours, theirs = ours.to(args.device, dtype), theirs.to(args.device, dtype)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
          f"attn {theirs.config._attn_implementation}, config {args.config!r}, seq 128")
    ms = latency({"ours": lambda i, m: ours(i, m), "transformers": lambda i, m: theirs(input_ids=i, attention_mask=m)},
                 args.batches, args.repeats, args.device)
    for B in args.batches:
        a, b = ms["ours"][B], ms["transformers"][B]
        print(f"batch {B:3d}: ours {a} ms   transformers {b} ms   ratio of medians {a.median / b.median:.3f}")


if __name__ == "__main__":
    main()
