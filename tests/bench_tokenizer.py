"""Tokenization throughput: data.Tokenizer (tiktoken) vs Hugging Face `tokenizers`, same 10,000 strings.

    python tests/bench_tokenizer.py [--assets DIR] [--n 10000] [--repeat 3]

For each real tokenizer it times one string at a time (the way tokenize_records calls it) and a
whole batch at once (both libraries use their own thread pools), checks that the ids agree, and
prints strings/s, MB/s and the ratio ours/HF (> 1 means we are faster). Best of --repeat runs.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import data  # noqa: E402
from test_data import make_corpus  # noqa: E402  (the seeded corpus of the equality tests)


def best(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", default=os.environ.get("PATCHER_ASSETS", Path.home() / ".cache" / "patcher-assets"),
                        help="directory holding the real tokenizers (see tests/conftest.py)")
    parser.add_argument("--n", type=int, default=10_000, help="number of strings")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per measurement; the best is kept")
    args = parser.parse_args()
    from tokenizers import Tokenizer as HFTokenizer

    # typical SFT text (the paper's safety prompts and responses) mixed with the test's varied corpus
    texts = make_corpus(args.n // 2, seed=1)
    safety = HERE / "data" / "safety"
    lines = [json.loads(l) for f in sorted(safety.glob("*.jsonl")) for l in f.read_text().splitlines() if l.strip()]
    lines = [v for r in lines for v in r.values() if isinstance(v, str)] or make_corpus(1000, seed=2)
    texts += [lines[i % len(lines)] + f" ({i})" for i in range(args.n - len(texts))]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(f"{len(texts)} strings, {mb:.2f} MB, {os.cpu_count()} CPUs")
    print(f"{'tokenizer':<24}{'mode':<10}{'ours str/s':>12}{'HF str/s':>12}{'ours MB/s':>11}{'HF MB/s':>9}{'ratio':>8}")
    for name in ["smollm2-135m-instruct", "llama3-tokenizer", "qwen2-tokenizer"]:
        d = Path(args.assets) / name
        if not (d / "tokenizer.json").exists():
            print(f"{name:<24}absent")
            continue
        tok, hf = data.load_tokenizer(d), HFTokenizer.from_file(str(d / "tokenizer.json"))
        modes = {
            "single": (lambda: [tok.encode(t) for t in texts],
                       lambda: [hf.encode(t, add_special_tokens=False).ids for t in texts]),
            "batch": (lambda: tok.encode_batch(texts),
                      lambda: [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]),
        }
        for mode, (ours_fn, hf_fn) in modes.items():
            t_ours, ours = best(ours_fn, args.repeat)
            t_hf, theirs = best(hf_fn, args.repeat)
            assert ours == theirs, f"{name}: ids differ from HF"
            print(f"{name:<24}{mode:<10}{len(texts) / t_ours:>12,.0f}{len(texts) / t_hf:>12,.0f}"
                  f"{mb / t_ours:>11.2f}{mb / t_hf:>9.2f}{t_hf / t_ours:>7.2f}x")


if __name__ == "__main__":
    main()
