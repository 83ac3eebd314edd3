"""Faults a long run meets: saves that fail, damaged checkpoint data, non-finite losses.

Each is met through the `jaxscale` command in a subprocess (a fault is injected before it starts),
and must end in one line, the right exit status, and earlier checkpoints byte-identical.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxscale.checkpoint_report import describe

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--config.model.n_layers=1", "--config.model.d_model=64", "--config.model.d_ff=128",
         "--config.model.head_dim=8", "--config.model.vocab_size=264", "--config.data.seq_len=32",
         "--config.train.global_batch_size=8", "--config.train.log_every=1",
         "--config.checkpoint.every=2"]
NOISE = ("Traceback", "Exception ignored", "Event loop is closed", "ERROR")

# Stand-ins for a full disk and for a store that refuses a step's directory: they fail writes
# into step 6's temporary directory, and the creation of that directory.
DISK_FULL = """
import builtins, errno
_open = builtins.open
def open(file, mode="r", *args, **kwargs):
    if "/6.orbax-checkpoint-tmp" in str(file) and set(mode) & set("wax"):
        raise OSError(errno.ENOSPC, "No space left on device", str(file))
    return _open(file, mode, *args, **kwargs)
builtins.open = open
"""
NO_DIRECTORY = """
import errno, os
_makedirs = os.makedirs
def makedirs(name, *args, **kwargs):
    if "/6.orbax-checkpoint-tmp" in str(name):
        raise OSError(errno.EDQUOT, "Disk quota exceeded", str(name))
    return _makedirs(name, *args, **kwargs)
os.makedirs = makedirs
"""


def jaxscale(*args: str, fault: str = "", timeout: int = 300) -> subprocess.CompletedProcess:
    """`jaxscale ARGS` in a fresh process that first runs the Python lines `fault`."""
    code = f"{fault}\nimport sys\nfrom jaxscale.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def train(run_dir: Path, steps: int, *extra: str, fault: str = "") -> subprocess.CompletedProcess:
    return jaxscale("train", *SMALL, f"--config.run_dir={run_dir}", f"--config.train.steps={steps}",
                    *extra, fault=fault)


def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file()}


def errors(result: subprocess.CompletedProcess) -> list[str]:
    """The `jaxscale:` lines of stderr, after checking that nothing else went wrong loudly."""
    assert not [n for n in NOISE if n in result.stderr], result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if line.startswith("jaxscale:")]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A run directory with checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("saved")
    result = train(run_dir, 4)
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


def steps_2_and_4(run_dir: Path) -> dict[str, bytes]:
    return {k: v for k, v in files(run_dir / "checkpoints").items() if k.split("/")[0] in ("2", "4")}


def copy_of(saved: Path, tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A copy of the saved run, and the files of its checkpoints."""
    run_dir = tmp_path / "run"
    shutil.copytree(saved, run_dir)
    return run_dir, steps_2_and_4(run_dir)


@pytest.mark.parametrize("fault, cause", [(DISK_FULL, "[Errno 28] No space left on device"),
                                          (NO_DIRECTORY, "[Errno 122] Disk quota exceeded")])
def test_a_failing_save_stops_the_run_with_one_line(saved, tmp_path, fault, cause):
    run_dir, before = copy_of(saved, tmp_path)
    result = train(run_dir, 12, fault=fault)
    assert result.returncode == 2
    (line,) = errors(result)
    assert line.startswith(f"jaxscale: error: saving checkpoint step 6 to {run_dir}/checkpoints "
                           f"failed (OSError: {cause}"), line
    assert "steps 2, 4 are intact" in line
    assert steps_2_and_4(run_dir) == before
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert 6 <= last <= 8  # it stopped at the step after the failure was known, not at 12
    resumed = train(run_dir, 6)  # the next run starts from step 4, as the line says
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr and "at step 4" in resumed.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2", "4", "6"]


def test_an_unwritable_checkpoint_or_export_directory_is_refused_before_anything_runs(tmp_path):
    stand_in = tmp_path / "file"
    stand_in.write_text("not a directory")
    result = train(tmp_path / "run", 4, f"--config.checkpoint.dir={stand_in}")
    assert result.returncode == 2
    assert errors(result) == [f"jaxscale: error: cannot write checkpoint directory '{stand_in}' "
                              f"(NotADirectoryError: [Errno 20] a file, not a directory: "
                              f"'{stand_in}'); set run_dir or checkpoint.dir to a directory this "
                              f"process can write"]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    result = jaxscale("export-hf", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(stand_in))
    assert result.returncode == 2
    assert errors(result) == [f"jaxscale: error: --out {stand_in} is a file, not a directory; "
                              f"pass a new directory"]
    assert stand_in.read_text() == "not a directory"


def largest_data_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)


def truncate(step_dir: Path) -> None:
    f = largest_data_file(step_dir)
    f.write_bytes(f.read_bytes()[:1000])


def overwrite(step_dir: Path) -> None:
    f = largest_data_file(step_dir)
    f.write_bytes(bytes(range(256)) * (f.stat().st_size // 256 + 1))


def truncate_all(step_dir: Path) -> None:
    """Every data file: which arrays share a file varies from save to save, and the commands
    that read only the parameters must meet damage too."""
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:100])


def damage_manifest(step_dir: Path) -> None:
    for f in (step_dir / "state").rglob("manifest.ocdbt"):
        f.write_bytes(b"garbage")


@pytest.mark.parametrize("damage", [truncate, overwrite, damage_manifest])
def test_inspect_reads_the_arrays_back_and_marks_damaged_steps(saved, tmp_path, damage):
    run_dir, _ = copy_of(saved, tmp_path)
    damage(run_dir / "checkpoints" / "4")
    text = describe(str(run_dir / "checkpoints"))
    assert re.search(r"step +2 +[\d.]+ MiB\n", text), text
    assert re.search(r"step +4 +[\d.]+ MiB  unreadable: \w+Error: .{20,}", text), text
    assert re.search(r"verified: 1 of 2 steps read back whole \([\d.]+ MiB in [\d.]+ s\)", text)
    assert "parameters at step 2:" in text
    if damage is not damage_manifest:  # damaged array data goes unseen without reading it
        quick = describe(str(run_dir / "checkpoints"), verify=False)
        assert "unreadable" not in quick and "not verified" in quick
    result = jaxscale("inspect", str(run_dir / "checkpoints"), "--verify")
    assert result.returncode == 0 and "  unreadable: " in result.stdout
    assert errors(result) == []


def test_falling_back_past_damaged_steps_is_one_warning_each(saved, tmp_path):
    run_dir, before = copy_of(saved, tmp_path)
    truncate_all(run_dir / "checkpoints" / "4")
    checkpoints = run_dir / "checkpoints"
    script = ("import sys\nfrom jaxscale.cli import main\n"
              "for args in [a.split('|') for a in sys.argv[1:]]:\n"
              "    print(f'=== {args[0]} rc', main(args), file=sys.stderr, flush=True)\n")
    commands = [["generate", *SMALL, f"--config.run_dir={run_dir}", "--prompt", "The "],
                ["eval", *SMALL, f"--checkpoint={checkpoints}"],
                ["export-hf", f"--checkpoint={checkpoints}", f"--out={tmp_path / 'hf'}"],
                ["train", *SMALL, f"--config.run_dir={tmp_path / 'tuned'}", "--config.train.steps=1",
                 f"--config.checkpoint.init_params_from={checkpoints}"],
                ["train", *SMALL, f"--config.run_dir={run_dir}", "--config.train.steps=6"]]
    result = subprocess.run([sys.executable, "-c", script, *("|".join(c) for c in commands)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert errors(result) == []
    outputs = result.stderr.split("=== ")[1:]
    assert [o.splitlines()[0] for o in outputs[:5]] == [
        f"{c[0]} rc 0" for c in commands], result.stderr[-3000:]
    for before_marker in [result.stderr.split("=== ")[0], *outputs[:4]]:
        warnings = re.findall(r"checkpoint step (\d+) in .* is unreadable \(.+\); using step (\d+)",
                              before_marker)
        assert warnings == [("4", "2")], before_marker
    assert "resumed from" in outputs[3] and "at step 2" in outputs[3]
    assert "replacing the damaged checkpoint step 4" in outputs[3]
    assert {k: v for k, v in steps_2_and_4(run_dir).items() if k.startswith("2/")} == {
        k: v for k, v in before.items() if k.startswith("2/")}


def test_a_directory_with_every_step_damaged_is_one_warning_then_one_error(saved, tmp_path):
    run_dir, _ = copy_of(saved, tmp_path)
    for step in (2, 4):
        truncate_all(run_dir / "checkpoints" / str(step))
    result = train(run_dir, 6)
    assert result.returncode == 2
    (line,) = errors(result)
    assert re.match(rf"jaxscale: error: checkpoint step 2 in {run_dir}/checkpoints is unreadable "
                    r"\(ValueError: .+\); remove that step's directory", line), line
    assert len(re.findall(r"checkpoint step 4 in .* is unreadable .*; using step 2",
                          result.stderr)) == 1


def test_a_nonfinite_loss_stops_the_run_or_is_skipped_as_asked(saved, tmp_path):
    run_dir, before = copy_of(saved, tmp_path)
    blow_up = "--config.optim.lr=1e10"  # the update of step 5 leaves step 6's loss NaN
    result = train(run_dir, 12, blow_up)
    assert result.returncode == 2
    assert errors(result) == [
        "jaxscale: error: step 6: loss nan, grad norm nan; the run stops without applying it "
        "(checkpoints up to step 4 are intact); lower optim.lr or check the data, or set "
        "train.max_nonfinite_steps=N to skip up to N such steps"]
    assert steps_2_and_4(run_dir) == before
    result = train(run_dir, 10, blow_up, "--config.train.max_nonfinite_steps=3")
    assert result.returncode == 2
    assert len(re.findall(r"step \d+: loss nan, grad norm nan; update skipped", result.stderr)) == 3
    assert errors(result)[0].startswith("jaxscale: error: step 9: loss nan")
    assert "the run already skipped train.max_nonfinite_steps=3" in errors(result)[0]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    skipped = {r["step"]: r["nonfinite_steps"] for r in rows}  # the second run's, where both wrote
    assert [skipped[s] for s in (5, 6, 7, 8)] == [0, 1, 2, 3]
