"""A fuzzer over every file vlm reads from a stranger: each mutated checkpoint, export, index, metadata file and image
ends in a result or one error line, never a traceback, within bounded time and memory, and trips no wire.

The mutators, the loaders each kind of file goes through and the errors each loader may end in live in
``tests/fuzz_cases.py`` (:data:`fuzz_cases.TARGETS`, the one place to adjust them); see its docstring. Most cases run
in-process (in a child process with an address-space limit); a small sample goes through the real command-line
tools. Environment:

- ``VLM_FUZZ_CASES`` (default 1500): in-process cases, split over the kinds by :data:`fuzz_cases.SHARES`;
- ``VLM_FUZZ_SEED`` (default 0): which cases (each is ``random.Random(f"{seed}:{kind}:{case}")``);
- ``VLM_FUZZ_CLI_CASES`` (default 6): command-line runs (each covers one checkpoint or export or index, or a folder
  of mutated images and a mutated ``metadata.jsonl``);
- ``VLM_FUZZ_JOBS``, ``VLM_FUZZ_CASE_TIMEOUT``, ``VLM_FUZZ_MEMORY_MIB``, ``VLM_FUZZ_ADDRESS_SPACE_GIB``: see
  ``fuzz_cases.py``.

A failure names each class (status, step, exception, where it was raised) with its first case's kind, seed, case
number and mutators, the folder its files were kept in, and the command that reproduces it.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fuzz_cases as fc
import pytest

CASES = int(os.environ.get("VLM_FUZZ_CASES", "1500"))
SEED = int(os.environ.get("VLM_FUZZ_SEED", "0"))
CLI_CASES = int(os.environ.get("VLM_FUZZ_CLI_CASES", "6"))
CLI_TIMEOUT = 180  # seconds per command: a guard against hangs (a genuine run takes seconds, most of it imports)


@pytest.fixture(scope="session")
def fuzz_seeds(tmp_path_factory) -> Path:
    """The real files the other tests make, once per session: the seeds every case starts from."""
    return fc.make_seeds(tmp_path_factory.mktemp("fuzz-seeds"))


# ------------------------------------------------------------------------------------------------ the harness itself
def _file_maker(rng, seeds, out):
    (out / "case.bin").write_bytes(b"x")
    return out / "case.bin", "none", ["test"]


def _allocate(path, state):
    state["held"] = b"\x01" * (400 << 20)  # written, so the pages are resident


def _refuse(path, state):
    raise fc._cls(fc.CHECKPOINT_ERROR)("refused")


def _foreign(path, state):
    raise KeyError("a key the loader forgot")


def _imports(path, state):
    importlib.import_module(fc.TRIPWIRE_MODULE)


def _harness_records(seeds: Path, work: Path) -> dict[str, dict]:
    """Each behaviour through :func:`fuzz_cases.run_case`, the way a fuzz child runs a case (the test runs this in a
    fresh process: a long-lived one's freed memory would hide an allocation from the peak-resident measure)."""
    sys.path.insert(0, str(seeds / "planted"))
    fc._cls(fc.CHECKPOINT_ERROR)  # vlm and torch imported before the wires are set, as in a fuzz child
    behaviours = {
        "ok": (lambda path, state: None, ()),
        "refused": (_refuse, (fc.CHECKPOINT_ERROR,)),
        "fail": (_foreign, (fc.CHECKPOINT_ERROR,)),
        "timeout": (lambda path, state: time.sleep(20), ()),
        "memory": (_allocate, ()),
        "tripwire": (_imports, ()),
        "prompt": (lambda path, state: input("trust this file? "), ()),
    }
    targets = {name: (fc.Step(name, run, accepted),) for name, (run, accepted) in behaviours.items()}
    makers = dict.fromkeys(behaviours, _file_maker)
    with fc.tripwires():
        return {name: fc.run_case(name, 7, 3, seeds, work, {}, {}, targets, makers, timeout=3.0)
                for name in behaviours}


def test_the_harness_reports_each_way_a_case_can_go_wrong(fuzz_seeds, tmp_path):
    """A step that raises a foreign exception, runs past its time, takes memory, imports the planted module or asks
    on the terminal is reported as such; an accepted error and a result are not. Otherwise the fuzzer could pass
    while finding nothing."""
    code = ("import json, sys; from pathlib import Path; import test_fuzz_files as t; "
            "print(json.dumps(t._harness_records(Path(sys.argv[1]), Path(sys.argv[2]))))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fc.TESTS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code, str(fuzz_seeds), str(tmp_path)], cwd=fc.ROOT, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads(done.stdout.strip().splitlines()[-1])
    status = {name: r["status"] for name, r in records.items()}
    assert status == {"ok": "ok", "refused": "refused", "fail": "fail", "timeout": "timeout", "memory": "memory",
                      "tripwire": "tripwire", "prompt": "tripwire"}, records
    assert records["fail"]["error"] == "builtins.KeyError"
    assert "test_fuzz_files.py:_foreign" in records["fail"]["where"]
    assert records["memory"]["growth_mib"] >= 390
    assert "asked on the terminal" in records["prompt"]["message"]
    assert "imported fuzz_tripwire" in records["tripwire"]["message"]
    assert records["timeout"]["seconds"] < 10  # the 3 s alarm, well before the 20 s sleep ends
    # a failing case keeps its files and says how to reproduce it; a passing one leaves nothing behind
    assert Path(records["fail"]["kept"], "case.bin").exists()
    assert not (tmp_path / "ok-7-3").exists()
    report = fc.describe(list(records.values()), 7)
    assert "fail in fail: builtins.KeyError" in report and "--reproduce fail 7 3" in report


def test_mutators_are_deterministic_and_change_the_files(fuzz_seeds, tmp_path):
    """The same (seed, kind, case) makes the same file, so a reported case reproduces; different cases make
    different files, and most differ from their seed."""
    for kind, maker in fc.MAKERS.items():
        descriptions, changed = set(), 0
        for case in range(8):
            made = []
            for attempt in ("a", "b"):
                out = tmp_path / f"{kind}-{case}-{attempt}"
                out.mkdir()
                path, seed_file, mutators = maker(fc.case_rng(SEED, kind, case), fuzz_seeds, out)
                made.append((seed_file, mutators, _contents(path)))
            assert made[0] == made[1], f"{kind} case {case} is not reproducible"
            descriptions.add(json.dumps(made[0][1]))
            changed += made[0][2] != _contents(_seed_path(fuzz_seeds, kind, made[0][0]))
            shutil.rmtree(tmp_path / f"{kind}-{case}-a")
            shutil.rmtree(tmp_path / f"{kind}-{case}-b")
        assert len(descriptions) >= 6, f"{kind}: 8 cases made only {len(descriptions)} different mutations"
        assert changed >= 6, f"{kind}: only {changed} of 8 cases changed their seed"


def _contents(path: Path) -> object:
    """A file's bytes, a folder's files' contents, or what a special path is."""
    if path.is_symlink():
        return ("link", os.readlink(path))
    if path.is_dir():
        return {p.name: _contents(p) for p in sorted(path.iterdir())}
    if path.is_file():
        return path.read_bytes()
    return ("special", path.stat().st_mode if path.exists() else None)


def _seed_path(seeds: Path, kind: str, seed_file: str) -> Path:
    return {"checkpoint": seeds / f"{seed_file}.ckpt", "export": seeds / f"{seed_file}_export",
            "index": seeds / "clip.index", "metadata": seeds / "images",
            "image": seeds / "images" / seed_file}[kind]


# ------------------------------------------------------------------------------------------------ in-process cases
@pytest.mark.slow
def test_mutated_files_end_in_a_result_or_one_documented_error(fuzz_seeds, tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz")
    start = time.monotonic()
    records = fc.fuzz(fuzz_seeds, work, CASES, SEED)
    print(fc.summary(records, time.monotonic() - start))
    planned = fc.plan_cases(CASES)
    assert len(records) == sum(planned.values()), "cases went missing (the fuzz child stopped early)"
    classes = fc.failure_classes(records)
    if classes:  # pytest.fail: the report as written, without assert's dump of every record
        pytest.fail(f"{len(classes)} failure classes in {len(records)} mutated files (cases kept under "
                    f"{work / 'failed'}):\n{fc.describe(records, SEED)}", pytrace=False)
    # the mutators must reach past the first check: some cases of each kind load, some are refused
    for kind, count in planned.items():
        statuses = [r["status"] for r in records if r["kind"] == kind]
        if count >= 50:
            assert statuses.count("ok") and statuses.count("refused"), (kind, count, set(statuses))


# ------------------------------------------------------------------------------------------------ the real tools
def _cli_run(number: int, seeds: Path, tmp: Path) -> dict:
    """The ``number``-th command-line case: a mutated file (cases numbered from 100,000, apart from the in-process
    ones) given to the tool that reads it."""
    case = 100_000 + number
    out = tmp / f"cli-{number}"
    out.mkdir()
    image = seeds / "images" / "red.png"
    clip = seeds / "clip.ckpt"
    kind = ("checkpoint", "export", "images", "index", "export-command", "checkpoint")[number % 6]
    if kind == "images":  # one run covers a folder of mutated images and its mutated metadata.jsonl
        folder, _, mutators = fc.make_metadata_case(fc.case_rng(SEED, "metadata", case), seeds, out)
        for i in range(12):
            sub = out / f"image-{i}"
            sub.mkdir()
            path, seed_file, done = fc.make_image_case(fc.case_rng(SEED, "image", case * 100 + i), seeds, sub)
            os.rename(path, folder / f"fuzzed{i}{path.suffix}")
            mutators.append(f"fuzzed{i}{path.suffix} from {seed_file}: {'; '.join(done)}")
        command = [sys.executable, "scripts/zero_shot.py", "--checkpoint", str(clip), "--labels",
                   ",".join(fc.LABELS), "--json", str(folder)]
    elif kind == "index":
        path, _, mutators = fc.make_index_case(fc.case_rng(SEED, "index", case), seeds, out)
        command = [sys.executable, "-m", "vlm", "search", "--index", str(path), "--json", "a red circle"]
    else:
        maker_kind = "export" if kind == "export" else "checkpoint"
        path, seed_file, mutators = fc.MAKERS[maker_kind](fc.case_rng(SEED, maker_kind, case), seeds, out)
        if kind == "export-command":
            command = [sys.executable, "-m", "vlm", "export", "--checkpoint", str(path), "--out", str(out / "out")]
        elif seed_file == "clip":
            command = [sys.executable, "scripts/zero_shot.py", "--checkpoint", str(path), "--labels",
                       ",".join(fc.LABELS), "--json", str(image)]
        else:
            command = [sys.executable, "scripts/caption.py", "--checkpoint", str(path), "--json", str(image)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=fc.ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, errors="replace", timeout=CLI_TIMEOUT)
        rc, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = "timeout", str(e.stdout or ""), str(e.stderr or "")
    return {"number": number, "kind": kind, "case": case, "mutators": mutators, "command": command, "rc": rc,
            "stdout": stdout, "stderr": stderr, "seconds": round(time.monotonic() - started, 1), "kept": str(out)}


def _cli_problems(run: dict) -> list[str]:
    """What breaks the command-line contract: an exit code other than 0/1/2, a traceback, a refusal in more or less
    than one error line, an error line that is not printable (raw control characters), output that is not JSON."""
    problems = []
    rc, stdout, stderr = run["rc"], run["stdout"], run["stderr"]
    lines = [line for line in stderr.splitlines() if line.strip()]
    if rc not in (0, 1, 2):
        problems.append(f"exit code {rc}")
    if "Traceback" in stderr:
        problems.append("a traceback on stderr")
    errors = [line for line in lines if "error" in line.lower()]
    if rc == 2 and len(errors) != 1:
        problems.append(f"exit 2 with {len(errors)} error lines")
    if any(not line.isprintable() for line in lines):
        problems.append("a stderr line with raw control characters")
    if run["kind"] == "export-command":
        if rc == 0 and len(stdout.splitlines()) != 1:
            problems.append(f"{len(stdout.splitlines())} lines on stdout for one export")
        return problems
    try:
        records = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    except ValueError:
        return [*problems, "stdout is not one JSON object per line"]
    if rc in (0, 1) and not records:
        problems.append(f"exit {rc} without a result")
    if rc == 0 and any("error" in r for r in records):
        problems.append("exit 0 with an input error")
    return problems


@pytest.mark.slow
def test_a_sample_through_the_real_tools_exits_0_1_or_2_with_one_line_errors(fuzz_seeds, tmp_path):
    """scripts/zero_shot.py, scripts/caption.py, vlm export and vlm search on mutated files: exit 0, 1 or 2; no
    traceback; a refusal is one error line; --json output is JSON."""
    with ThreadPoolExecutor(max(1, fc.JOBS)) as pool:
        runs = list(pool.map(lambda n: _cli_run(n, fuzz_seeds, tmp_path), range(CLI_CASES)))
    for run in runs:  # shown with -s, and with a failure
        what = "; ".join(run["mutators"])
        print(f"run {run['number']} {run['kind']}: exit {run['rc']} in {run['seconds']} s ({what})")
    bad = [(run, problems) for run in runs if (problems := _cli_problems(run))]
    report = "\n".join(
        f"- run {run['number']} ({run['kind']}, seed {SEED} case {run['case']}: {'; '.join(run['mutators'])}): "
        f"{', '.join(problems)}\n    $ {' '.join(run['command'])}\n    exit {run['rc']}; stderr: "
        f"{run['stderr'][-600:]!r}\n    kept: {run['kept']}"
        for run, problems in bad
    )
    if bad:
        pytest.fail(f"{len(bad)} of {len(runs)} command-line runs broke the contract:\n{report}", pytrace=False)
