"""Tokenization throughput on the offline Wikipedia summaries (documents and tokens per second).

    python benchmarks/tokenize_throughput.py [--num-proc 1 2] [--max-length 128]

Times `tokenize_and_chunk` through `Dataset.map(batched=True, num_proc=N)` with the cache off, then the
cached second run of `build_corpus`.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import datasets

from distill.corpus import build_corpus, load_wiki_summaries, tokenize_and_chunk
from distill.recipes import DataConfig
from students.tokenizer import get_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--max-length", type=int, default=128)
    args = p.parse_args()
    tokenizer = get_tokenizer("distilbert-base-uncased")
    docs = load_wiki_summaries()
    datasets.disable_caching()
    for n in args.num_proc:
        for packing in (False, True):
            t0 = time.perf_counter()
            out = docs.map(tokenize_and_chunk, batched=True, num_proc=n if n > 1 else None,
                           remove_columns=docs.column_names,
                           fn_kwargs=dict(tokenizer=tokenizer, max_length=args.max_length, packing=packing))
            dt = time.perf_counter() - t0
            tokens = sum(out["length"])
            print(f"num_proc {n} packing {packing!s:5s}: {len(docs) / dt:8.0f} documents/s  "
                  f"{tokens / dt:10.0f} tokens/s  ({len(docs)} documents, {tokens} tokens, {len(out)} sequences, "
                  f"{dt:.2f} s)")
    datasets.enable_caching()
    with tempfile.TemporaryDirectory() as cache:
        datasets.config.HF_DATASETS_CACHE = cache
        cfg = DataConfig(max_length=args.max_length, num_proc=1)
        t0 = time.perf_counter()
        build_corpus(cfg, tokenizer)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        build_corpus(cfg, tokenizer)
        print(f"build_corpus: first run {first:.2f} s, cached second run {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
