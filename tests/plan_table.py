"""The README's memory table: the per-rank peak (GiB) of each paper model's memory plan, by mode and number of ranks,
at the paper presets' settings as train.sh resolves them (DRY_RUN=1: its own commands), on GPUs in bf16.

    python tests/plan_table.py [--max-len 1024] [--worlds 1,2,4,8]

The models are the shapes of tests/configs/*.json (no weights, no tokenizer), so every sequence is planned at
--max-len tokens (the presets' own MAX_LEN truncates nothing; the paper's data is far shorter), the attack's and the
evaluation prompts' too; with a real checkpoint and data, --plan reads the data's longest example instead.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import parallel  # noqa: E402
import patcher  # noqa: E402

evaluate = __import__("eval")
MODELS = {"Qwen2.5-1.5B": "qwen2.5-1.5b", "Qwen3-4B": "qwen3-4b", "Llama-3-8B": "llama-3-8b"}
PLACEHOLDER = "/MODEL"


def commands(preset, max_len, files):
    """{column: (program, argv)} of train.sh's alignments and evaluation under `preset` (DRY_RUN=1)."""
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME")}
    env.update(PRESET=preset, DRY_RUN="1", MODEL=PLACEHOLDER, NPROC="1", EVAL_NPROC="1", PRECISION="bf16",
               MAX_LEN=str(max_len), ATTACK_MAX_LEN=str(max_len), JUDGE="keyword", ATTACKS="none",
               SWEEP="mode=" + ",".join(patcher.DEFENSES) if preset == "paper" else "mode=patcher",
               **{v: files for v in ("SAFE_DATA", "UNSAFE_DATA", "ATTACK_DATA", "ATTACK_BENIGN_DATA", "EVAL_DATA")})
    out = subprocess.run(["bash", str(ROOT / "train.sh")], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    found = {}
    for line in out.stdout.splitlines():
        words = shlex.split(line)
        if words[:1] != ["python"]:
            continue
        words = words[words.index(next(w for w in words if w.endswith(".py"))):]
        program, argv = words[0].removesuffix(".py"), words[1:]
        mode = argv[argv.index("--mode") + 1] if "--mode" in argv else "eval"
        found["patcher parallel" if program == "parallel" else mode] = (program, argv)
    return found


def peaks(program, argv, model, worlds, out):
    """{world: GiB} of one command's plan with `model` (a directory holding a config.json only), for GPUs."""
    argv = [w.split("=")[0] + "=" + str(model) if program == "eval" and w.endswith("/final") else
            str(model) if w == PLACEHOLDER else w for w in argv]
    argv = argv[:argv.index("--out") + 1] + [str(out)] + argv[argv.index("--out") + 2:]
    if program == "eval":
        args = evaluate.parse_args([*argv, "--plan"])
        args.dtype = args.dtype or "bfloat16"
        phases_of = evaluate.memory_plan(args, evaluate.named(args.model, "--model"), "cuda")[0]
    else:
        module = parallel if program == "parallel" else patcher
        args = module.parse_args([*argv, "--plan"])
        cfg = patcher.model_config(args.model)
        lengths = patcher.stream_lengths(args, None, cfg.max_position_embeddings)
        shapes, plan = patcher.param_shapes(cfg), (parallel.memory_plan if program == "parallel" else patcher.training_plan)
        phases_of = lambda w: plan(args, cfg, shapes, lengths, w, "cuda")  # noqa: E731
    return {w: patcher.plan_peak(phases_of(w))[1] / patcher.GiB for w in worlds if program != "parallel" or w % 2 == 0}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-len", type=int, default=1024, help="tokens of every sequence (no tokenizer: no data lengths)")
    p.add_argument("--worlds", default="1,2,4,8", help="numbers of ranks (parallel.py: even ones only)")
    a = p.parse_args()
    worlds = [int(w) for w in a.worlds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # enough records for the presets' attack set (1,000) and prompt sets (250): their counts, not their text, count
        (tmp / "d.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "response": "r"}) + "\n" for i in range(1000)))
        cmds = {**commands("paper", a.max_len, str(tmp / "d.jsonl")),
                **commands("paper-parallel", a.max_len, str(tmp / "d.jsonl"))}
        columns = [*patcher.DEFENSES, "eval"]
        columns.insert(columns.index("patcher") + 1, "patcher parallel")
        print("| model | ranks | " + " | ".join(columns) + " |")
        print("|---|---:|" + "---:|" * len(columns))
        for name, config in MODELS.items():
            model = tmp / config
            model.mkdir()
            (model / "config.json").write_text((ROOT / "tests" / "configs" / f"{config}.json").read_text())
            table = {c: peaks(*cmds[c], model, worlds, tmp / "out") for c in columns}
            for w in worlds:
                cells = [f"{table[c][w]:.1f}" if w in table[c] else "-" for c in columns]
                print(f"| {name} | {w} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
