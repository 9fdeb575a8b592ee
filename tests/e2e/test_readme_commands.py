"""Every command of README.md's ```bash blocks runs as written, so the documentation cannot drift from the code.

The commands are read from the README (a line ending in a backslash continues; `&&` chains are split; `#`
comments dropped), classified, and run in order in one working directory that mirrors the repository (its
top-level entries linked in), so a later command finds what an earlier one made (`tok/`, `runs/shakespeare`,
`models/tiny`) and nothing is written into the repository. What is changed before running, and only that:

- training launches get `train.steps=2` appended, or their own `train.steps` set to 4 (a resumed run that is
  extended still trains more), `tools/bench.py train-step` `--steps 2 --warmup 1`, and torchrun / deepspeed a
  free `--master_port`;
- `slurm/submit.py` submissions get `--dry-run` (everything is checked, nothing queued: there is no cluster
  in this test);
- `python`, `torchrun`, `deepspeed` are this interpreter's.

A few files a user would bring are provided (`_fixtures`: a corpus of text files in sub-directories, JSONL,
parquet), and `.cache/tessera` / `data_cache` are the session's shared corpus cache. What cannot run here is
skipped with its reason, listed by `SKIP_REASONS`: a usage synopsis, installs, the test suite itself (and a
command a test of its own runs as written), the local cluster's daemons (root), GPU-only settings, follow-ups of
a real SLURM job, more than `MAX_RANKS` processes, and paths that name a user's own models or files the README
never creates. A failing command fails the test with its README line number and the end of its output.
"""

from __future__ import annotations

import glob
import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path, PurePath

import pytest

from slurm.profile import local_cluster_up
from tests.conftest import REPO, child_env, free_port
from train.data.corpus import ensure_shakespeare

README = REPO / "README.md"
MAX_RANKS = 4
"""The most processes one launch may start here (2 cores); larger launches are skipped."""
TIMEOUT_S = 420
"""Per command; a hang is a failure."""
RUN_TIMEOUT_S = 1800
"""pytest-timeout for the whole run (a hang guard, not a speed target). Measured: 578 s and 520 s on the 2-core
machine while other test runs shared it (README.md, Tests)."""
SKIP_REASONS = {
    "synopsis": "a usage synopsis ([optional] parts, placeholders), not a command",
    "install": "installs or downloads packages: CI's environment step, not repeatable offline",
    "tests": "runs the test suite itself",
    "covered": "runs as it is in a test of its own (tools/gpu/check.sh --dry-run: tests/e2e/test_gpu_check.py)",
    "cluster": "starts / stops the local SLURM cluster's daemons as root (tests/slurm/test_cluster.py does)",
    "gpu": "needs a GPU (CUDA-only kernels, a GPU DeepSpeed config or GPU launcher)",
    "job": "follows up a job on a real SLURM cluster (none here)",
    "no_cluster": "chooses its profile from the local SLURM cluster, which is not up here",
    "ranks": f"starts more than {MAX_RANKS} processes: beyond this machine (tests/parity covers the layouts)",
    "user_file": "names a user's own model or file, or a longer run's checkpoint, that no earlier command creates",
}
GPU_DS_CONFIGS = ("h100", "rtx4090", "rtx3060")
"""DeepSpeed configs (ds_configs/) written for GPUs."""
GPU_WORDS = ("--num_gpus", "fused_linear_cross_entropy=true")
"""Words that ask for a GPU: the GPU launcher flag, CUDA-only kernels."""
OUTPUT_OPTIONS = ("--out", "--json", "--shakespeare", "--folder")
OUTPUT_KEYS = ("train.out_dir", "data.cache_dir", "data.prepared_dir")
PATH_SUFFIXES = (".yaml", ".yml", ".json", ".jsonl", ".txt", ".parquet", ".safetensors")
TRAIN_LAUNCHERS = ("torchrun", "deepspeed")


@dataclass
class Command:
    line: int  # README line where the command starts
    text: str  # as written (continuations joined, comment dropped)
    argv: list[str]  # shell words

    def __str__(self) -> str:
        return f"README.md:{self.line}: {self.text}"


def readme_commands(text: str) -> list[Command]:
    """The commands of every ```bash block, in order, with their line numbers."""
    commands: list[Command] = []
    in_bash, pending, start = False, "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("```"):
            in_bash = stripped == "```bash" and not in_bash
            continue
        if not in_bash:
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        words = shlex.split(pending + stripped, comments=True)
        pending = ""
        chain: list[str] = []
        for word in [*words, "&&"]:
            if word != "&&":
                chain.append(word)
            elif chain:
                commands.append(Command(start, shlex.join(chain), chain))
                chain = []
    return commands


def _ranks(argv: list[str]) -> int:
    for flag in ("--nproc_per_node", "--num_accelerators", "--num_gpus"):
        if flag in argv:
            return int(argv[argv.index(flag) + 1])
    return 1


def _value(argv: list[str], option: str) -> str | None:
    return argv[argv.index(option) + 1] if option in argv[:-1] else None


def _path_like(word: str) -> bool:
    return ("/" in word or PurePath(word).suffix in PATH_SUFFIXES) and "://" not in word


def input_paths(argv: list[str]) -> list[str]:
    """The paths a command reads: positional words, option values and override values that look like paths,
    except outputs (`--out`, `train.out_dir=`, caches)."""
    found: list[str] = []
    skip_next = False
    for i, word in enumerate(argv[1:], start=1):
        if skip_next:
            skip_next = False
            continue
        if word in OUTPUT_OPTIONS:
            skip_next = True
            continue
        if word.startswith("-"):
            continue
        if "=" in word and not word.startswith(("/", ".")):
            key, value = word.split("=", 1)
            if key in OUTPUT_KEYS:
                continue
            values = [v.strip() for v in value.strip("[]").split(",")] if value.startswith("[") else [value]
            found += [v for v in values if v and _path_like(v)]
        elif _path_like(word) and not (i > 1 and argv[i - 1] in OUTPUT_OPTIONS):
            found.append(word)
    return found


def classify(cmd: Command) -> str:
    """The command's kind: one of SKIP_REASONS' keys (a kind that is never run), or 'train', 'tool', 'submit'."""
    argv, text = cmd.argv, cmd.text
    if any(w.startswith("[") for w in argv) or "|" in text:
        return "synopsis"
    if argv[0] in ("pip", "uv") or argv[:3] == ["python", "-m", "pip"]:
        return "install"
    if argv[:3] == ["python", "-m", "pytest"]:
        return "tests"
    if argv[0] == "tools/gpu/bundle.sh":
        return "install"
    if argv[0] == "tools/gpu/check.sh":
        return "covered" if "--dry-run" in argv else "gpu"
    if argv[0] == "sudo" or any(w.endswith("local_cluster.sh") for w in argv):
        return "cluster"
    if any(w in GPU_WORDS for w in argv) or _value(argv, "--ds_config") in GPU_DS_CONFIGS or \
            _value(argv, "--device") == "cuda":
        return "gpu"
    if argv[:2] == ["python", "slurm/submit.py"]:
        if len(argv) > 2 and argv[2] in ("status", "tail", "cancel"):
            return "job"
        followup = len(argv) > 2 and argv[2] in ("summary", "profiles")
        return "submit" if followup or "--profile" in argv or local_cluster_up() else "no_cluster"
    if _ranks(argv) > MAX_RANKS:
        return "ranks"
    if "train/main.py" in argv:
        return "train"
    if argv[0] == "python" and len(argv) > 1 and argv[1].startswith("tools/"):
        return "tool"
    raise AssertionError(f"{cmd}: no kind for this command; teach tests/e2e/test_readme_commands.py")


def runnable(cmd: Command, kind: str) -> list[str]:
    """The argv actually run (see the module doc for what is changed)."""
    argv = list(cmd.argv)
    if argv[0] == "python":
        argv[0] = sys.executable
    elif argv[0] == "torchrun":
        argv[:1] = [sys.executable, "-m", "torch.distributed.run", "--master_port", str(free_port())]
    elif argv[0] == "deepspeed":
        argv[:1] = [str(Path(sys.executable).parent / "deepspeed"), "--master_port", str(free_port())]
    if kind == "train":
        # a command that sets its own count (extending a resumed run) still trains more than the others' 2 steps
        explicit = [i for i, w in enumerate(argv) if w.startswith("train.steps=")]
        for i in explicit:
            argv[i] = "train.steps=4"
        if not explicit:
            argv.append("train.steps=2")
    elif kind == "tool" and argv[1:3] == ["tools/bench.py", "train-step"]:
        argv += ["--steps", "2", "--warmup", "1"]
    elif kind == "submit" and "--dry-run" not in argv and "profiles" not in argv and "summary" not in argv:
        argv.append("--dry-run")
    return argv


def _missing_input(cmd: Command, workdir: Path) -> str | None:
    for path in input_paths(cmd.argv):
        target = workdir / path
        if not (glob.glob(str(target)) if glob.has_magic(path) else target.exists()):
            return path
    return None


def _fixtures(workdir: Path, works: list[Path]) -> None:
    """What a user brings: text files in sub-directories, JSONL and parquet (from Shakespeare's works)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for i, work in enumerate(works[:12]):
        sub = workdir / "my_texts" / ("comedies" if i % 2 else "tragedies")
        sub.mkdir(parents=True, exist_ok=True)
        shutil.copy(work, sub / work.name.replace("_gut.txt", ".txt"))
    (workdir / "my_texts" / "cover.jpg").write_bytes(b"\xff\xd8\xff")  # skipped by type, with a count
    (workdir / "corpus").mkdir()
    for work in works[12:16]:
        shutil.copy(work, workdir / "corpus" / work.name)
    (workdir / "docs").mkdir()
    for work in works[16:18]:
        paragraphs = [p for p in work.read_text(encoding="utf-8").split("\n\n") if p.strip()]
        (workdir / "docs" / f"{work.stem}.jsonl").write_text(
            "".join(json.dumps({"text": p}) + "\n" for p in paragraphs), encoding="utf-8")
    pq.write_table(pa.table({"text": works[18].read_text(encoding="utf-8").split("\n\n")}),
                   workdir / "more.parquet")


@pytest.fixture
def workdir(tmp_path: Path, data_cache: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in (".git", ".cache", "runs", "models", "data_cache", "data", "tok") and \
                not entry.name.startswith(".venv"):
            (work / entry.name).symlink_to(entry)
    (work / ".cache").mkdir()
    (work / ".cache" / "tessera").symlink_to(data_cache)
    (work / "data_cache").symlink_to(data_cache)
    _fixtures(work, ensure_shakespeare(data_cache))
    return work


def test_every_readme_command_has_a_kind() -> None:
    """Cheap, in the fast tier: a README command of a kind the harness does not know fails here first."""
    commands = readme_commands(README.read_text(encoding="utf-8"))
    assert len(commands) > 20
    kinds = {classify(c) for c in commands}
    assert {"train", "tool", "submit"} <= kinds <= {"train", "tool", "submit", *SKIP_REASONS}


def test_readme_parsing_and_classification() -> None:
    text = "x\n```bash\npython train/main.py \\\n    train.lr=1  # note\npip install -e . && python -m pytest\n" \
           "```\n```yaml\nnot: a command\n```\n"
    commands = readme_commands(text)
    assert [(c.line, c.argv) for c in commands] == [(3, ["python", "train/main.py", "train.lr=1"]),
                                                     (5, ["pip", "install", "-e", "."]),
                                                     (5, ["python", "-m", "pytest"])]
    assert [classify(c) for c in commands] == ["train", "install", "tests"]
    assert input_paths(shlex.split("python tools/prepare_data.py docs/*.jsonl --tokenizer tok/ --out data/m "
                                   "hf.path=models/x 'data.files=[a.jsonl, b.txt]' train.out_dir=runs/y")) == [
        "tools/prepare_data.py", "docs/*.jsonl", "tok/", "models/x", "a.jsonl", "b.txt"]


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S)
def test_readme_commands_run(workdir: Path, tmp_path: Path) -> None:
    env = child_env(tmp_path)
    env["PYTHONPATH"] = str(REPO)
    commands = readme_commands(README.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    report, failures = [], []
    began = time.monotonic()
    for cmd in commands:
        kind = classify(cmd)
        if kind in SKIP_REASONS:
            report.append(f"skip ({kind}) {cmd}")
            continue
        if cmd.text in seen:
            report.append(f"skip (same as README.md:{seen[cmd.text]}) {cmd}")
            continue
        seen[cmd.text] = cmd.line
        missing = _missing_input(cmd, workdir)
        if missing is not None:
            report.append(f"skip (user_file: {missing}) {cmd}")
            continue
        start = time.monotonic()
        try:
            proc = subprocess.run(runnable(cmd, kind), cwd=workdir, env=env, capture_output=True, text=True,
                                  timeout=TIMEOUT_S, check=False)
            code, tail = proc.returncode, (proc.stderr.strip() or proc.stdout.strip())[-1500:]
        except subprocess.TimeoutExpired:
            code, tail = "timeout", f"no end after {TIMEOUT_S} s"
        report.append(f"{'ok' if code == 0 else 'FAIL'} {time.monotonic() - start:5.1f} s {cmd}")
        if code != 0:
            failures.append(f"{cmd}\n  exit {code}:\n    " + "\n    ".join(tail.splitlines()[-12:]))
    elapsed = time.monotonic() - began
    print("\n".join(report) + f"\ntotal {elapsed:.0f} s")
    assert not failures, f"{len(failures)} README commands fail:\n" + "\n".join(failures)

