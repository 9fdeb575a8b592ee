"""What may reach the sbatch script: option names, one-line values, setup lines that stay shell lines.

submitit writes the job as a bash script: one ``#SBATCH --key=VALUE`` line per parameter (the value quoted
with ``shlex.quote``), then the setup lines as given, then ``srun ... -m submitit.core._submit FOLDER``.
sbatch reads ``#SBATCH`` lines until the first line that is not a comment; bash runs the rest. A newline in a
key or value ends the directive and turns what follows into a shell line, which runs; a setup line that is an
``#SBATCH`` line still counts as a directive (only comments precede it); a setup line that opens a
here-document, a quote or a compound command swallows the training command. Every value that reaches the
script passes these checks (in slurm/profile.py, slurm/options.py, slurm/plan.py, slurm/stages.py), so a bad
one is one ``tessera: error`` line naming the option and the value, before anything is queued.

The rules:
- a key is an sbatch option name: words of letters and digits joined by ``-`` or ``_`` (``mail-type``),
  without the leading ``--``; a key Tessera sets itself (``time``, ``signal``, ``job-name``, ...) is refused
  with the option that sets it, since a second value would silently replace Tessera's (a ``signal`` key would
  end the USR2 warning that triggers preemption checkpoints);
- a value is a string, a number or ``true`` (a flag): one line of printable characters, no backslash (sbatch
  reads it as an escape where bash's quoting keeps it) and no ``#SBATCH``;
- a setup line is one line that bash parses on its own (``bash -n``), opens no here-document and holds no
  ``#SBATCH``.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from typing import Any


class SlurmConfigError(ValueError):
    """A profile or job setting that cannot be submitted; the message names the field, the value and the
    fix."""


SBATCH_KEY = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_][A-Za-z0-9]+)*")
# sbatch options Tessera writes itself (submitit's names, underscores as dashes) -> the way to set them
RESERVED = {
    "job-name": "--name", "time": "--time", "nodes": "--nodes", "ntasks-per-node": "--ntasks-per-node",
    "gpus-per-node": "--gpus-per-node", "cpus-per-task": "--cpus-per-task", "mem": "--mem-gb",
    "partition": "--partition", "account": "--account", "qos": "--qos", "constraint": "--constraint",
    "signal": "--signal-delay-s", "array": "--sweep", "output": "--folder", "error": "--folder",
    "open-mode": "nothing (the logs are appended to across requeues)", "no-requeue": "--max-requeues",
    "exclude": "--exclude", "exclusive": "--exclusive", "gpus-per-task": "--gpus-per-task",
    "ntasks": "--nodes and --ntasks-per-node (Tessera runs the same number of tasks on every node)",
}
# sbatch options Tessera itself passes as submitit's extra parameters: a node range (MIN-MAX), which submitit's
# own integer `nodes` cannot hold
OWN_EXTRAS = {"nodes"}
DIRECTIVE = re.compile(r"#\s*SBATCH", re.IGNORECASE)
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_key(where: str, key: Any) -> str:
    """An sbatch option name; returns it as sbatch spells it (no leading ``--``, ``-`` for ``_``)."""
    if not isinstance(key, str):
        raise SlurmConfigError(f"{where} {key!r}: an sbatch option name must be a string, e.g. mail-type.")
    name = key.strip().lstrip("-")
    if not SBATCH_KEY.fullmatch(name):
        raise SlurmConfigError(f"{where} {key!r}: not an sbatch option name (letters, digits and '-', e.g. "
                               f"mail-type); see `man sbatch`.")
    name = name.replace("_", "-")
    owner = RESERVED.get(name.lower())
    if owner is not None:
        raise SlurmConfigError(f"{where} {key!r}: Tessera sets --{name} itself (use {owner}); a second value "
                               f"would silently replace it.")
    return name


def check_value(where: str, value: Any) -> None:
    """A value sbatch reads as one directive: a number, ``true``, or one line of printable text."""
    if value is True or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return
    if not isinstance(value, str):
        fix = "leave the key out to keep sbatch's default" if value in (None, False) else \
            "give a string, a number or true"
        raise SlurmConfigError(f"{where}={value!r}: not an sbatch value; {fix}.")
    if not value.strip():
        raise SlurmConfigError(f"{where}={value!r}: empty; give a value (or true for a flag).")
    problem = _line_problem(value)
    if problem is None and "\\" in value:
        problem = "a backslash, which sbatch reads as an escape"
    if problem is not None:
        raise SlurmConfigError(f"{where}={value!r}: the value holds {problem}; an sbatch value must be one "
                               f"line without it.")


def check_sbatch(where: str, params: Any) -> dict[str, Any]:
    """Further sbatch parameters (a profile's ``sbatch:`` mapping or ``--sbatch`` items); returns them with
    their keys as sbatch spells them."""
    if not isinstance(params, dict):
        raise SlurmConfigError(f"{where}={params!r}: expected a mapping of sbatch option names to values.")
    checked: dict[str, Any] = {}
    for key, value in params.items():
        name = check_key(where, key)
        check_value(f"{where} {name}", value)
        checked[name] = value
    return checked


def check_setup_line(where: str, line: Any) -> None:
    """A shell line run before the job: one line that bash parses by itself and that swallows nothing after
    it."""
    if not isinstance(line, str):
        raise SlurmConfigError(f"{where} {line!r}: a setup line must be a string (one shell command).")
    problem = _line_problem(line.replace("\t", " "))  # a tab is only a space to bash
    if problem is not None:
        raise SlurmConfigError(f"{where} {line!r}: the line holds {problem}; give each command as its own "
                               f"setup line.")
    try:
        shlex.split(line, comments=True)
    except ValueError as e:
        raise SlurmConfigError(f"{where} {line!r}: not valid shell ({e}); fix the quoting.") from None
    bash = shutil.which("bash")
    if bash is None:
        return
    out = subprocess.run([bash, "-n", "-c", line], capture_output=True, text=True, timeout=30, check=False)
    said = re.sub(r"^\S*bash: (-c: )?(line \d+: )?", "", " ".join(out.stderr.split()))
    if out.returncode != 0 or said:
        raise SlurmConfigError(f"{where} {line!r}: bash cannot run it as one line "
                               f"({said or out.returncode}); close every quote, here-document and "
                               f"if/for/while on the same line.")


def check_parameters(params: dict[str, Any]) -> None:
    """submitit's SlurmExecutor parameters of a job, just before they are rendered: every value once more."""
    for key, value in params.items():
        if key == "setup":
            for line in value:
                check_setup_line("setup line", line)
        elif key == "additional_parameters":
            check_sbatch("sbatch", {k: v for k, v in value.items() if k not in OWN_EXTRAS})
            for k in OWN_EXTRAS & set(value):
                check_value(f"--{k}", value[k])
        elif key == "srun_args":
            for arg in value:
                check_value("srun argument", arg)
        else:
            check_value(f"--{key.replace('_', '-')}", value)


def _line_problem(text: str) -> str | None:
    """What would end a directive or start another one in ``text`` (None: nothing)."""
    bad = CONTROL.search(text)
    if bad is not None:
        names = {"\n": "a newline", "\r": "a carriage return", "\t": "a tab", "\x00": "a NUL byte"}
        return names.get(bad.group(), f"the control character {bad.group()!r}")
    if DIRECTIVE.search(text):
        return "'#SBATCH'"
    return None
