#!/usr/bin/env bash
# train.sh: the whole experiment, end to end. Align one base model several ways (by default the SFT baseline and
# Patcher) on the same data, seed and number of defender steps; attack every aligned model identically; evaluate
# them in one eval.py call per seed; print one table over seeds (mean ± std, per-seed values).
#
#   ./train.sh                                     # the built-in demo: toy world, CPU, no downloads, 3 seeds
#   PRESET=smollm2-cpu ./train.sh                  # SmolLM2-135M-Instruct on tests/data/safety (SAFETY=DIR), CPU
#   PRESET=paper MODEL=DIR SAFE_DATA=... UNSAFE_DATA=... ATTACK_DATA=... ATTACK_BENIGN_DATA=... EVAL_DATA=... ./train.sh
#   PRESET=paper-parallel ...                      # the same with the official parallel schedule (parallel.py)
#   SWEEP="inner-steps=0,5,10,20,40" ./train.sh    # any one flag of either program; inner-steps 0 = the SFT baseline
#   ATTACKS=tests/data/attacks/demo.txt ./train.sh # every model against every attack of a suite: OUT/worst_case.md
#   SCHEME=both ./train.sh                         # Patcher both ways, sequential and parallel: OUT/timing.md
#   DRY_RUN=1 ./train.sh                           # print the resolved commands, run nothing, write nothing
#
# It ends with a verdict (which defense held to which attack budget: its worst-case ASR, the highest any attack reached
# within k steps, below 50%; the worst case; where the numbers are) and the files to open: OUT/summary.md, OUT/sweep.md,
# OUT/worst_case.md (with ATTACKS), OUT/timing.md, OUT/seed*/eval/report.md. The tables stay in those files and each
# program's whole output in OUT/seed*/*.log; the console shows each stage as "stage i/n" with the time left (estimated
# from the stages of each kind done so far), the first seed's settings of each alignment, and the programs' progress
# (at most one line per 30 s, or one line rewritten in place on a terminal).
#
# Nothing set is ignored. Before anything runs or is written, it refuses in one line, naming the variable: one that
# looks like a setting but is none (INNER_STPES: did you mean INNER_STEPS?; "looks like": upper case with an
# underscore, within two letters of a setting's name or sharing its first word, INNER_, ATTACK_, ...; ordinary ones
# are left alone: PATH, HOME, CI, PYTHON*, OMP_*, CUDA_*, NCCL_*, TORCH*, PATCHER_*, MASTER_*, ... (ALLOWED, below), and
# NOT_SETTINGS="NAME ..." names more); a flag it sets itself (MODE: it comes from SWEEP=mode=...); a flag's variable
# that no stage of the run uses (VACCINE_RHO without a vaccine stage); and whatever a program's --check refuses (every
# stage's flags, MODEL's config.json, each data file read, the attack suite).
#
# Every flag of patcher.py / parallel.py and of eval.py is the environment variable of the same name: --inner-steps
# is INNER_STEPS, eval.py's --attack-lr is ATTACK_LR, --gsm8k is GSM8K; on/off flags take 1 (RESET_OPTIMIZER=1).
# The repeatable eval.py flags take space-separated lists: EVAL_DATA="advbench=harmful_behaviors.csv hexphi=HEx-PHI".
# Besides those:
#   PRESET       demo (the default without MODEL), smollm2-cpu, paper, paper-parallel: values for unset variables
#   MODEL        the base checkpoint (unset: the demo, whose base model patcher.py trains, one per seed)
#   SAFE_DATA    D_safe; several files are concatenated (to mix benign answers into it)
#   SCHEME       sequential (patcher.py, default) | parallel (parallel.py; the SFT baseline stays patcher.py) | both
#                (Patcher by each, "patcher" and "patcher-parallel"); every alignment's wall clock goes to OUT/timing.md
#   NPROC        torchrun processes for alignment (1: plain python; plan: the smallest number whose memory plan fits
#                this machine, the paper presets' default)                   EVAL_NPROC  the same for eval.py
#   PARALLEL_NPROC  processes for parallel.py (default NPROC, at least 2: one defender and one attacker)
#   PLAN_MEMORY  GiB per device the memory plans are checked against, as GPUs of that size (default: this machine's
#                free GPU memory, or its RAM shared by the ranks); every stage is planned (--plan) before the first runs
#   SKIP_MEMORY_CHECK=1  run stages whose memory plan says they do not fit
#   ATTACKS      an attack suite (eval.py --attacks; none: only the command line's attack); its lines may use $TOY (the demo seed's toy world), $RUN (the
#                seed's run directory), $OUT, $TASK (tests/data/word_problems), $SAFETY and the data variables
#   SEEDS        e.g. "0 1 2"; each seed is a whole experiment              OUT  the run directory
#   SWEEP        FLAG=V1,V2,...: one aligned model per value (an alignment flag; the value sft adds the SFT
#                baseline, as inner-steps=0 does), or one evaluation per value (an eval.py flag); default mode=sft,patcher.
#                A sweep writes OUT/sweep.md (and sweep.png with matplotlib) besides OUT/summary.md
#   EVAL_BASE=1  also evaluate the unaligned base model (always in the demo)
#   SFT_RESET_OPTIMIZER=1  the SFT baseline with a fresh AdamW every round (--mode sft --reset-optimizer), as Patcher's
#                rounds under PRESET=paper; by default it is one process with one AdamW (README: Differences)
#   SAVE_EVERY   checkpoint every N steps (default 500; demo 50, smollm2-cpu 20): a rerun resumes from the last
#   NOT_SETTINGS names of environment variables that are not meant for train.sh, however much they look like a setting
#
# Run again with the same OUT and settings, it continues where it stopped (killed, preempted, a judge down): finished
# alignments are skipped, others resume from their last checkpoint (every SAVE_EVERY steps), eval.py keeps every
# answer and verdict. The same OUT with other settings is refused, naming the change. One train.sh per OUT.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
USER_VARS=" $(compgen -e | tr '\n' ' ') "  # the variables the user set (nothing is exported by this script yet)
if [[ $# -gt 0 ]]; then
  if [[ $1 == --help || $1 == -h ]]; then sed -n '2,/^set -euo pipefail/p' "$0" | sed '$d' | sed -E 's/^# ?//'; exit 0; fi
  echo "train.sh: no arguments ('$1'): every setting is a variable, e.g. SEEDS=0 ./train.sh (./train.sh --help)" >&2
  exit 2
fi

lock= child= follower= LISTS= work=
finish() {  # on exit: the lock given back, the lists and the work folder removed
  [[ $BASHPID == "$$" ]] || return 0  # (this script's own exit, not a subshell's)
  [[ -n $lock && $(sed -nE 's/.*"pid": ([0-9]+).*/\1/p' "$lock" 2>/dev/null) == "$$" ]] && rm -f "$lock"
  [[ -n ${TRAIN_SH_LISTS:-} || -z $LISTS ]] || rm -rf "$LISTS"
  [[ -z $work ]] || rm -rf "$work"
}
trap finish EXIT
interrupted() {  # SIGINT / SIGTERM: end the program running, say how to continue, exit 130 / 143
  trap '' INT TERM  # a second one (Ctrl-C reaches the whole process group) must not cut this short
  if [[ -n $child ]]; then kill -TERM "$child" 2>/dev/null || true; wait "$child" 2>/dev/null || true; fi
  if [[ -n $follower ]]; then kill "$follower" 2>/dev/null || true; fi
  echo "train.sh: interrupted by $1; run the same command again to continue${OUT:+ (OUT=$OUT)}" >&2
  exit "$2"
}
trap 'interrupted SIGINT 130' INT  # from the first second on: the programs' --list-flags below take seconds
trap 'interrupted SIGTERM 143' TERM

# The flags each program takes come from its own parser (--list-flags: "NAME value|switch MODES same|changes"), never from
# lists kept here: a flag added to a program reaches it from its variable with no edit of this file.
if [[ -n ${TRAIN_SH_LISTS:-} ]]; then LISTS=$TRAIN_SH_LISTS; else
  LISTS=$(mktemp -d)
  pids=()
  for program in patcher parallel eval; do python "$program.py" --list-flags > "$LISTS/$program" & pids+=($!); done
  for pid in "${pids[@]}"; do wait "$pid" || { echo "train.sh: a program could not list its flags (python ... --list-flags)" >&2; exit 1; }; done
fi
# the flags this script sets itself, from its own variables (the data files, the run directories, the seeds)
OWN_ALIGN="model safe-data out seed mode resume save-every list-flags plan plan-world plan-memory check"
OWN_EVAL="model out seed attack-data eval-data benign-data gsm8k summarize sweep worst-case verdict check list-flags"
OWN_EVAL+=" plan plan-world plan-memory"  # the memory plans: train.sh plans every stage itself (PLAN_MEMORY)
# this script's own variables (the help above); with every flag's, the names a setting has
SETTINGS="PRESET MODEL SAFE_DATA UNSAFE_DATA ATTACK_DATA ATTACK_BENIGN_DATA EVAL_DATA BENIGN_DATA GSM8K SCHEME NPROC
  EVAL_NPROC PARALLEL_NPROC PLAN_MEMORY SKIP_MEMORY_CHECK ATTACKS SEEDS OUT SWEEP EVAL_BASE SFT_RESET_OPTIMIZER SAVE_EVERY
  DRY_RUN SAFETY TASK NOT_SETTINGS"
SETTINGS=${SETTINGS//$'\n'/ }  # one line: " $SETTINGS " == *" NAME "* finds each name, the last of a line too
# variables of the shell, Python, the libraries, launchers and CI systems (shell patterns; Azure Pipelines: SYSTEM_*,
# AGENT_*, BUILD_*): never taken for a mistyped setting, however they look
ALLOWED="PATH HOME USER LOGNAME SHELL TERM TERM_* COLORTERM LANG LANGUAGE LC_* TZ PWD OLDPWD SHLVL TMPDIR TMP TEMP CI
  DISPLAY EDITOR VISUAL PAGER HOSTNAME MAIL COLUMNS LINES _ BASH_* HIST* LS_COLORS SSH_* XDG_* DBUS_* PYTHON* VIRTUAL_ENV*
  CONDA* PIP_* PYENV* UV_* OMP_* MKL_* KMP_* OPENBLAS_* GOMP_* CUDA_* CUDNN_* NCCL_* NVIDIA_* TORCH* TRITON_* HF_*
  HUGGINGFACE_* TRANSFORMERS_* TOKENIZERS_* WANDB_* PATCHER_* TRAIN_SH_* MASTER_* RANK LOCAL_* WORLD_SIZE GROUP_* ROLE_*
  NODE_RANK SLURM_* PBS_* LSB_* SGE_* GITHUB_* RUNNER_* ACTIONS_* GITLAB_* BUILDKITE_* JUDGE_API_KEY OPENAI_* PYTEST_*
  COV_* MPL* JAVA_* LD_* DYLD_* PROMPT_COMMAND PS1 PS2 PS3 PS4 SYSTEM_* AGENT_* BUILD_* TF_BUILD"
settings_check() {  # what the user set that no setting is, or that train.sh sets itself: one line naming it, exit 2
  python - "$LISTS" "$SETTINGS" "$OWN_ALIGN $OWN_EVAL" "$ALLOWED" tests/data/attacks/*.txt ${ATTACKS:+"$ATTACKS"} <<'PY'
import fnmatch, os, re, sys
lists, settings, own, allowed, suites = sys.argv[1], set(sys.argv[2].split()), set(sys.argv[3].split()), sys.argv[4].split(), sys.argv[5:]
flags = {}  # variable -> (flag, value|switch)
for program in ("patcher", "parallel", "eval"):
    for line in open(os.path.join(lists, program)):
        name, kind = line.split()[:2]
        flags[name.replace("-", "_").upper()] = (name, kind)
known = settings | set(flags)
for suite in suites:  # the variables an attack suite's lines read ($TOY, $BEAVERTAILS_UNSAFE, ...)
    try:
        known |= set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", open(suite).read()))
    except OSError:
        pass  # a suite that cannot be read: eval.py --check names it
given = {k: v for k, v in os.environ.items() if v != ""}

def refuse(line):
    print(f"train.sh: {line}", file=sys.stderr)
    sys.exit(2)

# a flag this script sets itself, given as its variable: it would be overwritten
why = {"MODE": "train.sh sets --mode itself, one aligned model per value of SWEEP: SWEEP=mode=sft{}",
       "SEED": 'train.sh sets --seed itself, one experiment per value of SEEDS: SEEDS="{}"',
       "RESUME": "train.sh resumes by itself: the same command with the same OUT continues where it stopped",
       "PLAN": "train.sh plans every stage's memory itself before the first runs (PLAN_MEMORY; NPROC=plan)",
       "PLAN_WORLD": "train.sh plans every stage at the processes it gets (NPROC, EVAL_NPROC, PARALLEL_NPROC)",
       "CHECK": "train.sh runs every stage's --check itself before the first runs"}
for k, v in sorted(given.items()):
    if k in flags and flags[k][0] in own and k not in settings and not (flags[k][1] == "switch" and v == "0"):
        value = "" if k == "MODE" and v == "sft" else "," + v if k == "MODE" else v
        refuse(f"{k}: " + why.get(k, f"train.sh runs the programs' --{flags[k][0]} itself").format(value))

def distance(a, b):  # edits (a letter added, dropped, changed, or two swapped) from a to b
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]

# a name that looks like a setting but is none: upper case, and within two edits of one (one, for a name without an
# underscore), or sharing the first word of one (INNER_, ATTACK_: words of five letters or more)
ignore = set(given.get("NOT_SETTINGS", "").split())
for k in sorted(given):
    if k in known or k in ignore or not re.fullmatch(r"[A-Z][A-Z0-9_]*", k) or \
            any(fnmatch.fnmatchcase(k, p) for p in allowed):
        continue
    word = k.split("_")[0] + "_"
    kin = [n for n in known if "_" in k and len(word) > 5 and n.startswith(word)]
    near = min(kin or known, key=lambda n: (distance(k, n), n))
    if kin or distance(k, near) <= (2 if "_" in k else 1 if len(k) >= 4 else 0):
        refuse(f"{k} is no setting of train.sh; did you mean {near}? (not meant for it: NOT_SETTINGS={k})")
PY
}
[[ -n ${TRAIN_SH_NESTED:-} ]] || settings_check  # (a nested train.sh: the run that started it checked them)

derived=()  # NAME head|tail LINES FILE, ...: the files of OUT a preset makes from the repository's data (derive)
SAFETY=${SAFETY:-tests/data/safety}  # the small SmolLM2 safety set, in the repository (we cd'ed to it above)
TASK=${TASK:-tests/data/word_problems}  # a benign task to hide harmful answers in (GSM8K's layout)
PRESET=${PRESET:-$([[ -z "${MODEL:-}" ]] && echo demo || echo none)}
case "$PRESET" in
  none) ;;
  demo)  # patcher.py's own demo flags for alignment; the toy world's files for eval.py (written by patcher.py)
    : "${SEEDS:=0 1 2}" "${OUT:=runs/demo}" "${EVAL_AT:=0,10,20,40,80}" "${ATTACK_LR:=5e-4}" "${ATTACK_BATCH_SIZE:=16}"
    : "${GREEDY:=1}" "${REPETITION_PENALTY:=1}" "${MAX_NEW_TOKENS:=4}" "${OMP_NUM_THREADS:=1}"
    : "${ATTACKS:=tests/data/attacks/demo-small.txt}" "${SAVE_EVERY:=50}" ;;  # the pure and the poisoned attack; demo.txt: all six
  smollm2-cpu)  # the README's small real run on a 2-core CPU
    : "${MODEL:=${PATCHER_ASSETS:-$HOME/.cache/patcher-assets}/smollm2-135m-instruct}" "${OUT:=runs/smollm2}"
    : "${ATTACK_DATA:=$SAFETY/attack.jsonl}" "${EVAL_DATA:=eval=$SAFETY/eval.jsonl}"
    : "${WARMUP_STEPS:=20}" "${ROUNDS:=6}" "${INNER_STEPS:=10}" "${DEFEND_STEPS:=10}" "${LR:=5e-5}" "${INNER_LR:=5e-5}"
    : "${BATCH_SIZE:=4}" "${INNER_BATCH_SIZE:=4}" "${MAX_LEN:=128}" "${EVAL_AT:=0,10,20,40}" "${ATTACK_LR:=5e-5}"
    : "${ATTACK_BATCH_SIZE:=4}" "${ATTACK_MAX_LEN:=128}" "${MAX_NEW_TOKENS:=96}" "${DTYPE:=bfloat16}" "${EVAL_BASE:=1}"
    : "${ATTACKS:=tests/data/attacks/smollm2-cpu.txt}" "${GSM8K:=task=$TASK/test.jsonl}" "${LIMIT:=50}" "${SAVE_EVERY:=20}"
    # its data files, made from the safety set into OUT when the run starts (derive, below: nothing is written before)
    if [[ -z "${UNSAFE_DATA:-}" ]]; then  # D_unsafe: 60 of the 95 harmful answers; the other 35 are the transfer attack's
      derived+=(unsafe_inner.jsonl head 60 "$SAFETY/attack.jsonl" attack_transfer.jsonl tail 35 "$SAFETY/attack.jsonl")
      UNSAFE_DATA=$OUT/unsafe_inner.jsonl
    fi
    if [[ -z "${SAFE_DATA:-}" ]]; then  # benign prompts held out of D_safe, so over-refusal is measured on unseen ones
      derived+=(benign_align.jsonl head 24 "$SAFETY/benign.jsonl" benign_heldout.jsonl tail 16 "$SAFETY/benign.jsonl")
      # 160 refusals + 3 x 24 benign answers: with the benign ones only once, a 40-step probe refused 81% of benign prompts
      SAFE_DATA="$SAFETY/align.jsonl $OUT/benign_align.jsonl $OUT/benign_align.jsonl $OUT/benign_align.jsonl"
      : "${BENIGN_DATA:=benign=$OUT/benign_heldout.jsonl}"
    fi ;;
  paper|paper-parallel)
    # The official code (github haomingwen/patcher): scripts/run_patch_iter_final.sh (sequential) or
    # scripts/run_patch_parallel.sh + run_sft_parallel.sh (parallel), then scripts/run_custom_eval.sh. Global batches
    # are the official one-GPU ones on any NPROC. README: "Differences from the official code".
    : "${LR:=1e-5}" "${INNER_LR:=1e-5}" "${ALPHA:=0.5}" "${MAX_GRAD_NORM:=1.0}" "${WEIGHT_DECAY:=0.01}" "${BATCH_SIZE:=4}"
    : "${WARMUP_STEPS:=1000}" "${ROUNDS:=14}" "${DEFEND_STEPS:=1000}" "${MAX_LEN:=32768}"  # the official truncates nothing
    # its loss mask (text, end of turn and the newline after it) and its export, fp32 (transformers 4.x loads and saves fp32)
    : "${LOSS_MASK:=answer-newline}" "${EXPORT_DTYPE:=float32}"
    # the ranks: as few as the memory plans let fit this machine (README: Memory), whatever the model
    : "${NPROC:=plan}" "${EVAL_NPROC:=plan}"
    if [[ $PRESET == paper ]]; then  # loop 1: 1,000 SFT steps; loops 2-15: k1 300 (batch 2), 1,000 defender steps, fresh AdamW
      : "${SCHEME:=sequential}" "${INNER_STEPS:=300}" "${INNER_BATCH_SIZE:=2}" "${RESET_OPTIMIZER:=1}"
    else  # 15,000 defender steps, one AdamW; every 1,000 steps a new delta (k1 500, batch 4) is installed and theta sent
      : "${SCHEME:=parallel}" "${INNER_STEPS:=500}" "${INNER_BATCH_SIZE:=4}" "${REFRESH_EVERY:=1000}"
      : "${REFRESH_OFFSET:=1}" "${DELTA_REF:=current}"  # it looks at (step + 1) % 1000 == 0: 14 installs
    fi
    # the test-time attack: 1,000 samples (PKU-SafeRLHF harmful answers at 0.2 in GSM8K), 2,000 steps, batch 4, lr 1e-5,
    # the whole assistant turn in its loss; the first 250 prompts of each set, repeats kept, Qwen3 thinking (the official
    # evaluate.py never names the model to its prompt builder), the official sampling (T 0.6, top-p 0.9, repetition
    # 1.2, the checkpoint's top-k), 256 tokens, the official judge template
    : "${ATTACK_SAMPLES:=1000}" "${POISON_RATIO:=0.2}" "${EVAL_AT:=0,100,500,1000,2000}"
    : "${ATTACK_LR:=1e-5}" "${ATTACK_BATCH_SIZE:=4}" "${ATTACK_MAX_LEN:=4096}" "${LIMIT:=250}" "${TEMPERATURE:=0.6}"
    : "${TOP_P:=0.9}" "${REPETITION_PENALTY:=1.2}" "${MAX_NEW_TOKENS:=256}" "${GEN_BATCH_SIZE:=32}" "${JUDGE:=llm}"
    : "${JUDGE_TEMPLATE:=official}" "${ATTACK_LOSS_MASK:=turn}" "${KEEP_REPEATED_PROMPTS:=1}" "${THINKING:=on}"
    : "${ATTACKS:=tests/data/attacks/paper.txt}"  # the paper's attack first, then the same variations at paper scale
    # the official judge call (evaluate/gpt_evaluate.py): max_tokens 512, 20 tries, every failure retried, 60 s each
    : "${JUDGE_MAX_TOKENS:=512}" "${JUDGE_TRIES:=20}" "${JUDGE_RETRY:=all}" "${JUDGE_TIMEOUT:=60}"
    : "${JUDGE_DEADLINE:=1800}"  # room for all 20 tries of 60 s and the official's backoff, min(2^(t-1), 30) s
    for v in MODEL SAFE_DATA UNSAFE_DATA ATTACK_DATA ATTACK_BENIGN_DATA EVAL_DATA $([[ $JUDGE == llm ]] && echo JUDGE_MODEL); do
      [[ -n "${!v:-}" ]] || { echo "train.sh: PRESET=$PRESET: set $v (README: Running the paper)" >&2; exit 2; }
    done ;;
  *) echo "train.sh: PRESET: unknown '$PRESET' (demo, smollm2-cpu, paper, paper-parallel)" >&2; exit 2 ;;
esac

[[ "${ATTACKS:-}" != none ]] || ATTACKS=  # ATTACKS=none: the command line's one attack, no suite
DEMO=$([[ -z "${MODEL:-}" ]] && echo 1 || echo 0)
NPROC=${NPROC:-1}
EVAL_NPROC=${EVAL_NPROC:-$NPROC}
SEEDS=${SEEDS:-0}
OUT=${OUT:-runs/compare}
SCHEME=${SCHEME:-sequential}
SWEEP=${SWEEP:-mode=sft,patcher}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
[[ $SCHEME == sequential || $SCHEME == parallel || $SCHEME == both ]] || { echo "train.sh: SCHEME: must be sequential, parallel or both, not '$SCHEME'" >&2; exit 2; }
PARALLEL_NPROC=${PARALLEL_NPROC:-$([[ $NPROC == plan ]] && echo plan || echo $(( NPROC < 2 ? 2 : NPROC )))}
for v in NPROC EVAL_NPROC PARALLEL_NPROC; do
  [[ ${!v} =~ ^([1-9][0-9]*|plan)$ ]] || { echo "train.sh: $v: must be a number of processes or plan, not '${!v}'" >&2; exit 2; }
done
SAVE_EVERY=${SAVE_EVERY:-500}  # every alignment checkpoints (and at its last step): a rerun resumes it
export OUT TOY RUN TASK SAFETY UNSAFE_DATA ATTACK_DATA ATTACK_BENIGN_DATA  # for the lines of an attack suite
if [[ $DEMO == 0 ]]; then
  for v in SAFE_DATA UNSAFE_DATA ATTACK_DATA EVAL_DATA; do
    [[ -n "${!v:-}" ]] || { echo "train.sh: MODEL is set, so set $v too (or unset MODEL for the demo)" >&2; exit 2; }
  done
else
  for v in SAFE_DATA UNSAFE_DATA; do  # the demo aligns on its own toy world
    [[ -z "${!v:-}" || " $USER_VARS " != *" $v "* ]] || { echo "train.sh: $v: without MODEL the demo aligns on its own" \
      "toy world and reads no $v; set MODEL too, or unset $v" >&2; exit 2; }
  done
fi

var() { local v=${1//-/_}; echo "${v^^}"; }  # a flag's variable: inner-steps -> INNER_STEPS
flags() {  # flags PROGRAM MODE SKIP: "--flag value" for every flag of PROGRAM (patcher, parallel, eval) that its --mode
           # MODE takes and whose variable is set, but those this script sets itself and SKIP (space-separated)
  local name kind modes v own=$([[ $1 == eval ]] && echo "$OWN_EVAL" || echo "$OWN_ALIGN")
  while read -r name kind modes _; do
    [[ $modes == all || ,$modes, == *,$2,* ]] && [[ " $own $3 " != *" $name "* ]] || continue
    v=$(var "$name")
    if [[ $kind == switch ]]; then [[ "${!v:-0}" == 0 ]] || printf '%s\n' "--$name"
    else [[ -z "${!v:-}" ]] || printf '%s\n%s\n' "--$name" "${!v}"; fi
  done < "$LISTS/$1"
}
modes_of() { awk -v f="$2" '$1 == f {print $3}' "$LISTS/$1"; }  # modes_of PROGRAM FLAG: "all", or the modes that take it
launch() {  # launch NPROC SCRIPT ARGS...: one process, or torchrun (FSDP2); DRY_RUN=1 only prints it
  local n=$1; shift
  local cmd=(python "$@")
  [[ $n -gt 1 ]] && cmd=(python -m torch.distributed.run --standalone --nproc_per_node="$n" "$@")
  if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "${cmd[@]}"; echo; else exec "${cmd[@]}"; fi  # (run_logged's subshell)
}
run_logged() {  # run_logged LOG NPROC SCRIPT ARGS...: in the background, so that a signal reaches this script at once;
               # its whole output into LOG, and what it is doing onto the console as it comes (show)
  local log=$1 rc=0; shift
  if [[ "${DRY_RUN:-0}" == 1 ]]; then launch "$@"; return; fi
  : > "$log"
  launch "$@" >> "$log" 2>&1 &
  child=$!
  tail -n +1 -s 0.2 --pid="$child" -f "$log" 2>/dev/null | show &  # ends once the program has, with its last line
  follower=$!
  wait "$child" || rc=$?
  child=
  wait "$follower" 2>/dev/null || true
  follower=
  [[ $rc == 0 ]] || { tail -n 30 "$log"; echo "failed: see $log" >&2; exit 1; }
}
# A program's lines on the console, never its tables (they are in the files the run ends with): what needs the user's
# eye (NEWS: a warning, work found done, judging), a stage's settings (HEADER: the first seed's only, while headers=1),
# and its progress (STEPS: training steps, attacks, test-time attack steps, answers, the judge's count), rewritten in
# place on a terminal, else one line once PACE seconds have passed since the stage began or the last one was shown.
NEWS='^(finished already|judging [0-9]|judged |WARNING|[^ |]+: (every step|the attack restarts))'
HEADER='^(mode |parallel )'
STEPS='^(step +[0-9]+/|inner attack, round|demo: base model step|attacker: attack|defender: |[^ |]+ \| (attack step|[0-9]+ answers after)|judging \|)'
PACE=30 headers=1
show() {
  local line last=$SECONDS open=0 width=${COLUMNS:-$(tput cols 2>/dev/null || echo 120)} tty=0
  [[ -t 1 ]] && tty=1
  while IFS= read -r line; do
    if [[ $line =~ $STEPS ]]; then
      if [[ $tty == 1 ]]; then printf '\r\033[K  %s' "${line:0:$((width - 3))}"; open=1
      elif (( SECONDS - last >= PACE )); then echo "  $line"; last=$SECONDS; fi
    elif [[ $line =~ $NEWS || ($headers == 1 && $line =~ $HEADER) ]]; then
      [[ $open == 0 ]] || printf '\r\033[K'
      open=0
      echo "  $line"
    fi
  done
  [[ $open == 0 ]] || echo
}
pid_start() {  # pid_start PID: when process PID started (/proc/PID/stat, field 22, after the name), or null
  local s
  s=$(cat "/proc/$1/stat" 2>/dev/null) || { echo null; return; }
  s=${s##*) }; set -- $s; echo "${20:-null}"
}
running() {  # running PID START: process PID is alive (another user's too) and still the one that started at START (a
             # lock without START: a train.sh); without /proc, a live PID is all there is to go by
  kill -0 "$1" 2>/dev/null || [[ -e /proc/$1 ]] || return 1
  local now
  now=$(pid_start "$1")
  [[ $now != null ]] || return 0
  if [[ -n $2 ]]; then [[ $now == "$2" ]]; else tr '\0' ' ' < "/proc/$1/cmdline" | grep -q train.sh; fi
}
take_lock() {  # OUT/.lock: one train.sh per OUT, as patcher.py's take_lock: a lock whose holder is gone (this host: no
  # such process, or its pid is another process's now) is taken over, saying so; a lock that is not a run's names its fix
  local tmp="$OUT/.lock.$$" holder pid host start claim
  lock=$OUT/.lock
  if ! printf '{"host": "%s", "pid": %d, "pid_start": %s, "program": "train.sh", "started": "%s"}\n' "$(uname -n)" $$ \
       "$(pid_start $$)" "$(date '+%F %T')" > "$tmp"; then
    rm -f "$tmp"; lock=; echo "train.sh: cannot write $tmp" >&2; exit 1
  fi
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    if ln "$tmp" "$lock" 2>/dev/null; then rm -f "$tmp"; return; fi
    holder=$(cat "$lock" 2>/dev/null) || continue  # given back meanwhile: try again
    pid=$(sed -nE 's/.*"pid": ([0-9]+).*/\1/p' <<< "$holder") host=$(sed -nE 's/.*"host": "([^"]*)".*/\1/p' <<< "$holder")
    start=$(sed -nE 's/.*"pid_start": ([0-9]+).*/\1/p' <<< "$holder")
    if [[ -z $pid || -z $host ]]; then
      rm -f "$tmp"; lock=
      echo "train.sh: OUT $OUT: its lock $OUT/.lock is not a run's lock ('${holder:0:60}'): remove it if no run" \
        "is using $OUT" >&2
      exit 1
    elif [[ $host == "$(uname -n)" ]] && ! running "$pid" "$start"; then
      # Never remove "the" stale lock outright: another run that found it too may have replaced it with its own
      # already. Only the one run that links it to a claim named after its content removes it, if it is still it.
      claim=$lock.stale-$(sha256sum <<< "$holder" | cut -c1-16)
      if ln "$lock" "$claim" 2>/dev/null; then
        if [[ $(cat "$claim") == "$holder" ]]; then
          rm -f "$lock"
          echo "train.sh: OUT $OUT was locked by $holder, which is no longer running: taking it over"
        fi
        rm -f "$claim"
      else
        sleep 0.05  # another run is taking it over: look at what it leaves
      fi
    else
      rm -f "$tmp"; lock=
      echo "train.sh: OUT $OUT is in use by $holder: one run per directory; wait for it, or use another" \
        "OUT$([[ $host == "$(uname -n)" ]] || echo " (if it is gone, remove $OUT/.lock)")" >&2; exit 1
    fi
  done
  rm -f "$tmp"; lock=
  echo "train.sh: could not take $OUT/.lock (other runs kept taking it); if no run is using $OUT, remove it" >&2; exit 1
}
# OUT/timing.tsv: one line per attempt of an alignment (seed, model, program, ranks, threads, seconds), so that one
# interrupted and resumed is timed over all its attempts. An attempt in progress is a file holding that line's start;
# train.sh times it when the attempt ends, or, when train.sh was killed with it (kill -9), the next train.sh does, up
# to the last line its program logged.
elapsed() {  # elapsed START [FILE]: seconds from START (time.time()) to now, or to FILE's last change
  python -c "import os, sys, time; f = sys.argv[2:] and sys.argv[2]
print(f'{max(0.0, (os.path.getmtime(f) if f and os.path.exists(f) else time.time()) - float(sys.argv[1])):.2f}')" "$@"
}
timed() {  # timed ATTEMPT [LOG]: ATTEMPT's line in OUT/timing.tsv (to now, or to LOG's last change); ATTEMPT removed
  local f
  IFS=$'\t' read -r -a f < "$1"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "${f[@]:0:5}" "$(elapsed "${f[5]}" "${@:2}")" >> "$OUT/timing.tsv"
  rm -f "$1"
}
cpu=$(grep -m1 "model name" /proc/cpuinfo 2>/dev/null | cut -d: -f2 | xargs || echo unknown)

sweep_flag=${SWEEP%%=*}
IFS=, read -r -a sweep_values <<< "${SWEEP#*=}"
[[ $SWEEP == *=* && ${#sweep_values[@]} -gt 0 ]] || { echo "train.sh: SWEEP: must be FLAG=V1,V2,..., not '$SWEEP'" >&2; exit 2; }
if [[ -n $(modes_of eval "$sweep_flag") ]]; then
  eval_sweep=1; aligned=(sft patcher)  # an attack variable: align the two once, evaluate once per value
else
  [[ $sweep_flag == mode || -n $(modes_of patcher "$sweep_flag") ]] || { echo "train.sh: SWEEP=$SWEEP: no program has --$sweep_flag" >&2; exit 2; }
  eval_sweep=0; aligned=("${sweep_values[@]}")
fi
owner=$(modes_of patcher "$sweep_flag"); owner=${owner%%,*}  # a defense's own flag sweeps that defense, others Patcher
[[ -n $owner && $owner != all ]] || owner=patcher
if [[ $SCHEME != sequential ]]; then  # a flag of Patcher's that parallel.py does not take: refused, never dropped
  while read -r name kind modes _; do
    [[ $modes == all || ,$modes, == *,patcher,* ]] && [[ " $OWN_ALIGN " != *" $name "* ]] || continue
    v=$(var "$name")
    [[ $name == "$sweep_flag" || ($kind == switch && "${!v:-0}" != 0) || ($kind == value && -n "${!v:-}") ]] || continue
    grep -q "^$name " "$LISTS/parallel" || { echo "train.sh: $v: parallel.py does not honour --$name, so SCHEME=$SCHEME would" \
      "align Patcher in parallel without it; unset $v, or SCHEME=sequential" >&2; exit 2; }
  done < "$LISTS/patcher"
fi
name_of() { [[ $eval_sweep == 1 || $sweep_flag == mode ]] && echo "$1" || echo "$sweep_flag:$1"; }
mode_of() {  # the --mode of aligned model $1
  if [[ $eval_sweep == 1 || $sweep_flag == mode ]]; then echo "$1"
  elif [[ $1 == sft || ($sweep_flag == inner-steps && $1 == 0) ]]; then echo sft  # the baseline
  else echo "$owner"; fi
}
evaluations=($([[ $eval_sweep == 1 ]] && echo "${sweep_values[@]}" || echo -))  # one eval.py call per value, or one
eval_args_for() {  # eval_args_for VALUE: eval.py's flags, with the swept value ("-": no sweep)
  flags eval all "$([[ $eval_sweep == 1 ]] && echo "$sweep_flag")"
  [[ $1 == - ]] || printf '%s\n%s\n' "--$sweep_flag" "$1"
}
eval_dir() { echo "eval$([[ $1 == - ]] || echo "-$sweep_flag=$1")"; }
schemes_of() {  # schemes_of V: the schedules aligned model V is trained by (only Patcher has a parallel one)
  if [[ $(mode_of "$1") != patcher ]]; then echo sequential; elif [[ $SCHEME == both ]]; then echo sequential parallel
  else echo "$SCHEME"; fi
}
stage_of() {  # stage_of V SCHEME: the alignment of V by SCHEME: its name, mode, script, nvar (the variable of its number
              # of processes), own (--mode, the swept flag, D_unsafe) and these (the variables' flags)
  mode=$(mode_of "$1")
  name=$(name_of "$1")$([[ $SCHEME != both || $2 != parallel ]] || echo -parallel)
  script=patcher.py nvar=NPROC program=patcher
  [[ $2 == parallel ]] && script=parallel.py nvar=PARALLEL_NPROC program=parallel
  own=(--mode "$mode")
  [[ $eval_sweep == 1 || $sweep_flag == mode || $mode == sft ]] || own+=("--$sweep_flag" "$1")
  if [[ $DEMO == 0 && ,$(modes_of patcher unsafe-data), == *,$mode,* && $sweep_flag != unsafe-data ]]; then
    own+=(--unsafe-data "$UNSAFE_DATA")  # the defenses that use D_unsafe
  fi
  # RESET_OPTIMIZER models the official's new process per Patcher round; the other defenses are one AdamW
  mapfile -t these < <(flags "$program" "$mode" "$([[ $eval_sweep == 0 ]] && echo "$sweep_flag") unsafe-data \
    $([[ $mode == patcher ]] || echo reset-optimizer)")
  [[ $mode == sft && "${SFT_RESET_OPTIMIZER:-0}" == 1 ]] && these+=(--reset-optimizer)  # the other reading
  return 0
}
eval_data_of() {  # eval_data_of RUN: eval.py's data flags for the seed whose run directory is RUN (the demo: its toy world)
  local first=$1/demo attack_data=${ATTACK_DATA:-} eval_data=${EVAL_DATA:-} benign_data=${BENIGN_DATA:-} x
  if [[ $DEMO == 1 ]]; then  # this seed's toy world, written by patcher.py
    attack_data=${ATTACK_DATA:-$first/data/attack.jsonl}
    eval_data=${EVAL_DATA:-harmful=$first/data/eval_harmful.jsonl}
    benign_data=${BENIGN_DATA:-benign=$first/data/eval_benign.jsonl}
  fi
  printf '%s\n' --attack-data "$attack_data"
  for x in $eval_data; do printf '%s\n' --eval-data "$x"; done
  for x in $benign_data; do printf '%s\n' --benign-data "$x"; done
  for x in ${GSM8K:-}; do printf '%s\n' --gsm8k "$x"; done
}
# Before anything runs or is written, each stage is checked as it will run (preflight, below). What a stage reads from
# OUT that does not exist yet (a preset's data files, the demo's toy world) is read from the shadow: a folder in $work
# standing in for OUT, holding those files, where the checks and plans of the first seed write (nothing: --check and
# --plan write nothing).
work=$(mktemp -d)
shadow=$work/shadow
mkdir -p "$shadow"
in_shadow() {  # in_shadow WORD...: each word, one line each; a path under OUT that is not there yet but in the shadow
               # (also as NAME=PATH) read from the shadow
  local w p
  for w; do
    p=${w#*=}
    if [[ $p == "$OUT"/* && ! -e $p && -e $shadow/${p#"$OUT"/} ]]; then w=${w%"$p"}$shadow/${p#"$OUT"/}; fi
    printf '%s\n' "$w"
  done
}
derive() {  # derive DIR: the files of OUT a preset makes from the repository's data (derived), into DIR
  local i
  for (( i = 0; i < ${#derived[@]}; i += 4 )); do
    "${derived[i + 1]}" -n "${derived[i + 2]}" "${derived[i + 3]}" > "$1/${derived[i]}"
  done
}
derive "$shadow"
variable_of() {  # variable_of FLAG: the variable of this script that sets a program's --FLAG
  case $1 in
    mode|"$sweep_flag") echo SWEEP ;;
    seed) echo SEEDS ;;
    *) var "$1" ;;
  esac
}
refuse_from() {  # refuse_from LOG: a program's refusal in LOG (its last "error:" line) as one line of this script's,
                 # naming the variable that set the flag it names (SAFE_DATA, not --safe-data), exit 2
  local line v
  line=$(grep -E '(^|: )error: ' "$1" | tail -n 1) || line=$(tail -n 1 "$1")
  line=${line#*error: }
  line=${line% (*--help lists every flag)}
  line=${line//"$shadow/"/"$OUT/"}
  if [[ $line =~ ^(argument )?--([a-z0-9-]+)(.*)$ ]]; then
    v=$(variable_of "${BASH_REMATCH[2]}")
    if [[ $v == SWEEP ]]; then line="SWEEP=$SWEEP: --${BASH_REMATCH[2]}${BASH_REMATCH[3]}"
    else line="$v${BASH_REMATCH[3]}"; fi
  elif [[ $line == "attack '"* ]]; then line="ATTACKS=$ATTACKS: $line"  # a line of the suite
  fi
  echo "train.sh: $line" >&2
  exit 2
}
unused_check() {  # a variable the user set for a program's flag that no stage of this run passes: one line naming it
  # and the stages that would use it, exit 2 (a defense's flag without a stage of that defense, parallel.py's under
  # SCHEME=sequential, the swept flag's own variable); train.sh's own variables are its business (SETTINGS)
  local -A passed=()
  local -a stages=() words=()
  local program flag kind modes v w ev
  for v in "${aligned[@]}"; do
    for scheme in $(schemes_of "$v"); do
      stage_of "$v" "$scheme"
      stages+=("$name")
      words+=("${own[@]}" "${these[@]}")
    done
  done
  for ev in "${evaluations[@]}"; do mapfile -t -O "${#words[@]}" words < <(eval_args_for "$ev"); done
  for w in "${words[@]}"; do [[ $w != --* ]] || passed[${w#--}]=1; done
  [[ " ${stages[*]} " == *" sft "* || "${SFT_RESET_OPTIMIZER:-0}" == 0 || " $USER_VARS " != *" SFT_RESET_OPTIMIZER "* ]] || {
    echo "train.sh: SFT_RESET_OPTIMIZER: no SFT baseline in this run (its stages: ${stages[*]})" >&2; exit 2; }
  for program in patcher parallel eval; do
    while read -r flag kind modes _; do
      v=$(var "$flag")
      [[ " $USER_VARS " == *" $v "* && " $SETTINGS " != *" $v "* && -z ${passed[$flag]:-} ]] || continue
      [[ ($kind == switch && "${!v:-0}" != 0) || ($kind == value && -n "${!v:-}") ]] || continue
      if [[ $flag == "$sweep_flag" ]]; then w="SWEEP sets --$flag, one value per $([[ $eval_sweep == 1 ]] && echo \
        evaluation || echo aligned model): unset $v"
      elif [[ $program == parallel ]]; then w="only parallel.py takes --$flag: SCHEME=parallel or both"
      elif [[ $flag == reset-optimizer ]]; then w="only Patcher's stages take it (the SFT baseline's: SFT_RESET_OPTIMIZER=1)"
      elif [[ $modes != all ]]; then
        w="--mode ${modes//,/ or } uses it: SWEEP=mode=$([[ $sweep_flag == mode ]] && echo "${SWEEP#*=}" || echo sft),${modes%%,*}"
      else w="no stage of it takes --$flag"; fi
      echo "train.sh: $v: no stage of this run uses --$flag (its stages: ${stages[*]}); $w" >&2
      exit 2
    done < "$LISTS/$program"
  done
}
check_stages() {  # every stage of the first seed run with --check, side by side: its flags, MODEL's config.json, each data
  # file read, the attack suite; the first refusal (in the order of the stages) stops this script in one line naming
  # the variable (refuse_from). The demo's toy world is written into the shadow for eval.py's to read.
  local seed=${SEEDS%% *} i v scheme ev safe dir
  local run=$shadow/seed$seed checks=$work/checks
  local -a logs=() pids=() args safe_files data_args=() failed=()
  mkdir -p "$run" "$checks"
  if [[ $DEMO == 1 ]]; then
    python -c "import data, sys; data.write_toy_world(sys.argv[1], int(sys.argv[2]))" "$run/demo/data" "$seed" \
      > "$checks/toy" 2>&1 &
    pids+=($!) logs+=("$checks/toy")
  else
    mapfile -t safe_files < <(in_shadow $SAFE_DATA)
    for safe in "${safe_files[@]}"; do  # (several are concatenated: one missing is named here)
      [[ -f $safe ]] || { echo "train.sh: SAFE_DATA $safe: no such file" >&2; exit 2; }
    done
    safe=${safe_files[0]}
    if [[ ${#safe_files[@]} -gt 1 ]]; then safe=$run/d_safe.jsonl; cat "${safe_files[@]}" > "$safe"; fi
    data_args=(--model "$MODEL" --safe-data "$safe")
  fi
  for v in "${aligned[@]}"; do
    for scheme in $(schemes_of "$v"); do
      stage_of "$v" "$scheme"
      mapfile -t args < <(in_shadow "${data_args[@]}" "${own[@]}" "${these[@]}")
      logs+=("$checks/${#logs[@]}")
      python "$script" "${args[@]}" --seed "$seed" --out "$run/$name" --check > "${logs[-1]}" 2>&1 &
      pids+=($!)
    done
  done
  [[ $DEMO == 0 ]] || wait "${pids[0]}" || { cat "$checks/toy" >&2; exit 1; }  # eval.py reads the toy world
  for ev in "${evaluations[@]}"; do
    mapfile -t args < <(eval_data_of "$run"; eval_args_for "$ev")
    mapfile -t args < <(in_shadow "${args[@]}")
    logs+=("$checks/${#logs[@]}") dir=$run/$(eval_dir "$ev")  # (expanded here: the background job is python alone)
    OUT=$shadow TOY=$run/demo/data RUN=$run python eval.py "${args[@]}" --seed "$seed" --out "$dir" --check \
      > "${logs[-1]}" 2>&1 &
    pids+=($!)
  done
  # every check waited for (they take seconds; none is killed), then the first refusal in the order of the stages
  for i in "${!pids[@]}"; do
    [[ $DEMO == 1 && $i == 0 ]] || wait "${pids[$i]}" || failed+=("$i")  # (the toy world: waited for above)
  done
  [[ ${#failed[@]} == 0 ]] || refuse_from "${logs[${failed[0]}]}"
}
plan_one() {  # plan_one VAR WHAT SCRIPT ARGS...: the memory plan of one stage (--plan) at the processes VAR says (1 or 2
              # where it says plan), into the next file of $plans, in the background
  local world=${!1}
  [[ $world == plan ]] && world=$([[ $3 == parallel.py ]] && echo 2 || echo 1)
  files+=("$plans/${#files[@]}") vars+=("$1") what+=("$2")
  mapfile -t args < <(in_shadow "${@:4}")
  OUT=$shadow python "$3" "${args[@]}" --plan --plan-world "$world" ${PLAN_MEMORY:+--plan-memory "$PLAN_MEMORY"} > "${files[-1]}" 2>&1 &
  pids+=($!)
}
plan_stages() {  # plan_stages VAR...: every stage whose number of processes one of these variables sets, planned by its
  # program (--plan: from the model's config.json and the data, nothing loaded), side by side. A variable set to plan
  # becomes the smallest number that fits every stage it launches (at most the GPUs here); a stage that does not fit
  # its number stops this script in one line, naming the variable, unless SKIP_MEMORY_CHECK=1.
  local plans=$work/plans safe line v scheme ev i w
  local -a files=() vars=() what=() pids=() safe_files evals eval_args args
  local -A need=() gpus_of=()
  mkdir -p "$plans"
  mapfile -t safe_files < <(in_shadow $SAFE_DATA)
  safe=${safe_files[0]}
  if [[ ${#safe_files[@]} -gt 1 ]]; then safe=$plans/d_safe.jsonl; cat "${safe_files[@]}" > "$safe"; fi
  for v in "${aligned[@]}"; do
    for scheme in $(schemes_of "$v"); do
      stage_of "$v" "$scheme"
      [[ " $* " != *" $nvar "* ]] || plan_one "$nvar" "$script --mode $mode" "$script" --model "$MODEL" \
        --safe-data "$safe" "${own[@]}" --seed "${SEEDS%% *}" --out "$plans/out" "${these[@]}"
    done
  done
  if [[ " $* " == *" EVAL_NPROC "* ]]; then  # the aligned models have the base's shapes and tokenizer
    mapfile -t evals < <(eval_data_of "$OUT/seed${SEEDS%% *}")
    for ev in "${evaluations[@]}"; do
      mapfile -t eval_args < <(eval_args_for "$ev")
      plan_one EVAL_NPROC eval.py eval.py "${evals[@]}" "${eval_args[@]}" --model "base=$MODEL" --seed "${SEEDS%% *}" \
        --out "$plans/out"
    done
  fi
  for i in "${pids[@]}"; do wait "$i" || true; done
  for i in "${!files[@]}"; do
    v=${vars[$i]}
    line=$(grep -m1 '^memory-plan ' "${files[$i]}") || {
      echo "train.sh: the memory plan of ${what[$i]} failed: $(grep -m1 -E '^(error|.*: error)' "${files[$i]}" || tail -n 1 "${files[$i]}")" >&2
      exit 1; }
    [[ $line =~ peak_gib=([^ ]+)\ free_gib=([^ ]+)\ fits=([01])\ smallest=([^ ]+)\ gpus=([0-9]+) ]] || exit 1
    local peak free fits=${BASH_REMATCH[3]} smallest=${BASH_REMATCH[4]}
    printf -v peak '%.1f' "${BASH_REMATCH[1]}"
    printf -v free '%.1f' "${BASH_REMATCH[2]}"
    gpus_of[$v]=${BASH_REMATCH[5]}
    local host=$([[ ${BASH_REMATCH[5]} == 0 && -z ${PLAN_MEMORY:-} ]] && echo " (the ranks of a CPU host share its RAM)")
    if [[ ${!v} == plan ]]; then
      [[ $smallest != none ]] || { echo "train.sh: $v: no number of processes fits ${what[$i]} (~$peak GiB per rank at" \
        "the fewest, $free GiB free per rank)$host; run it on a machine with more memory, or set $v and SKIP_MEMORY_CHECK=1" >&2; exit 1; }
      (( smallest > ${need[$v]:-0} )) && need[$v]=$smallest
    elif [[ $fits == 0 ]]; then
      w=$([[ $smallest == none ]] && echo "no $v fits$host" || echo "$v=$smallest would fit")
      if [[ "${SKIP_MEMORY_CHECK:-0}" == 1 ]]; then
        echo "train.sh: $v=${!v}: ${what[$i]} needs ~$peak GiB per rank, $free GiB free per rank; $w (SKIP_MEMORY_CHECK=1: run anyway)"
      else
        echo "train.sh: $v=${!v}: ${what[$i]} needs ~$peak GiB per rank, but $free GiB are free per rank; $w;" \
          "SKIP_MEMORY_CHECK=1 runs it anyway (${what[$i]%% *} --plan prints the whole plan)" >&2
        exit 1
      fi
    fi
  done
  for v in "${!need[@]}"; do
    if (( ${gpus_of[$v]} > 0 && need[$v] > ${gpus_of[$v]} )) && [[ -z ${PLAN_MEMORY:-} ]]; then
      echo "train.sh: $v: the stages it launches need ${need[$v]} processes to fit their memory plans, and this machine" \
        "has ${gpus_of[$v]} GPUs; set $v (with SKIP_MEMORY_CHECK=1) or use a larger machine" >&2
      exit 1
    fi
    printf -v "$v" '%s' "${need[$v]}"
    export "${v?}"
    echo "train.sh: $v=${need[$v]}: the fewest processes whose memory plans fit"
  done
}
# The preflight, before anything runs or is written, DRY_RUN=1 too (it writes in $work only): a variable no stage
# uses, then every stage's --check, then the memory plans. (A nested train.sh: the run that started it checked them.)
# A rerun whose commands are its first run's (OUT/plan.txt) was checked by that run: its checks are not run again.
plan_of() {  # this run's commands (DRY_RUN=1, OUT spelled $OUT, so that a moved OUT is the same run)
  TRAIN_SH_LISTS=$LISTS TRAIN_SH_NESTED=1 DRY_RUN=1 bash "$0" | grep -v '^== ' | sed "s|$OUT|\$OUT|g"
}
plan=
if [[ -z ${TRAIN_SH_NESTED:-} && "${DRY_RUN:-0}" == 0 && -f $OUT/plan.txt ]]; then plan=$(plan_of) || plan=; fi
if [[ -z ${TRAIN_SH_NESTED:-} ]]; then
  unused_check
  [[ -n $plan && $plan == "$(cat "$OUT/plan.txt")" ]] || check_stages
fi
# Variables left to the memory plans (the paper presets' NPROC, EVAL_NPROC, PARALLEL_NPROC) are resolved first: the
# commands this run is identified by name them (DRY_RUN=1 resolves them too, reading only the config and the data).
resolve=$(for v in NPROC PARALLEL_NPROC EVAL_NPROC; do [[ ${!v} != plan ]] || echo "$v"; done)
if [[ $DEMO == 0 && -n $resolve ]]; then
  plan_stages $resolve
elif [[ -n $resolve ]]; then  # the demo's tiny model fits anywhere (its data is written by its own first stage)
  for v in $resolve; do printf -v "$v" '%s' 1; done
  PARALLEL_NPROC=$([[ $PARALLEL_NPROC == 1 ]] && echo 2 || echo "$PARALLEL_NPROC")
fi
if [[ "${DRY_RUN:-0}" == 0 ]]; then
  # and the memory plan of every stage at the processes it gets (those resolved above were planned then)
  checked=$(for v in NPROC PARALLEL_NPROC EVAL_NPROC; do [[ " $resolve " == *" $v "* ]] || echo "$v"; done)
  [[ $DEMO == 1 || -z $checked ]] || plan_stages $checked
  # From here on OUT is written.
  mkdir -p "$OUT"
  take_lock
  derive "$OUT"
  export PATCHER_PARENT_PID=$$  # each program ends itself when this script is gone (kill -9 included)
  # This run is its commands (DRY_RUN=1; OUT spelled $OUT, so that a moved OUT is the same run): an OUT that holds
  # another run's is refused, naming what changed, so that results of two settings are never mixed. The flags that
  # do not change what a program computes (--list-flags: "same"; --resume, --save-every, the judge) may change.
  [[ -n $plan ]] || plan=$(plan_of)
  rerun=$([[ -f $OUT/plan.txt ]] && echo 1 || echo 0)
  if [[ $rerun == 1 ]] && ! python - "$OUT/plan.txt" <(printf '%s\n' "$plan") "$LISTS"/* >&2 <<'PY'
import shlex, sys
same = {"--" + w[0] for f in sys.argv[3:] for w in map(str.split, open(f)) if w[-1] == "same"}
def commands(path):  # {its --out: (program, {flag: values})} of the python commands of a plan, but the flags in `same`
    found = {}
    for line in open(path):
        if line.startswith("python "):
            words, flags = shlex.split(line), {}
            for i, w in enumerate(words):
                k, _, v = w.partition("=")
                if w.startswith("--") and (k not in same or k == "--out"):
                    flags.setdefault(k, []).append(v or (words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else ""))
            found[" ".join(flags.pop("--out", ["?"]))] = (next(w for w in words if w.endswith(".py")), flags)
    return found
was, now, said = commands(sys.argv[1]), commands(sys.argv[2]), []
for out in sorted(was.keys() | now.keys()):
    if out not in now or out not in was:
        said.append(f"  {out}: {'no longer run' if out in was else 'new'}")
        continue
    (p, a), (q, b) = was[out], now[out]
    changed = [f"{k} {' '.join(a.get(k, ['(unset)']))} (now {' '.join(b.get(k, ['(unset)']))})" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    changed = ([f"{p} (now {q})"] if p != q else []) + changed
    if changed:
        said.append(f"  {out}: " + ", ".join(changed))
if said:
    print("train.sh: OUT holds a run of other settings; use another OUT (or remove it). What differs (its, now):")
    print("\n".join(said))
sys.exit(2 if said else 0)
PY
  then
    exit 2
  fi
  [[ $rerun == 1 ]] || printf '%s\n' "$plan" > "$OUT/plan.txt"  # this run's commands, once its first stage may start
fi
# "== stage i/n" before each stage, with the time left: the stages still to run, each estimated as the mean of those of
# its kind done so far (its alignment, its evaluation, the demo's base model), a kind not run yet as the mean of all
kinds=()
[[ $DEMO == 0 ]] || kinds+=(demo)
for v in "${aligned[@]}"; do for scheme in $(schemes_of "$v"); do stage_of "$v" "$scheme"; kinds+=("align $name"); done; done
for ev in "${evaluations[@]}"; do kinds+=("eval $ev"); done
stages=()
for seed in $SEEDS; do stages+=("${kinds[@]}"); done
declare -A took=() runs=()
stage=0 stage_t0=0
minutes() { (( $1 < 60 )) && echo "${1}s" || echo "$(( $1 / 60 ))m$(printf '%02d' $(( $1 % 60 )))s"; }
stage_begin() {  # stage_begin WHAT: the stage line, the previous stage timed
  local k left=0 all=0 n=0 guess=0 i
  if (( stage > 0 )); then k=${stages[stage - 1]}; took[$k]=$(( ${took[$k]:-0} + SECONDS - stage_t0 )); runs[$k]=$(( ${runs[$k]:-0} + 1 )); fi
  (( stage += 1 ))
  stage_t0=$SECONDS
  for k in "${!took[@]}"; do all=$(( all + took[$k] )) n=$(( n + runs[$k] )); done
  for (( i = stage - 1; i < ${#stages[@]}; i++ )); do
    k=${stages[i]}
    if [[ -n ${runs[$k]:-} ]]; then left=$(( left + took[$k] / runs[$k] )); else left=$(( left + all / (n > 0 ? n : 1) )) guess=1; fi
  done
  local eta=$([[ $n == 0 || "${DRY_RUN:-0}" == 1 ]] || echo " | $(minutes $(( SECONDS - t0 ))) so far, about $(minutes "$left") left$(
    [[ $guess == 0 ]] || echo " (a first guess)")")  # (a kind of stage not run yet: guessed as the mean of all)
  echo "== stage $stage/${#stages[@]}: $1$eta"
}
t0=$SECONDS
reports=()
[[ "${DRY_RUN:-0}" == 1 || -f $OUT/timing.tsv ]] || : > "$OUT/timing.tsv"
for seed in $SEEDS; do
  run=$OUT/seed$seed
  [[ "${DRY_RUN:-0}" == 1 ]] || mkdir -p "$run"
  data_args=()
  if [[ $DEMO == 0 ]]; then
    read -r -a safe_files <<< "$SAFE_DATA"
    safe=${safe_files[0]}
    if [[ ${#safe_files[@]} -gt 1 ]]; then
      safe=$run/d_safe.jsonl
      [[ "${DRY_RUN:-0}" == 1 ]] || cat "${safe_files[@]}" > "$safe"
    fi
    data_args=(--model "$MODEL" --safe-data "$safe")
  fi
  if [[ $DEMO == 1 ]]; then  # the demo's base model and toy world, once per seed, before any alignment is timed
    stage_begin "seed $seed: the demo's base model, a tiny model that complies with every toy request -> $run/demo"
    again=$([[ -e $run/demo/done.json ]] && echo --resume || true)  # made already: patcher.py checks it is this one
    headers=0 run_logged "$run/demo.log" 1 patcher.py --mode sft --warmup-steps 0 --rounds 1 --defend-steps 1 --seed "$seed" \
      --out "$run/demo" --save-every 1 $again
  fi
  first=$run/demo RUN=$run TOY=$run/demo/data
  headers=$([[ $seed == "${SEEDS%% *}" ]] && echo 1 || echo 0)  # (each seed's stages have the first's settings)
  mapfile -t evals < <(eval_data_of "$run")
  # 1. align: the same base, data, seed and number of defender steps; only the swept value differs
  models=()
  for v in "${aligned[@]}"; do
    for scheme in $(schemes_of "$v"); do
      stage_of "$v" "$scheme"
      dir=$run/$name n=${!nvar}
      if [[ $DEMO == 1 && ! -e $dir/base && "${DRY_RUN:-0}" == 0 ]]; then
        mkdir -p "$dir" && cp -r "$run/demo/base" "$dir/base"  # one tiny base model per seed
      fi
      models+=("$name")
      stage_begin "seed $seed: align $name ($script, $n rank(s) x $OMP_NUM_THREADS thread(s)) -> $dir"
      attempt=$run/.$name.attempt
      if [[ "${DRY_RUN:-0}" == 0 ]]; then  # (time.time(): date +%s.%N and bc are not on every machine)
        [[ ! -f $attempt ]] || timed "$attempt" "$run/$name.log"  # the last attempt, killed with train.sh
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$seed" "$name" "$script" "$n" "$OMP_NUM_THREADS" \
          "$(python -c "import time; print(time.time())")" > "$attempt"
      fi
      [[ $SAVE_EVERY == 0 ]] || these+=(--save-every "$SAVE_EVERY")
      [[ -e $dir/checkpoints/latest || -e $dir/done.json ]] && these+=(--resume)  # patcher.py checks it is this run
      run_logged "$run/$name.log" "$n" "$script" "${data_args[@]}" "${own[@]}" --seed "$seed" --out "$dir" "${these[@]}"
      if [[ "${DRY_RUN:-0}" == 1 ]]; then :
      elif grep -q "^finished already" "$run/$name.log"; then rm -f "$attempt"  # (no alignment: nothing to time)
      else timed "$attempt"; fi
    done
  done
  # 2. attack every aligned model identically and evaluate them in one call (same examples, order and sampling)
  for n in "${models[@]}"; do evals+=(--model "$n=$run/$n/final"); done
  [[ $DEMO == 1 || "${EVAL_BASE:-0}" == 1 ]] && evals+=(--model "base=${MODEL:-$first/base}")
  for ev in "${evaluations[@]}"; do
    mapfile -t eval_args < <(eval_args_for "$ev")
    dir=$run/$(eval_dir "$ev")
    stage_begin "seed $seed: attack and evaluate -> $dir"
    run_logged "$dir.log" "$EVAL_NPROC" eval.py "${evals[@]}" "${eval_args[@]}" --seed "$seed" --out "$dir"
    reports+=("$dir/report.json")
  done
done
[[ "${DRY_RUN:-0}" == 1 ]] && exit 0
{  # the wall clock of each alignment, with the hardware it had: per seed the sum over its attempts, then over seeds
  echo "Alignment wall clock (s), mean ± std over seeds $SEEDS, each the sum over its attempts (runs: the attempts,"
  echo "all seeds: more than the seeds, interrupted and resumed); $(nproc --all) cores ($cpu), $OMP_NUM_THREADS" \
    "thread(s) per rank"
  echo; echo "| model | program | ranks | seconds | runs |"; echo "|---|---|---:|---:|---:|"
  awk -F'\t' '{k = $1 SUBSEP $2; if (!(k in t)) n[$2]++; t[k] += $6; a[$2]++; p[$2] = $3; r[$2] = $4}
    !($2 in o) {o[$2] = NR}
    END {for (k in t) {split(k, f, SUBSEP); s[f[2]] += t[k]; q[f[2]] += t[k] * t[k]}
         for (m in n) {mu = s[m] / n[m]; v = q[m] / n[m] - mu * mu
                       printf "%d\t| %s | %s | %s | %.1f ± %.1f | %d |\n", o[m], m, p[m], r[m], mu, sqrt(v > 0 ? v : 0),
                              a[m]}}' \
    "$OUT/timing.tsv" | sort -n | cut -f2-
} > "$OUT/timing.md"
# The end: the tables into their files (summary.md; sweep.md, the defenses side by side for a sweep over --mode, README
# part 5; worst_case.md with a suite), and on the console the verdict and the files to open
echo
echo "== done in $(minutes $((SECONDS - t0))): $SWEEP over seeds $SEEDS; each program's whole output: $OUT/seed*/*.log"
python eval.py --summarize "${reports[@]}" --sweep "$sweep_flag" ${ATTACKS:+--worst-case} --verdict --out "$OUT"
figures=(sweep.png) open=(summary.md "every metric at every attack step, mean ± std over the seeds" sweep.md
                          "the models side by side")
[[ -z "${ATTACKS:-}" ]] || figures+=(worst_case.png) open+=(worst_case.md "the worst case over the attacks, per budget")
open+=(timing.md "each alignment's wall clock")
echo "files to open:"
for (( i = 0; i < ${#open[@]}; i += 2 )); do
  png=${open[i]%.md}.png
  printf '  %-36s %s\n' "$OUT/${open[i]}" "${open[i + 1]}$([[ ! -f $OUT/$png ]] || echo "; the figure: $png")"
done
# each seed's report: the first one's path, the others named after it (a path a line, and the list stays short)
others=$(for report in "${reports[@]:1}"; do printf ', %s' "${report#"$OUT/"}"; done)
others=${others//report.json/report.md}
printf '  %-36s %s\n' "${reports[0]%.json}.md" "one seed's report, every row${others:+ (the others: ${others:2})}"
# the last line: the figures not drawn, and how to get them (matplotlib is not a runtime dependency)
python -c "import matplotlib" 2>/dev/null || echo "train.sh: no figures drawn (matplotlib is not installed):" \
  "$(printf '%s, ' "${figures[@]}")each seed's robustness.png; pip install matplotlib, then run the same command" \
  "again: it draws them from the kept answers"
