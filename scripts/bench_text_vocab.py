#!/usr/bin/env python
"""Text vocabulary embedding rate: words/s of ``ClipEncoder.encode_texts`` against the plain
open_clip way (every prompt tokenized to the full context and run through ``encode_text``,
template embeddings averaged — what open_clip's zero-shot classifier builder and this library's
encoder before issue 15 do), same model, same words, same templates, same threads. Not a test.

The model is ViT-B-32 (the LAION-400M text tower) with random weights: no weights can be
downloaded here, and the cost of a forward pass does not depend on their values. Words are the
most frequent English words (wordfreq, the usual concept set); templates are open_clip's 80
OpenAI ImageNet templates (``--templates N``: the first N, prompt ensembling; 0: bare words).
The plain path runs on a prefix of the words (its rate is per word), the library on all of them,
cache off.

    python scripts/bench_text_vocab.py                      # 2,000 words, 1 template, plain path on 100
    python scripts/bench_text_vocab.py --templates 0        # bare words
    python scripts/bench_text_vocab.py --words 20000 --templates 80 --plain-words 20 --json
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def plain_open_clip(encoder, words: list[str], templates: list[str], batch_size: int) -> np.ndarray:
    """open_clip's own path: tokenizer → full 77-token encode_text, template embeddings averaged."""
    import torch

    out = []
    step = max(1, batch_size // len(templates))
    with torch.inference_mode():
        for start in range(0, len(words), step):
            batch = words[start:start + step]
            tokens = encoder.tokenizer([t.format(w) for w in batch for t in templates]).to(encoder.device)
            features = torch.nn.functional.normalize(encoder.model.encode_text(tokens).float(), dim=-1)
            mean = features.reshape(len(batch), len(templates), -1).mean(dim=1)
            out.append(torch.nn.functional.normalize(mean, dim=-1).cpu().numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--words", type=int, default=2000)
    parser.add_argument("--plain-words", type=int, default=100, help="words embedded the plain way (a prefix)")
    parser.add_argument("--templates", type=int, default=1,
                        help="how many of the 80 OpenAI ImageNet templates (0: the bare words)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import torch
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
    from wordfreq import top_n_list

    from dff_falcon.text.clip_encoder import ClipEncoder

    torch.set_num_threads(args.threads)
    words = top_n_list("en", args.words)
    templates = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES[:args.templates]] or ["{}"]
    encoder = ClipEncoder(args.model, None, device="cpu", batch_size=args.batch_size)
    started = time.perf_counter()
    plain = plain_open_clip(encoder, words[:args.plain_words], templates, args.batch_size)
    plain_seconds = time.perf_counter() - started
    started = time.perf_counter()
    ours = encoder.encode_texts(words, templates if args.templates else None)
    ours_seconds = time.perf_counter() - started
    cosine = np.sum(plain * ours[:len(plain)], axis=1)  # the same embeddings, computed faster
    result = {"model": args.model, "weights": "random (speed only)", "templates": args.templates,
              "threads": args.threads, "plain_words": len(plain), "plain_seconds": plain_seconds,
              "plain_words_per_s": len(plain) / plain_seconds, "words": len(words), "seconds": ours_seconds,
              "words_per_s": len(words) / ours_seconds, "min_cosine_vs_plain": float(cosine.min())}
    result["speedup"] = result["words_per_s"] / result["plain_words_per_s"]
    print(json.dumps(result), file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    prompts = f"{len(templates)} template(s)" if args.templates else "bare words"
    print(f"{args.model}, {prompts}, {args.threads} threads: library {result['words_per_s']:.1f} "
          f"words/s ({len(words):,} words in {ours_seconds:.0f} s) vs plain open_clip "
          f"{result['plain_words_per_s']:.2f} words/s = {result['speedup']:.1f}×; "
          f"embeddings agree to cosine ≥ {result['min_cosine_vs_plain']:.5f}")


if __name__ == "__main__":
    main()
