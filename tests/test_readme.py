"""The README as a newcomer reads it: a first screen that fits a screen, lines that fit a terminal, every file and
figure it names present in the repository. (The Quick start's commands, run on a clone, write every file it names:
tests/test_clone.py.)"""
import re

from conftest import ROOT

README = (ROOT / "README.md").read_text()
LINES = README.splitlines()


def section(title):
    """The lines of the `## title` section, without its heading."""
    start = LINES.index(f"## {title}") + 1
    end = next((i for i in range(start, len(LINES)) if LINES[i].startswith("## ")), len(LINES))
    return LINES[start:end]


def quick_start_files(command):
    """The paths named in the Quick start bullet about `command`, relative to the run directory it names
    (runs/patcher/ or runs/demo/): what that command promises to write."""
    text = " ".join(section("Quick start"))
    bullet = re.search(rf"- `{re.escape(command)}`(.*?)(?= - `|$)", text)
    assert bullet, f"the Quick start has no bullet for {command}"
    out = re.search(r"`(runs/[a-z]+/)", bullet[1])[1]
    names = [n.removeprefix(out) for n in re.findall(r"`([^`\s]+\.(?:md|png|jsonl|json)|[^`\s]+/)`", bullet[1])]
    return out, [n for n in names if n]


def test_the_first_screen_says_what_this_is_what_to_run_and_what_it_found():
    first = LINES[:LINES.index("## The demo's world")]
    assert len(first) <= 40, len(first)
    text = "\n".join(first)
    for must in ("arxiv.org/abs/2606.07970", "github.com/haomingwen/Patcher", "## Quick start", "python patcher.py",
                 "./train.sh", "| Patcher |", "| SFT"):
        assert must in text, must


def test_no_line_is_wider_than_a_terminal():
    wide = [(i, len(line)) for i, line in enumerate(LINES, 1) if len(line) > 120]
    assert not wide, wide


def test_every_file_and_figure_the_readme_names_is_in_the_repository():
    named = set(re.findall(r"\]\(((?:tests|[A-Za-z_]+\.)[^)\s]*)\)", README))  # links and figures
    named |= {p.rstrip(".,:;") for p in re.findall(r"(?<![\w/$])((?:tests|\.ci)/[\w./-]+)", README)}  # paths
    named |= set(re.findall(r"`([a-z_]+\.(?:py|sh))\b", README))
    missing = sorted(p for p in named if not (ROOT / p.split("::")[0].split(" ")[0]).exists())
    assert not missing and len(named) > 15, (missing, len(named))
    assert (ROOT / "LICENSE").exists() and "@misc{" in README
