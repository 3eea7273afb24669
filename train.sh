#!/usr/bin/env bash
# train.sh: the whole comparison, end to end. Align one base model twice on the same data and step
# budget, with plain SFT (--mode sft) and with Patcher (--mode patcher); attack both the same way;
# evaluate both; print one comparison table.
#
#   ./train.sh                                   # built-in demo: toy world, CPU, no downloads, 3 seeds
#   PRESET=smollm2-cpu ./train.sh                # SmolLM2-135M-Instruct on ../shared/data/safety, CPU
#   PRESET=paper MODEL=Qwen2.5-7B-Instruct ALIGN_DATA=... ATTACK_DATA=... EVAL_DATA="..." ./train.sh
#
# Everything is chosen by environment variables (unset = the preset's value, else patcher.py's and
# eval.py's own defaults, which differ for the demo):
#   MODEL         base checkpoint directory; unset = the demo (patcher.py trains a tiny base per seed)
#   NPROC         processes for alignment (torchrun when > 1; FSDP2)            EVAL_NPROC  same for eval.py (default NPROC)
#   SEEDS         seeds to run, e.g. "0 1 2" (demo default; otherwise "0"); each seed is a full comparison
#   OUT           run directory (default runs/demo or runs/compare)
#   ALIGN_DATA    D_safe, harmful prompt -> refusal; several .jsonl files are concatenated (mix benign answers in!)
#   ATTACK_DATA   D_unsafe, harmful prompt -> harmful answer: Patcher's inner attack and the test-time attack
#   EVAL_DATA     harmful prompt sets (space-separated; NAME=PATH allowed)      BENIGN_DATA, GSM8K_DATA  usefulness sets
#   alignment:    WARMUP_STEPS ROUNDS INNER_STEPS (k1) DEFEND_STEPS (k2) ALIGN_LR INNER_LR ALIGN_BATCH ALPHA MAX_LEN
#   attack:       EVAL_AT (its largest entry is the attack length) ATTACK_LR ATTACK_BATCH ATTACK_KIND (full|lora)
#                 LORA_RANK ATTACK_BENIGN_DATA ATTACK_SAMPLES POISON_RATIO
#   generation:   MAX_NEW_TOKENS LIMIT GREEDY=1                  judge: JUDGE (keyword|llm; llm reads JUDGE_URL,
#                 JUDGE_MODEL, JUDGE_API_KEY from the environment)
#   PATCHER_ARGS, EVAL_ARGS   extra flags passed through verbatim
#
# Presets:
#   paper        the paper's settings on 8 GPUs: alignment with patcher.py's real defaults (warmup 100, 5 rounds
#                of k1 200 / k2 100, lr 1e-5, batch 4 per rank) on 8 ranks; attack: 1,000 samples at poison ratio
#                0.2 (ATTACK_BENIGN_DATA required), lr 1e-5, global batch 4 (4 ranks x 1: 8 ranks cannot split 4),
#                2,000 steps evaluated at 0,100,500,1000,2000; sampling T 0.6 / top-p 0.9 / rep. 1.2, 256 tokens;
#                LLM judge. Data as prompt/response JSONL (e.g. BeaverTails refusals / harmful answers).
#   smollm2-cpu  the small real run of the README on a 2-core CPU: SmolLM2-135M-Instruct; D_safe = align.jsonl + the
#                first 24 lines of benign.jsonl (3 times); attack.jsonl; eval.jsonl; the last 16 lines of benign.jsonl
#                held out for usefulness; 80 defender steps (20 warmup + 6 rounds of k1 10 / k2 10) at lr 5e-5; the
#                attack at lr 5e-5, batch 4, evaluated at 0,10,20,40 steps; 96 new tokens in bf16; base model included.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

case "${PRESET:-}" in
  "") ;;
  paper)
    : "${NPROC:=8}" "${EVAL_NPROC:=4}" "${ATTACK_BATCH:=1}" "${ATTACK_LR:=1e-5}" "${EVAL_AT:=0,100,500,1000,2000}"
    : "${ATTACK_SAMPLES:=1000}" "${POISON_RATIO:=0.2}" "${JUDGE:=llm}" "${MAX_NEW_TOKENS:=256}"
    [[ -n "${ATTACK_BENIGN_DATA:-}" ]] || { echo "PRESET=paper: set ATTACK_BENIGN_DATA (benign records for the 0.2 poison mix)" >&2; exit 2; } ;;
  smollm2-cpu)
    SAFETY=${SAFETY:-../shared/data/safety}
    : "${MODEL:=${PATCHER_ASSETS:-$HOME/.cache/patcher-assets}/smollm2-135m-instruct}" "${OUT:=runs/smollm2}"
    : "${ATTACK_DATA:=$SAFETY/attack.jsonl}" "${EVAL_DATA:=eval=$SAFETY/eval.jsonl}"
    : "${WARMUP_STEPS:=20}" "${ROUNDS:=6}" "${INNER_STEPS:=10}" "${DEFEND_STEPS:=10}" "${ALIGN_LR:=5e-5}" "${INNER_LR:=5e-5}"
    : "${ALIGN_BATCH:=4}" "${MAX_LEN:=128}" "${EVAL_AT:=0,10,20,40}" "${ATTACK_LR:=5e-5}" "${ATTACK_BATCH:=4}"
    : "${MAX_NEW_TOKENS:=96}" "${GEN_DTYPE:=bfloat16}" "${EVAL_BASE:=1}"
    mkdir -p "$OUT"
    if [[ -z "${ALIGN_DATA:-}" ]]; then  # hold benign prompts out of D_safe so over-refusal is measured on unseen ones
      head -n 24 "$SAFETY/benign.jsonl" > "$OUT/benign_align.jsonl"
      tail -n 16 "$SAFETY/benign.jsonl" > "$OUT/benign_heldout.jsonl"
      # 160 refusals + 3 x 24 benign answers: with the benign ones only once, a 40-step probe refused 81% of benign prompts
      ALIGN_DATA="$SAFETY/align.jsonl $OUT/benign_align.jsonl $OUT/benign_align.jsonl $OUT/benign_align.jsonl"
      : "${BENIGN_DATA:=benign=$OUT/benign_heldout.jsonl}"
    fi ;;
  *) echo "unknown PRESET '$PRESET' (paper, smollm2-cpu)" >&2; exit 2 ;;
esac

DEMO=$([[ -z "${MODEL:-}" ]] && echo 1 || echo 0)
NPROC=${NPROC:-1}
EVAL_NPROC=${EVAL_NPROC:-$NPROC}
SEEDS=${SEEDS:-$([[ $DEMO == 1 ]] && echo "0 1 2" || echo "0")}
OUT=${OUT:-$([[ $DEMO == 1 ]] && echo runs/demo || echo runs/compare)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$([[ $DEMO == 1 ]] && echo 1 || nproc)}

launch() {  # launch NPROC SCRIPT ARGS...: one process, or torchrun with FSDP2
  local n=$1; shift
  if [[ $n -gt 1 ]]; then python -m torch.distributed.run --standalone --nproc_per_node="$n" "$@"; else python "$@"; fi
}
opt() {  # opt FLAG VALUE: the flag only if the value is set
  [[ -n "${2:-}" ]] && printf '%s\n%s\n' "$1" "$2" || true
}

align_args=()
while IFS= read -r a; do align_args+=("$a"); done < <(
  opt --warmup-steps "${WARMUP_STEPS:-}"; opt --rounds "${ROUNDS:-}"; opt --attack-steps "${INNER_STEPS:-}"
  opt --defend-steps "${DEFEND_STEPS:-}"; opt --lr "${ALIGN_LR:-}"; opt --attack-lr "${INNER_LR:-}"
  opt --batch-size "${ALIGN_BATCH:-}"; opt --alpha "${ALPHA:-}"; opt --max-len "${MAX_LEN:-}")
eval_args=()
while IFS= read -r a; do eval_args+=("$a"); done < <(
  opt --eval-at "${EVAL_AT:-}"; opt --lr "${ATTACK_LR:-}"; opt --batch-size "${ATTACK_BATCH:-}"
  opt --attack "${ATTACK_KIND:-}"; opt --lora-rank "${LORA_RANK:-}"; opt --attack-benign-data "${ATTACK_BENIGN_DATA:-}"
  opt --attack-samples "${ATTACK_SAMPLES:-}"; opt --poison-ratio "${POISON_RATIO:-}"; opt --max-new-tokens "${MAX_NEW_TOKENS:-}"
  opt --limit "${LIMIT:-}"; opt --judge "${JUDGE:-}"; opt --max-len "${MAX_LEN:-}"; opt --dtype "${GEN_DTYPE:-}"
  [[ "${GREEDY:-0}" == 1 ]] && echo --greedy || true)

t0=$SECONDS
reports=()
for seed in $SEEDS; do
  run=$OUT/seed$seed
  mkdir -p "$run"
  data_args=()
  if [[ $DEMO == 0 ]]; then
    : "${ALIGN_DATA:?set ALIGN_DATA (or unset MODEL for the demo)}" "${ATTACK_DATA:?set ATTACK_DATA}" "${EVAL_DATA:?set EVAL_DATA}"
    read -r -a align_files <<< "$ALIGN_DATA"
    align=${align_files[0]}
    if [[ ${#align_files[@]} -gt 1 ]]; then align=$run/d_safe.jsonl; cat "${align_files[@]}" > "$align"; fi
    data_args=(--model "$MODEL" --align-data "$align" --attack-data "$ATTACK_DATA")
  fi
  # 1. align twice: the same base, data, seed and number of defender steps; only the mode differs
  for mode in sft patcher; do
    if [[ $DEMO == 1 && $mode == patcher && ! -e $run/patcher/base ]]; then
      mkdir -p "$run/patcher" && cp -r "$run/sft/base" "$run/patcher/base"  # one tiny base model per seed
    fi
    echo "== seed $seed: align with --mode $mode -> $run/$mode"
    launch "$NPROC" patcher.py "${data_args[@]}" --mode "$mode" --seed "$seed" --out "$run/$mode" \
      "${align_args[@]}" ${PATCHER_ARGS:-} > "$run.$mode.log" 2>&1 || { tail -n 30 "$run.$mode.log"; exit 1; }
    grep -E "^(demo|mode|exported)" "$run.$mode.log" || true
  done
  # 2. attack both identically and evaluate both
  models=(--model "sft=$run/sft/final" --model "patcher=$run/patcher/final")
  [[ $DEMO == 1 || "${EVAL_BASE:-0}" == 1 ]] && models+=(--model "base=${MODEL:-$run/sft/base}")
  sets=()
  if [[ $DEMO == 0 ]]; then
    sets=(--attack-data "$ATTACK_DATA")
    for f in $EVAL_DATA; do sets+=(--eval-data "$f"); done
    for f in ${BENIGN_DATA:-}; do sets+=(--benign-data "$f"); done
    for f in ${GSM8K_DATA:-}; do sets+=(--gsm8k "$f"); done
  fi
  echo "== seed $seed: attack and evaluate -> $run/eval"
  launch "$EVAL_NPROC" eval.py "${models[@]}" "${sets[@]}" --seed "$seed" --out "$run/eval" "${eval_args[@]}" ${EVAL_ARGS:-} \
    > "$run.eval.log" 2>&1 || { tail -n 30 "$run.eval.log"; exit 1; }
  sed -n '/^# Evaluation report/,$p' "$run.eval.log" | grep -v "^wrote" | sed -n '/## ASR/,$p'
  reports+=("$run/eval/report.json")
done
echo
echo "== comparison over seeds $SEEDS (mean ± std; k = attack steps; logs in $OUT/seed*.log) after $((SECONDS - t0))s"
python eval.py --summarize "${reports[@]}"
