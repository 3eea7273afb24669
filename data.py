"""Tokenizer, chat formats and SFT data for Patcher.

Everything a training step consumes is built here: a tiktoken tokenizer read from the checkpoint,
conversations rendered exactly as the checkpoint's own chat template renders them (with a loss mask
on the assistant's tokens), the paper's datasets in their native layouts, and an endless, sharded,
resumable stream of padded batches. Runtime imports: the standard library, numpy, torch, tiktoken.
"""
import base64
import binascii
import csv
import gzip
import json
import lzma
import os
import random
import re
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tiktoken
import torch

# The paper trains and attacks with this Alpaca-style system prompt on every conversation.
PAPER_SYSTEM_PROMPT = ("Below is an instruction that describes a task. "
                       "Write a response that appropriately completes the request.")
IGNORE_INDEX = -100  # Hugging Face convention: labels equal to this are not scored


class DataError(ValueError):
    """A tokenizer or dataset file we cannot use; the message names the file (and line)."""


# -----------------------------------------------------------------------------
# Tokenizer

# Pre-tokenizer regexes, in tiktoken's (fancy-regex) syntax.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-2's regex run after Digits(individual_digits) has cut the text at every digit (SmolLM2):
# a digit is its own piece, " 1" is no longer one piece, and a whitespace run before a digit
# ends at the cut, so `(?!\S)` must also accept a following digit.
GPT2_DIGITS_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# The original tiktoken-format releases carry no pattern or special tokens; these are the ones in
# Meta's llama3 tokenizer.py and Qwen's tokenization_qwen.py (ids follow the BPE ranks).
_LLAMA3_SPECIALS = (["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(4)]
                    + ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
                    + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)])
_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
TIKTOKEN_FILES = {"tokenizer.model": (LLAMA3_PATTERN, _LLAMA3_SPECIALS), "qwen.tiktoken": (QWEN_PATTERN, _QWEN_SPECIALS)}


def _bytes_to_unicode():
    """GPT-2's reversible byte -> printable character map that byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:  # whitespace and control bytes are shifted to unused printable code points
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _token_str(t):
    return t.get("content") if isinstance(t, dict) else t  # tokenizer_config writes tokens as str or AddedToken dict


class Tokenizer:
    """A tiktoken Encoding plus what the checkpoint says about its control tokens and chat format.

    `encode` never produces control tokens: `<|im_start|>` typed by a user is ordinary text, so user
    content cannot forge a turn. Control tokens enter only through `encode_chat`/`encode_special`.
    """

    def __init__(self, enc, chat_template="", config=None, generation_config=None, normalize=None, n_real=None):
        self.enc = enc
        self.normalize = normalize  # None, or the checkpoint's Unicode normalizer (NFC for Qwen2/3 on the Hub)
        self.vocab_size = n_real if n_real is not None else enc.n_vocab
        # ids >= vocab_size stand for bytes the vocabulary has no token for (see _from_tokenizer_json)
        self._placeholder = self.vocab_size if self.vocab_size < enc.n_vocab else None
        self.special_tokens = {s: enc.encode_single_token(s) for s in enc.special_tokens_set}
        self._control_re = re.compile("(" + "|".join(map(re.escape, sorted(self.special_tokens, key=len, reverse=True))) + ")")
        # byte length of every token, to find which tokens of a BPE chunk overlap the assistant's text
        self._nbytes = np.ones(enc.n_vocab, dtype=np.int64)
        for i in range(self.vocab_size):
            try:
                self._nbytes[i] = len(enc.decode_single_token_bytes(i))
            except KeyError:
                pass  # an unused id
        cfg, gen = config or {}, generation_config or {}

        def cfg_id(key):
            s = _token_str(cfg.get(key))
            return self.special_tokens.get(s) if s else None

        def gen_ids(key):
            v = gen.get(key)
            return [] if v is None else [v] if isinstance(v, int) else list(v)

        self.bos_token = _token_str(cfg.get("bos_token"))
        self.bos_id = cfg_id("bos_token")
        if self.bos_id is None and gen_ids("bos_token_id"):
            self.bos_id = gen_ids("bos_token_id")[0]
        self.chat_format, self.default_system, self.think = _chat_format(chat_template, self.special_tokens)
        self.eot_id = self.special_tokens["<|eot_id|>" if self.chat_format == "llama3" else "<|im_end|>"]
        self.eos_id = cfg_id("eos_token")
        if self.eos_id is None:
            self.eos_id = (gen_ids("eos_token_id") or [self.eot_id])[0]
        self.pad_id = cfg_id("pad_token")
        if self.pad_id is None:
            self.pad_id = (gen_ids("pad_token_id") or [self.eos_id])[0]
        self.stop_ids = sorted({self.eot_id, self.eos_id, *gen_ids("eos_token_id")})

    # -- plain text ----------------------------------------------------------

    def encode(self, text):
        """Token ids of `text`: no BOS/EOS, and special-token strings stay ordinary text."""
        ids = self.enc.encode_ordinary(self.normalize(text) if self.normalize else text)
        if self._placeholder is not None and ids and max(ids) >= self._placeholder:
            ids = [i for i in ids if i < self._placeholder]
        return ids

    def encode_batch(self, texts, num_threads=None):
        """`encode` over many strings. tiktoken releases the GIL while it encodes, so threads run in
        parallel; each takes one contiguous slice (a future per string costs more than it encodes)."""
        texts = list(texts)
        n = max(1, min(num_threads or os.cpu_count() or 1, len(texts) // 64))
        if n == 1:
            return [self.encode(t) for t in texts]
        step = -(-len(texts) // n)
        with ThreadPoolExecutor(n) as pool:
            parts = pool.map(lambda i: [self.encode(t) for t in texts[i:i + step]], range(0, len(texts), step))
            return [ids for part in parts for ids in part]

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def encode_special(self, s):
        """The id of one control token string, e.g. "<|im_end|>"."""
        if s not in self.special_tokens:
            raise KeyError(f"{s!r} is not a special token of this tokenizer")
        return self.special_tokens[s]

    # -- conversations -------------------------------------------------------

    def _render(self, messages, add_generation_prompt):
        """The conversation as (text, is_template, supervised) pieces, in the order the checkpoint's
        chat template prints them. Template pieces may contain control tokens; message content never does."""
        assert messages, "empty conversation"
        first = 1 if messages[0]["role"] == "system" else 0
        assert len(messages) > first, "a conversation needs a user message"
        for i, m in enumerate(messages[first:]):
            want = "user" if i % 2 == 0 else "assistant"
            assert m["role"] == want, f"message {first + i}: role {m['role']!r}, expected {want!r}"
        assert all(isinstance(m["content"], str) for m in messages), "message content must be a string"
        assert not add_generation_prompt or messages[-1]["role"] == "user", "generation prompt must follow a user turn"
        out = []
        if self.chat_format == "llama3":
            # Llama 3: BOS, then a header per message; the template trims whitespace off every content
            for i, m in enumerate(messages):
                sup = m["role"] == "assistant"
                head = (self.bos_token or "<|begin_of_text|>") * (i == 0)
                out += [(f"{head}<|start_header_id|>{m['role']}<|end_header_id|>\n\n", True, False),
                        (m["content"].strip(), False, sup), ("<|eot_id|>", True, sup)]
            if add_generation_prompt:
                out.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", True, False))
            return out
        # ChatML. Qwen2.5 and SmolLM2 templates insert their own system prompt when none is given.
        if first == 0 and self.default_system is not None:
            messages = [{"role": "system", "content": self.default_system}] + list(messages)
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        for i, m in enumerate(messages):
            role, content, sup = m["role"], m["content"], m["role"] == "assistant"
            out.append((f"<|im_start|>{role}\n", True, False))
            if sup and self.think:
                # Qwen3: reasoning is dropped from turns before the last user message; a turn after it
                # carries its think block, which is empty in non-thinking mode (how the paper runs Qwen3)
                reasoning = ""
                if "</think>" in content:
                    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                    content = content.split("</think>")[-1].lstrip("\n")
                if i > last_user and (i == len(messages) - 1 or reasoning):
                    out += [("<think>\n", True, False), (reasoning.strip("\n"), False, sup), ("\n</think>\n\n", True, False)]
                    content = content.lstrip("\n")
            out += [(content, False, sup), ("<|im_end|>", True, sup), ("\n", True, False)]
        if add_generation_prompt:
            out.append(("<|im_start|>assistant\n" + "<think>\n\n</think>\n\n" * self.think, True, False))
        return out

    def encode_chat(self, messages, add_generation_prompt=False):
        """Render and tokenize a conversation -> (ids, loss_mask). The mask is True exactly on the
        assistant's content tokens and its end-of-turn token (plus a token that straddles into them)."""
        ids, mask, chunk = [], [], []

        def flush():
            # Text between two control tokens is one BPE input, as in HF (a template "\n" and content
            # starting with "\n" form one "\n\n" token); each token is supervised if any of its bytes is.
            pieces = [(self.normalize(t) if self.normalize else t, s) for t, s in chunk if t]
            chunk.clear()
            if not pieces:
                return
            toks = self.enc.encode_ordinary("".join(t for t, _ in pieces))
            sups = [s for _, s in pieces]
            if all(sups) or not any(sups):
                m = [sups[0]] * len(toks)
            else:
                byte_sup = np.repeat(sups, [len(t.encode()) for t, _ in pieces])
                starts = np.cumsum(self._nbytes[toks]) - self._nbytes[toks]
                m = np.logical_or.reduceat(byte_sup, starts).tolist()
            keep = [k for k, t in enumerate(toks) if self._placeholder is None or t < self._placeholder]
            ids.extend(toks[k] for k in keep)
            mask.extend(m[k] for k in keep)

        for text, is_template, sup in self._render(messages, add_generation_prompt):
            if not is_template:
                chunk.append((text, sup))
                continue
            for part in self._control_re.split(text):  # control tokens written by the template itself
                if part in self.special_tokens:
                    flush()
                    ids.append(self.special_tokens[part])
                    mask.append(sup)
                else:
                    chunk.append((part, sup))
        flush()
        return ids, mask

    def encode_prompt(self, prompt, system=None):
        """Ids of a single-turn prompt ending in the assistant header: what generation starts from.
        system=None leaves the template's default (Qwen2.5/SmolLM2 insert one, Llama 3/Qwen3 none)."""
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": prompt}]
        return self.encode_chat(messages, add_generation_prompt=True)[0]


def _chat_format(template, specials):
    """(format, default system prompt, Qwen3 think blocks) read off the checkpoint's tokens and template."""
    template = template or ""
    if "<|start_header_id|>" in specials and (not template or "<|start_header_id|>" in template):
        if "Cutting Knowledge Date" in template:
            raise DataError("Llama 3.1+ chat template (date system header) is not supported; use the Llama 3 template")
        return "llama3", None, False
    if "<|im_start|>" in specials and (not template or "<|im_start|>" in template):
        # a literal default system turn in the template, e.g. '<|im_start|>system\nYou are Qwen...<|im_end|>\n'
        m = re.search(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}]*?)<\|im_end\|>", template)
        default_system = m.group(1).replace("\\n", "\n") if m else None
        return "chatml", default_system, "enable_thinking" in template and "<think>" in template
    raise DataError("unsupported chat format: the tokenizer has neither ChatML (<|im_start|>) nor Llama 3 header tokens")


def _pretokenizer_pattern(pre, path):
    """tokenizer.json's pre-tokenizer as one tiktoken regex (only the byte-level layouts in use)."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre or {}]
    kinds = [s.get("type") for s in steps]
    if any(s.get("type") == "ByteLevel" and s.get("add_prefix_space") for s in steps):
        raise DataError(f"{path}: ByteLevel add_prefix_space is not supported")
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True) and "Regex" in steps[0]["pattern"] \
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
        return steps[0]["pattern"]["Regex"]  # Llama 3, Qwen2/2.5/3
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return GPT2_DIGITS_PATTERN  # SmolLM2 on the Hub
    raise DataError(f"{path}: unsupported pre-tokenizer {kinds}")


def _normalizer(spec, path):
    if not spec:
        return None
    forms = [s.get("type") for s in spec["normalizers"]] if spec.get("type") == "Sequence" else [spec.get("type")]
    if not all(f in ("NFC", "NFD", "NFKC", "NFKD") for f in forms):
        raise DataError(f"{path}: unsupported normalizer {forms}")

    def normalize(text):
        for f in forms:
            text = unicodedata.normalize(f, text)
        return text
    return normalize


def _from_tokenizer_json(path):
    """Hugging Face byte-level BPE -> tiktoken's (mergeable ranks, pattern, control tokens, normalizer)."""
    spec = json.loads(path.read_text(encoding="utf-8"))
    model, pre = spec.get("model", {}), spec.get("pre_tokenizer") or {}
    byte_level = "ByteLevel" in json.dumps(pre)
    if model.get("type") != "BPE" or model.get("byte_fallback") or not byte_level:
        raise DataError(f"{path}: not a byte-level BPE tokenizer; SentencePiece tokenizers "
                        f"(Llama 2, Mistral 7B v0.1) are not supported")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise DataError(f"{path}: BPE with subword prefix/suffix is not supported")
    pattern, normalize = _pretokenizer_pattern(pre, path), _normalizer(spec.get("normalizer"), path)
    # Added tokens (special or not) are control tokens: tiktoken matches them only where we ask it to.
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    vocab, ranks = model["vocab"], {}
    for tok, i in vocab.items():
        if tok in specials:
            continue
        try:
            ranks[bytes(byte_of[c] for c in tok)] = i
        except KeyError:
            raise DataError(f"{path}: vocabulary entry {tok!r} is not in the byte-level alphabet") from None
    # tiktoken merges the pair whose merged token has the lowest id; HF merges the earliest pair in
    # `merges`. That is the same order when the ids of merge results never decrease along `merges`,
    # as in vocabularies trained by HF and those converted from tiktoken: check rather than assume.
    # (The tests compare both on a corpus for each real tokenizer.)
    last = -1
    for n, m in enumerate(model.get("merges", [])):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if a + b not in vocab:
            raise DataError(f"{path}: merge {n} ({a!r}, {b!r}) makes a token that is not in the vocabulary")
        if vocab[a + b] < last:
            raise DataError(f"{path}: merge {n} ({a!r}, {b!r}) is out of id order; tiktoken cannot reproduce it")
        last = vocab[a + b]
    return ranks, pattern, specials, normalize


def _from_tiktoken_file(path, cfg):
    """Meta's Llama 3 `tokenizer.model` or Qwen's `qwen.tiktoken`: lines of `base64(token) rank`."""
    ranks = {}
    for line in path.read_bytes().splitlines():
        if not line:
            continue
        try:
            tok, rank = line.split()
            ranks[base64.b64decode(tok, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise DataError(f"{path}: not a tiktoken BPE file (SentencePiece tokenizers such as Llama 2 and "
                            f"Mistral 7B v0.1 are not supported)") from None
    pattern, names = TIKTOKEN_FILES[path.name]
    named = {int(i): t["content"] for i, t in cfg.get("added_tokens_decoder", {}).items()}
    specials = {named.get(len(ranks) + k, s): len(ranks) + k for k, s in enumerate(names)}
    return ranks, pattern, specials, None


def load_tokenizer(checkpoint_dir):
    """The checkpoint's tokenizer: tokenizer.json if present, else an original tiktoken-format file."""
    d = Path(checkpoint_dir)
    read = lambda name: json.loads((d / name).read_text(encoding="utf-8")) if (d / name).exists() else {}
    cfg, gen = read("tokenizer_config.json"), read("generation_config.json")
    template = cfg.get("chat_template") or ""
    if isinstance(template, list):  # several named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), "")
    if not template and (d / "chat_template.jinja").exists():
        template = (d / "chat_template.jinja").read_text(encoding="utf-8")
    if (d / "tokenizer.json").exists():
        ranks, pattern, specials, normalize = _from_tokenizer_json(d / "tokenizer.json")
    elif any((d / name).exists() for name in TIKTOKEN_FILES):
        ranks, pattern, specials, normalize = _from_tiktoken_file(next(d / n for n in TIKTOKEN_FILES if (d / n).exists()), cfg)
    else:
        raise DataError(f"{d}: no tokenizer.json, tokenizer.model or qwen.tiktoken")
    n_real = max(max(ranks.values()), max(specials.values(), default=0)) + 1
    # tiktoken needs a token for every byte. A trained vocabulary can lack bytes it never saw (SmolLM2
    # has no token for 21 of them); HF drops such a byte, so give it a placeholder id >= n_real that
    # `encode` drops. (HF may still merge the bytes around a dropped one; we do not: a rare difference.)
    for b in range(256):
        if bytes([b]) not in ranks:
            ranks[bytes([b])] = n_real + b
    enc = tiktoken.Encoding(name=d.name or "tokenizer", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    return Tokenizer(enc, template, cfg, gen, normalize, n_real)


# -----------------------------------------------------------------------------
# Datasets

def _open_text(path):
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline=""), name[:-3]
    if name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8", newline=""), name[:-3]
    return open(path, encoding="utf-8", newline=""), name


def _json_array(text, path):
    """Items of a top-level JSON array with the line each starts on, so errors can name it."""
    dec, ws = json.JSONDecoder(), re.compile(r"\s*")
    seen, line = 0, 1

    def line_at(p):  # counts forward from the previous call: linear in the file, not quadratic
        nonlocal seen, line
        line, seen = line + text.count("\n", seen, p), p
        return line

    pos = ws.match(text).end()
    if text[pos:pos + 1] != "[":
        raise DataError(f"{path}:{line_at(pos)}: expected a JSON array of records")
    pos = ws.match(text, pos + 1).end()
    while text[pos:pos + 1] != "]":
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        yield line_at(pos), obj
        pos = ws.match(text, end).end()
        if text[pos:pos + 1] == ",":
            pos = ws.match(text, pos + 1).end()
        elif text[pos:pos + 1] != "]":
            raise DataError(f"{path}:{line_at(pos)}: expected ',' or ']' between records")


def _rows(path, fmt, prompt_field):
    """(line, row) pairs of a .json/.jsonl/.csv file (optionally .gz/.xz), and the format it implies."""
    f, name = _open_text(path)
    with f:
        if name.endswith(".jsonl"):
            rows = []
            for n, text in enumerate(f, 1):
                if text.strip():
                    try:
                        rows.append((n, json.loads(text)))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{n}: invalid JSON: {e.msg}") from None
        elif name.endswith(".json"):
            rows = list(_json_array(f.read(), path))
        elif name.endswith(".csv"):
            reader = csv.reader(f)
            table = [(reader.line_num, r) for r in reader if any(c.strip() for c in r)]
            header = table[0][1] if table else []
            # HEx-PHI: one prompt per row and no header; a one-column CSV not headed by the prompt field
            if fmt == "hexphi" or (fmt == "auto" and len(header) == 1 and header[0] != prompt_field):
                return [(n, r) for n, r in table], "hexphi"
            rows = []
            for n, r in table[1:]:
                if len(r) != len(header):
                    raise DataError(f"{path}:{n}: {len(r)} columns, header has {len(header)}")
                rows.append((n, dict(zip(header, r))))
        else:
            raise DataError(f"{path}: unknown extension (expected .json, .jsonl or .csv, optionally .gz/.xz)")
    if fmt == "auto":
        keys = rows[0][1].keys() if rows and isinstance(rows[0][1], dict) else ()
        if "refusal" in keys and "is_safe" in keys:
            raise DataError(f"{path}: BeaverTails with refusals carries both responses: "
                            f"pass fmt='beavertails' (harmful responses) or 'beavertails-refusal'")
        fmt = "messages" if "messages" in keys else "advbench" if {"goal", "target"} <= set(keys) and prompt_field not in keys \
            else "beavertails" if "is_safe" in keys else "records"
    return rows, fmt


def _bool(v):
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    raise ValueError(f"is_safe must be true/false, got {v!r}")


def load_records(path, prompt_field="prompt", response_field="response", fmt="auto", safe=None):
    """Read a dataset into [{"prompt", "response"}] (response None for prompt-only sets) or [{"messages"}].

    fmt: "auto" (from extension and columns), "records" (prompt/response fields), "messages",
    "beavertails" (keep is_safe == `safe` unless None), "beavertails-refusal" (the response is the
    refusal text after "Answer: "), "advbench" (goal/target), "hexphi" (headerless one-column CSV).
    """
    path = Path(path)
    rows, fmt = _rows(path, fmt, prompt_field)
    if fmt in ("beavertails", "beavertails-refusal", "advbench"):
        prompt_field, response_field = {"advbench": ("goal", "target")}.get(fmt, ("prompt", "response"))
    # a set is prompt-only when no record has a response; then none may lack one
    prompt_only = fmt == "hexphi" or (fmt == "records" and not any(
        isinstance(r, dict) and r.get(response_field) is not None for _, r in rows))
    fields = [prompt_field] + {"beavertails-refusal": ["refusal"]}.get(fmt, [] if prompt_only else [response_field])
    fields += ["is_safe"] if fmt == "beavertails" or safe is not None else []
    out = []
    for n, row in rows:
        where = f"{path}:{n}"
        if fmt == "hexphi":
            if len(row) != 1:
                raise DataError(f"{where}: expected one prompt per row, got {len(row)} columns")
            out.append({"prompt": row[0], "response": None})
            continue
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object, got {type(row).__name__}")
        if fmt == "messages":
            msgs = row.get("messages")
            if not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                    and isinstance(m.get("content"), str) for m in msgs):
                raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} with string content")
            out.append({"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]})
            continue
        missing = [k for k in fields if not isinstance(row.get(k), (str, bool) if k == "is_safe" else str)]
        if missing:
            raise DataError(f"{where}: missing or non-string field(s) {missing}")
        if safe is not None:
            try:
                if _bool(row["is_safe"]) != safe:
                    continue
            except ValueError as e:
                raise DataError(f"{where}: {e}") from None
        response = None if prompt_only else row.get(response_field)
        if fmt == "beavertails-refusal":
            # the refusal is written as "Question: <prompt>\nAnswer: <refusal>"; find it after the prompt
            text = row["refusal"]
            start = text.find(row[prompt_field])
            k = text.find("Answer: ", start + len(row[prompt_field]) if start >= 0 else 0)
            if k < 0:
                raise DataError(f"{where}: refusal text has no 'Answer: '")
            response = text[k + len("Answer: "):].strip()
        out.append({"prompt": row[prompt_field], "response": response})
    if not out:
        raise DataError(f"{path}: no records" + (f" with is_safe={safe}" if safe is not None else ""))
    return out


def to_messages(record, system=PAPER_SYSTEM_PROMPT):
    """A record as a conversation, led by `system` (None: none of ours, the template may add its own)."""
    head = [{"role": "system", "content": system}] if system is not None else []
    if "messages" in record:
        msgs = record["messages"]
        return msgs if msgs[0]["role"] == "system" else head + msgs
    msgs = head + [{"role": "user", "content": record["prompt"]}]
    if record.get("response") is not None:
        msgs.append({"role": "assistant", "content": record["response"]})
    return msgs


def mix_records(harmful, benign, n_samples, poison_ratio, seed=0):
    """The attack set: exactly round(n_samples * poison_ratio) harmful records and the rest benign,
    drawn without replacement and shuffled, all from `seed`. A set too small for its share is an
    error (repeating samples would silently change the attack)."""
    n_harmful = round(n_samples * poison_ratio)
    n_benign = n_samples - n_harmful
    if not 0 <= poison_ratio <= 1 or n_harmful > len(harmful) or n_benign > len(benign):
        raise DataError(f"cannot draw {n_harmful} harmful of {len(harmful)} and {n_benign} benign of {len(benign)} "
                        f"(n_samples={n_samples}, poison_ratio={poison_ratio})")
    rng = random.Random(seed)
    mixed = rng.sample(list(harmful), n_harmful) + rng.sample(list(benign), n_benign)
    rng.shuffle(mixed)
    return mixed


# -----------------------------------------------------------------------------
# Batching

def tokenize_records(tok, records, max_len, system=PAPER_SYSTEM_PROMPT):
    """Records -> ([(ids, mask)], n_truncated). Truncation keeps the first max_len tokens (the prompt
    and the start of the response). An example left with no supervised token is dropped: it would add
    nothing to the loss. n_truncated counts every example that was cut, the dropped ones included."""
    examples, n_truncated = [], 0
    for r in records:
        ids, mask = tok.encode_chat(to_messages(r, system))
        if not any(mask):
            raise DataError(f"record has no assistant turn to train on: {str(r)[:80]}")
        if len(ids) > max_len:
            n_truncated += 1
            ids, mask = ids[:max_len], mask[:max_len]
        if any(mask):
            examples.append((ids, mask))
    return examples, n_truncated


def collate(examples, pad_id):
    """Right-pad to the longest example -> {"input_ids", "labels"} (B, T) int64. Labels are the ids
    where the mask is set and -100 elsewhere; the model shifts them by one, as in HF."""
    T = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for b, (ids, mask) in enumerate(examples):
        x = torch.tensor(ids, dtype=torch.long)
        input_ids[b, :len(ids)] = x
        labels[b, :len(ids)] = torch.where(torch.tensor(mask, dtype=torch.bool), x, IGNORE_INDEX)
    return {"input_ids": input_ids, "labels": labels}


class BatchIterator:
    """Endless stream of one rank's batches, for step-counted loops.

    Epoch e visits a permutation of the examples drawn from (seed, e). Rank r takes every
    world_size-th example of it, and every rank stops at the same number of full batches, so the
    last N mod (world_size * batch_size) examples of each permutation are skipped (different ones
    every epoch). Every rank must pass the same examples in the same order. The position (epoch,
    index of the next batch) is the resumable state.
    """

    def __init__(self, examples, batch_size, pad_id=0, rank=0, world_size=1, seed=0, start_epoch=0, start_index=0):
        assert 0 <= rank < world_size
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.steps_per_epoch = len(examples) // (world_size * batch_size)
        if self.steps_per_epoch == 0:
            raise DataError(f"{len(examples)} examples cannot fill one batch of {batch_size} on each of {world_size} ranks")
        self.epoch, self.index = start_epoch, start_index
        self._order = None

    def _shard(self):
        # this rank's example order for the current epoch; same on every rank, so shards are disjoint
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples))
        return perm[:self.steps_per_epoch * self.world_size * self.batch_size][self.rank::self.world_size]

    def __iter__(self):
        return self

    def __next__(self):
        if self.index >= self.steps_per_epoch:
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = self._shard()
        take = self._order[self.index * self.batch_size:(self.index + 1) * self.batch_size]
        self.index += 1
        return collate([self.examples[i] for i in take], self.pad_id)

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "world_size": self.world_size,
                "batch_size": self.batch_size, "n_examples": len(self.examples)}

    def load_state_dict(self, state):
        for k in ("seed", "world_size", "batch_size", "n_examples"):
            if state[k] != self.state_dict()[k]:
                raise ValueError(f"data position saved with {k}={state[k]}, this run has {self.state_dict()[k]}")
        self.epoch, self.index, self._order = state["epoch"], state["index"], None


def batches(examples, batch_size, rank=0, world_size=1, seed=0, start_epoch=0, start_index=0, pad_id=0):
    """An endless BatchIterator. pad_id only fills positions after each example's end, which real
    tokens never attend to (causal) and the loss never scores (-100); pass tok.pad_id anyway."""
    return BatchIterator(examples, batch_size, pad_id, rank, world_size, seed, start_epoch, start_index)
