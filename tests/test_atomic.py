"""A failed write leaves the previous file whole (resume logic trusts that existing files are complete),
and one run at a time writes an artifact: a second stops at once naming the first, a killed one
never blocks, and the ranks of one torchrun share their run's lock."""
import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from lpld import atomic, cli, distributed
from lpld.atomic import write_atomically
from lpld.errors import UserError

from test_train import tiny_overrides, tiny_run


def test_interrupted_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "deep" / "meta.json"
    write_atomically(target, lambda partial: partial.write_text("old"))

    def crash(partial):
        partial.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, crash)
    assert target.read_text() == "old"
    write_atomically(target, lambda partial: partial.write_text("new"))
    assert target.read_text() == "new" and sorted(p.name for p in target.parent.iterdir()) == ["meta.json"]


def _wait_for_lock(artifact: Path, process: subprocess.Popen, seconds: float = 120) -> str:
    """The holder line once ``process`` has taken ``artifact``'s lock."""
    deadline = time.monotonic() + seconds
    lock = atomic.lock_file(artifact)
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if lock.is_file() and f"pid {process.pid} " in lock.read_text():
            return lock.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{process.pid} never took {lock}")


def test_two_trainings_of_one_student_the_second_stops_at_once(tmp_path, capsys):
    """Two `lpld train --name dup` on one work directory: the second exits 2 at once, naming the first's
    pid; once the first is killed (mid-run, its lock file left behind) a third runs."""
    recipe, workdir = tiny_run(tmp_path)
    args = ["train", "--recipe", "fmnist", "--workdir", str(workdir.root), "--labels", str(workdir.labels),
            "--name", "dup", "--device", "cpu"]
    args += [part for override in tiny_overrides(tmp_path, "train.epochs=400") for part in ("--set", override)]
    first = subprocess.Popen([sys.executable, "-m", "lpld", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        holder = _wait_for_lock(workdir.student("dup"), first)
        started = time.monotonic()
        assert cli.main(args) == 2
        assert time.monotonic() - started < 5
        message = capsys.readouterr().err
        assert f"students/dup is being written by {holder}" in message and "wait for that run to end" in message
        assert "--name" in message
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert atomic.lock_file(workdir.student("dup")).is_file()  # left by the killed run
    with atomic.sole_writer(workdir.student("dup")):  # and not held: the kernel dropped it with the process
        pass


def test_a_held_lock_stops_the_second_writer_until_its_holder_ends(tmp_path):
    artifact = tmp_path / "labels"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from lpld import atomic\n"
                               f"with atomic.sole_writer({str(artifact)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UserError, match=rf"labels is being written by pid {holder.pid} on "):
            with atomic.sole_writer(artifact):
                pass
    finally:
        holder.kill()
        holder.wait()
    with atomic.sole_writer(artifact):
        assert f"pid {os.getpid()} " in atomic.lock_file(artifact).read_text()


def _rank_writes(rank, folder, held_elsewhere):
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2,
                            timeout=timedelta(minutes=5))
    outcome = {}
    try:
        with distributed.sole_writer(Path(folder) / "store"):
            outcome["wrote"] = True
    except UserError as error:
        distributed.publish_error(str(error))
        outcome["error"] = str(error)
    finally:
        dist.destroy_process_group()
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(outcome))


@pytest.mark.parametrize("held_elsewhere", [False, True])
def test_the_ranks_of_one_run_share_its_lock(tmp_path, held_elsewhere):
    """Rank 0 holds the lock for the run and rank 1 writes under it; when another run holds it, both
    ranks stop with rank 0's message."""
    other = subprocess.Popen([sys.executable, "-c", "import time; from lpld import atomic\n"
                              f"with atomic.sole_writer({str(tmp_path / 'store')!r}):\n    print('held', flush=True); "
                              "time.sleep(60)"], stdout=subprocess.PIPE, text=True) if held_elsewhere else None
    try:
        if other:
            assert other.stdout.readline() == "held\n"
        mp.spawn(_rank_writes, args=(str(tmp_path), held_elsewhere), nprocs=2)
    finally:
        if other:
            other.kill()
            other.wait()
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    if not held_elsewhere:
        assert ranks == [{"wrote": True}, {"wrote": True}]
    else:
        assert all("store is being written by pid" in outcome["error"] for outcome in ranks)
        assert ranks[1]["error"].startswith("rank 0: ")
