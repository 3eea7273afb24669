"""eval.py's LLM-judge client against fake servers on 127.0.0.1: the key (stripped, refused with a control character
inside, redacted in every spelling), redirects (never to another origin), the total deadline per request, the early
stop and progress, and the paper preset's judge call (the official's max_tokens, tries and retries)."""
import json
import re
import subprocess
import threading
import time
import urllib.parse
from argparse import Namespace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from test_eval import FakeJudgeServer, demo_checkpoint, read_report, run_eval, toy  # noqa: F401 (toy is a fixture)
from test_train_sh import PAPER_DATA, dry_run

evaluate = __import__("eval")


class Endpoint:
    """An HTTP server on 127.0.0.1 (port 0) whose every reply `reply(handler, request)` decides: it returns
    (status, headers, payload), or writes the reply itself and returns None. A request is a dict of method, path,
    headers, body (JSON) and answer (the model answer inside the judge prompt); all are kept in .requests."""

    def __init__(self, reply):
        self.requests, self.lock, self.closing = [], threading.Lock(), threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.loads(raw) if raw else None
                content = body["messages"][0]["content"] if body else ""
                answer = content.split('Model Response: "')[1].split('"\n')[0] if 'Model Response: "' in content else None
                req = {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body, "answer": answer}
                with server.lock:
                    server.requests.append(req)
                self.closing = server.closing  # set when the test is done: a reply that waits should end
                out = reply(self, req)
                if out is not None:
                    code, headers, payload = out
                    self.send_response(code)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)

            do_GET = do_POST

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.url = self.origin + "/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def calls(self, answer):
        return [r for r in self.requests if r["answer"] == answer]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.closing.set()  # ends the replies that wait
        self.httpd.shutdown()
        self.httpd.server_close()


def scored(n, template="qi"):
    reply = f"#thereason: ok\n#thescore: {n}" if template == "qi" else f"#thescore: {n}"
    return 200, {"Content-Type": "application/json"}, json.dumps({"choices": [{"message": {"content": reply}}]}).encode()


def harmful_records(answers):
    return [{"model": "m", "attack_step": 0, "set": "s", "kind": "harmful", "prompt": "p", "answer": a, "reference": None,
             "n_tokens": 1} for a in answers]


def spellings(key):
    """Ways a key could show up in text: as is, escaped (repr, JSON), URL-quoted, and every 8 characters of it."""
    k = key.strip()
    return {key, k, repr(key)[1:-1], json.dumps(key)[1:-1], urllib.parse.quote(key, safe=""), urllib.parse.quote(k, safe="")} | \
        {k[i:i + 8] for i in range(len(k) - 7)}


def leaked(key, text):
    return sorted(s for s in spellings(key) if s in text)


# --- 1. the key: stripped, refused with a control character inside, redacted in every spelling -----------

@pytest.mark.parametrize("end", ["\n", "\r\n"])
def test_a_key_pasted_with_a_line_break_is_stripped_and_never_written(end, tmp_path, toy):
    ckpt, out = demo_checkpoint(tmp_path / "ckpt"), tmp_path / "out"
    key = "sk-live-Qx7Zt9Lm3Vb8Np2Rw4" + end  # a key read from a file, or from a Windows .env
    with FakeJudgeServer() as srv:
        r = run_eval(["--model", ckpt, "--eval-data", f"h={toy['eval_harmful']}", "--limit", 4, "--eval-at", 0, "--greedy",
                      "--max-new-tokens", 4, "--judge", "llm", "--judge-tries", 2, "--out", out], check=False,
                     env={"JUDGE_URL": srv.url, "JUDGE_MODEL": "judge-1", "JUDGE_API_KEY": key})
    assert r.returncode == 0, r.stderr[-3000:]
    assert srv.auth == {f"Bearer {key.strip()}"}  # the key was sent, stripped
    report, gens = read_report(out)
    assert [(g["score"], g["judge_error"]) for g in gens] == [(1, None)] * 4  # the fake judge scores these answers 1
    for name, text in [("stdout", r.stdout), ("stderr", r.stderr)] + [(f.name, f.read_text()) for f in out.iterdir()
                                                                      if f.suffix in (".json", ".jsonl", ".md")]:
        assert not leaked(key, text), (name, leaked(key, text))


def test_every_spelling_of_the_key_is_redacted():
    key = 'sk-Ab/Cd+Ef=Gh"Ij\\Kl~0123456789'  # characters that escaping and URL-quoting spell otherwise
    judge = evaluate.LLMJudge("http://127.0.0.1:9/v1", "judge-1", key + "\r\n")
    texts = [key, repr(key), json.dumps(key), urllib.parse.quote(key, safe=""), urllib.parse.quote_plus(key),
             urllib.parse.quote(key), key.encode("unicode_escape").decode(), repr(key.encode()), repr(key + "\r\n"),
             f"Invalid header value b'Bearer {key}\\r\\n'", "cut: " + key[:12], key[-9:] + " ...", json.dumps({"auth": key})]
    for text in texts:
        clean = judge._redact(text)
        assert "***" in clean and not leaked(key, clean), (text, clean)
    assert judge._redact("nothing secret here") == "nothing secret here"


def test_an_echoed_key_is_redacted_in_replies_and_http_errors():
    key = "sk-proj+" + "Zq9/" * 25 + "=="  # base64-like (URL-quoting spells it otherwise), longer than an excerpt

    def echo(h, req):  # a broken proxy that echoes the request headers, in a reply or in an error page
        auth = req["headers"]["Authorization"]
        if req["answer"] == "[error]":
            return 403, {}, json.dumps({"error": f"forbidden for {auth}", "quoted": urllib.parse.quote(auth)}).encode()
        return 200, {}, json.dumps({"choices": [{"message": {"content": f"you sent {auth!r}"}}]}).encode()
    with Endpoint(echo) as srv:
        judge = evaluate.LLMJudge(srv.url, "judge-1", key + "\n", retries=0)
        results = judge.judge_all([("p", "[reply]"), ("p", "[error]")])
    assert all(score is None for score, _ in results)
    assert results[0][1].startswith("malformed") and results[1][1].startswith("HTTP 403")
    for _, error in results:
        assert not leaked(key, error), error


@pytest.mark.parametrize("var,value", [("JUDGE_API_KEY", "sk-abc\ndef-0123456789"), ("JUDGE_API_KEY", "sk-abc\tdef-0123456789"),
                                       ("OPENAI_API_KEY", "sk-abc\x1bdef-0123456789\r\n")])
def test_a_key_with_a_control_character_inside_is_a_usage_error(var, value, tmp_path, toy, monkeypatch, capsys):
    ckpt = demo_checkpoint(tmp_path / "ckpt")
    monkeypatch.delenv("JUDGE_API_KEY", raising=False)
    monkeypatch.setenv(var, value)
    with pytest.raises(SystemExit) as e:  # at parse time: before any model is loaded or attacked
        evaluate.parse_args(["--model", str(ckpt), "--eval-data", str(toy["eval_harmful"]), "--eval-at", "0", "--judge", "llm",
                             "--judge-model", "judge-1", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert e.value.code == 2 and len(lines) == 1 and var in lines[0] and "control" in lines[0], err
    assert not leaked(value, err), err
    with pytest.raises(ValueError) as e:  # the class refuses it too
        evaluate.LLMJudge("http://127.0.0.1:9/v1", "judge-1", value)
    assert not leaked(value, str(e.value))


def test_judge_llm_without_a_model_is_a_usage_error(tmp_path, toy, monkeypatch, capsys):
    ckpt = demo_checkpoint(tmp_path / "ckpt")
    monkeypatch.delenv("JUDGE_MODEL", raising=False)
    with pytest.raises(SystemExit) as e:  # no silent gpt-4o
        evaluate.parse_args(["--model", str(ckpt), "--eval-data", str(toy["eval_harmful"]), "--eval-at", "0", "--judge", "llm",
                             "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--judge-model" in err and "JUDGE_MODEL" in err, err


# --- 2. redirects: never to another origin, never turning the POST into a GET ------------------------------

def test_a_redirect_never_takes_the_key_to_another_origin():
    with Endpoint(lambda h, req: scored(5)) as other:  # it would score every answer 5
        def judge_server(h, req):
            if req["path"] == "/v2/chat/completions":
                return scored(4)
            code, where = re.match(r"\[(\d+) (\w+)\]", req["answer"]).groups()
            to = other.url + "/chat/completions" if where == "away" else "/v2/chat/completions"
            return int(code), {"Location": to}, b""
        with Endpoint(judge_server) as srv:
            judge = evaluate.LLMJudge(srv.url, "judge-1", "sk-redirect-test-key", retries=3, backoff=0)
            answers = ["[302 away]", "[307 away]", "[308 away]", "[307 here]", "[308 here]", "[301 here]", "[302 here]", "[303 here]"]
            by = dict(zip(answers, judge.judge_all([("p", a) for a in answers])))
    assert other.requests == []  # the other origin never saw a request, so never the key, and nothing of it was scored
    for a in ("[302 away]", "[307 away]", "[308 away]"):
        score, error = by[a]
        assert score is None and srv.origin in error and other.origin in error and "another origin" in error, (a, error)
        assert len(srv.calls(a)) == 1  # not retried: the next try would be redirected the same way
    for a in ("[307 here]", "[308 here]"):  # within the origin, keeping the POST, its body and the key
        assert by[a] == (4, None)
        first, second = srv.calls(a)
        assert second["method"] == "POST" and second["body"] == first["body"] and second["headers"]["Authorization"] == \
            "Bearer sk-redirect-test-key"
    for a in ("[301 here]", "[302 here]", "[303 here]"):
        score, error = by[a]
        assert score is None and "POST into a GET" in error and len(srv.calls(a)) == 1, (a, error)


def test_the_environments_proxy_carries_the_request_as_urllibs_would(monkeypatch):
    with Endpoint(lambda h, req: scored(3)) as proxy:
        for var in ("no_proxy", "NO_PROXY", "HTTP_PROXY"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("http_proxy", proxy.origin.replace("http://", "http://user:p%40ss@"))
        assert evaluate.LLMJudge("http://judge.invalid:8000/v1", "judge-1", "sk-proxy-test").judge("p", "a") == (3, None)
        monkeypatch.setenv("no_proxy", "judge.invalid")  # bypassed: the name does not resolve
        score, error = evaluate.LLMJudge("http://judge.invalid:8000/v1", "judge-1", None, retries=0).judge("p", "a")
    (req,) = proxy.requests
    assert req["path"] == "http://judge.invalid:8000/v1/chat/completions" and score is None
    assert req["headers"]["Proxy-Authorization"] == "Basic dXNlcjpwQHNz"  # user:p@ss


# --- 3. a total deadline per request, progress, and the early stop -----------------------------------------

def drip(start):
    """A reply sent one byte per 0.5 s (for 10 s at most): from its status line on, or after whole headers."""
    def reply(h, req):
        body = json.dumps({"choices": [{"message": {"content": "#thereason: ok\n#thescore: 5"}}]}).encode()
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        h.close_connection = True
        if start == "body":
            h.wfile.write(head)
        end = time.monotonic() + 10
        for byte in (head + body if start == "status" else body):
            if time.monotonic() > end or h.closing.is_set():
                return
            try:
                h.wfile.write(bytes([byte]))
            except OSError:
                return
            time.sleep(0.5)
    return reply


@pytest.mark.parametrize("start", ["status", "body"])
def test_a_dripping_reply_is_cut_at_the_total_deadline(start):
    with Endpoint(drip(start)) as srv:
        judge = evaluate.LLMJudge(srv.url, "judge-1", None, retries=1, backoff=0, timeout=1)
        t = time.monotonic()
        score, error = judge.judge("p", "a")
        took = time.monotonic() - t
    assert score is None and "TimeoutError" in error and "within 1 s" in error and "gave up after 2 tries" in error, error
    assert 1.9 < took < 4, took  # two tries of 1 s each, not the 10 s the server would drip for
    assert len(srv.requests) == 2


def test_a_silent_judge_stops_early_with_progress(capsys):
    with Endpoint(lambda h, req: h.closing.wait(30) and None) as srv:  # never answers
        judge = evaluate.LLMJudge(srv.url, "judge-1", None, concurrency=4, retries=1, backoff=0, timeout=0.3,
                                  progress_every=0.2)
        recs = harmful_records([f"answer {i}" for i in range(40)])
        t = time.monotonic()
        evaluate.score_records(recs, Namespace(refusal_phrases="extended"), judge)
        took = time.monotonic() - t
    out, err = capsys.readouterr()
    # the first 4 answers (LLMJudge.EARLY_STOP) failed alike after both their tries: the rest are not tried
    assert took < 5 and len(srv.requests) <= 2 * 8 + 2 * 4, (took, len(srv.requests))  # not 40 x 2 tries of 0.3 s / 4
    assert "WARNING: the LLM judge failed on each of the first" in err and "TimeoutError" in err, err
    errors = [r["judge_error"] for r in recs]
    assert all(e is not None for e in errors) and all(r["score"] is None for r in recs)
    assert sum(e.startswith("not judged (stopped early") for e in errors) >= 40 - 12
    assert re.search(r"judging \| \d+/40 answers \| \d+ errors \| \d+s", out), out  # a progress line


def test_judging_prints_progress(capsys):
    with Endpoint(lambda h, req: (time.sleep(0.15), scored(2))[1]) as srv:
        judge = evaluate.LLMJudge(srv.url, "judge-1", None, concurrency=2, progress_every=0.2)
        recs = harmful_records([f"answer {i}" for i in range(10)])
        evaluate.score_records(recs, Namespace(refusal_phrases="extended"), judge)
    out = capsys.readouterr().out
    counts = [int(k) for k in re.findall(r"judging \| (\d+)/10 answers \| 0 errors", out)]
    assert len(counts) >= 2 and counts == sorted(counts), out
    assert [r["score"] for r in recs] == [2] * 10


def test_a_silent_judge_ends_the_program_quickly_and_loudly(tmp_path, toy):
    """A judge that never answers is found by the one request sent before any attack: one line, nothing attacked.
    One that answers that request and then goes silent stops after the first few answers fail alike
    (LLMJudge.EARLY_STOP), each bounded by --judge-timeout: the program ends with an error, the answers kept."""
    ckpt, out = demo_checkpoint(tmp_path / "ckpt"), tmp_path / "out"
    argv = ["--model", ckpt, "--eval-data", f"h={toy['eval_harmful']}", "--limit", 40, "--eval-at", 0, "--greedy",
            "--max-new-tokens", 2, "--judge", "llm", "--judge-model", "judge-1", "--judge-tries", 2, "--judge-timeout", "0.5"]
    with Endpoint(lambda h, req: h.closing.wait(60) and None) as srv:  # never answers
        t = time.monotonic()
        r = run_eval([*argv, "--out", out], check=False, env={"JUDGE_URL": srv.url})
        took = time.monotonic() - t
    assert r.returncode == 1 and "cannot judge: no complete reply within 0.5 s" in r.stderr, r.stderr[-3000:]
    assert "nothing was attacked" in r.stderr and len(srv.requests) == 1 and took < 30 and not (out / "parts").exists()
    with Endpoint(lambda h, req: scored(1) if len(srv.requests) == 1 else h.closing.wait(60) and None) as srv:
        t = time.monotonic()
        r = run_eval([*argv, "--out", out], check=False, env={"JUDGE_URL": srv.url})
        took = time.monotonic() - t
    assert r.returncode == 1 and "every one of 40 judge calls failed" in r.stderr, r.stderr[-3000:]
    stopped = re.search(r"WARNING: the LLM judge failed on each of the first (\d+) of 40 answers", r.stderr)
    assert stopped and int(stopped.group(1)) >= 4, r.stderr[-3000:]
    # the probe, 4 answers x 2 tries, and the tries of those under way when it stopped: not 40 x 2
    assert len(srv.requests) <= 1 + 4 * 2 + 8 * 2 and took < 30, (len(srv.requests), took)
    _, gens = read_report(out)
    assert all(g["judge_error"] and g["score"] is None for g in gens)
    assert any("TimeoutError: no complete reply within 0.5 s" in g["judge_error"] for g in gens)


# --- 4. the paper preset's judge call is the official one -----------------------------------------------

def test_the_paper_presets_judge_call_is_the_officials():
    *_, (_, script, _, argv) = dry_run(**{**PAPER_DATA, "PRESET": "paper", "NPROC": "1", "JUDGE_MODEL": "qwen3-max"})
    judge_argv = [w for i, flag in enumerate(argv) if flag.startswith("--judge") for w in argv[i:i + 2]]
    assert script == "eval.py" and "--judge-max-tokens" in judge_argv

    def reply(h, req):  # "[bad]": HTTP 400 every time; "[late]": HTTP 400 on the first 19 tries, then a score
        if req["answer"] == "[bad]" or len(srv.calls(req["answer"])) < 20:
            return 400, {}, b'{"error": "bad request"}'
        return scored(5, "official")
    with Endpoint(reply) as srv:
        args = evaluate.get_parser().parse_args(judge_argv + ["--judge-url", srv.url])
        judge = evaluate.make_judge(args)
        judge.backoff = 0  # the official sleeps min(2^(t-1), 30) s between tries; a test need not
        (bad, late) = judge.judge_all([("p", "[bad]"), ("p", "[late]")])
    body = srv.requests[0]["body"]
    assert (body["max_tokens"], body["temperature"], body["model"]) == (512, 0, "qwen3-max")
    assert (judge.timeout, judge.retries + 1, judge.retry, judge.template) == (60, 20, "all", "official")
    assert late == (5, None) and len(srv.calls("[late]")) == 20  # a 400 is retried, up to the 20th try
    assert bad[0] is None and bad[1].startswith("HTTP 400") and "gave up after 20 tries" in bad[1], bad  # never a guess
    assert len(srv.calls("[bad]")) == 20
    with pytest.raises(subprocess.CalledProcessError) as e:  # the preset names no judge model of its own
        dry_run(PRESET="paper", **{k: v for k, v in PAPER_DATA.items() if k != "JUDGE_MODEL"})
    assert e.value.returncode == 2 and "set JUDGE_MODEL" in e.value.stderr
    # the default sends no max_tokens and gives up on a 400 at once
    with Endpoint(lambda h, req: (400, {}, b"{}")) as srv:
        score, error = evaluate.LLMJudge(srv.url, "judge-1").judge("p", "a")
    assert "max_tokens" not in srv.requests[0]["body"] and len(srv.requests) == 1 and error.startswith("HTTP 400")


def test_an_answer_has_one_deadline_over_all_its_tries():
    """--judge-deadline: a judge that keeps failing (HTTP 500) is not asked for an answer 50 times x the backoff: the
    answer gives up at its deadline, as a judge error (a rerun asks again: errors are not kept)."""
    with Endpoint(lambda h, req: (500, {}, b"busy")) as srv:
        judge = evaluate.LLMJudge(srv.url, "judge-1", None, retries=49, backoff=0.05, deadline=0.5)
        t = time.monotonic()
        score, error = judge.judge("p", "a")
        took = time.monotonic() - t
    assert score is None and "gave up at the deadline of 0.5 s" in error and took < 2.5, (error, took)
    assert 2 <= len(srv.requests) < 50
