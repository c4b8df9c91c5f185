"""Outputs are all or nothing: exclusive creation, --force as a whole, temporaries removed on
error and signals (and after a killed writer), deterministic bytes, clear output-path errors."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

import pytest

import converters
from converters import CheckpointError, atomic, cli
from tests.conftest import ROOT, checkpoint_dir

SRC = checkpoint_dir("small_fc_h32_sm0p01")
ENV = {**os.environ, "PYTHONPATH": ROOT}

#: A writer that writes part of its output, says so, and waits to be signalled.
CHILD = """
import sys, time
from converters.atomic import atomic_target, write_files_atomic

def slow(path):
    with open(path, "wb") as f:
        f.write(b"partial")
    print("ready", flush=True)
    time.sleep(60)

if sys.argv[2] == "folder":
    write_files_atomic(sys.argv[1], {"params": slow}, False)
else:
    with atomic_target(sys.argv[1], False) as tmp:
        slow(tmp)
"""


@pytest.fixture(scope="module")
def small_fc() -> converters.Converted:
    return converters.convert(SRC)


def _temporaries(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith(atomic.TMP_PREFIX))


def _text_writer(text: str) -> Callable[[str], None]:
    """A folder-file writer that writes ``text``."""
    def write(path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return write


def _race(write: Callable[[int], None]) -> list[str]:
    """Two threads call ``write(i)`` at once; each result is "ok" or the error message."""
    barrier = threading.Barrier(2)
    results = ["", ""]

    def run(i: int) -> None:
        barrier.wait()
        try:
            write(i)
            results[i] = "ok"
        except CheckpointError as e:
            results[i] = str(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_racing_writers_exactly_one_wins(tmp_path):
    for trial in range(10):
        target = tmp_path / f"w{trial}.bin"

        def write_file(i: int, target=target) -> None:
            with atomic.atomic_target(str(target), False) as tmp, open(tmp, "wb") as f:
                f.write(str(i).encode() * 1000)

        results = _race(write_file)
        assert sorted(r == "ok" for r in results) == [False, True], results
        winner = results.index("ok")
        assert "output exists" in results[1 - winner]
        assert target.read_bytes() == str(winner).encode() * 1000
        folder = tmp_path / f"up{trial}"

        def write_folder(i: int, folder=folder) -> None:
            atomic.write_files_atomic(str(folder), {"params": _text_writer(str(i))}, False)

        results = _race(write_folder)
        assert sorted(r == "ok" for r in results) == [False, True], results
        assert (folder / "params").read_text() == str(results.index("ok"))
    assert _temporaries(tmp_path) == []


def test_racing_cli_converts_one_exits_2_one_line(tmp_path):
    out = tmp_path / "w.safetensors"
    procs = [subprocess.Popen([sys.executable, "-m", "converters.cli", SRC, "-o", str(out)],
                              cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    done = [p.communicate(timeout=120) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], done
    err = next(e for p, (_, e) in zip(procs, done, strict=True) if p.returncode == 2)
    assert err.count("\n") == 1 and "output exists" in err
    assert os.listdir(tmp_path) == ["w.safetensors"]


def test_force_replaces_folder_as_a_whole(tmp_path, small_fc):
    up = tmp_path / "up"
    converters.convert(checkpoint_dir("celo")).save(up, "upstream")
    assert os.listdir(up) == ["theta.state"]
    assert cli.main([SRC, "--format", "upstream", "-o", str(up), "--force"]) == 0
    assert sorted(os.listdir(up)) == ["config.gin", "params"]
    small_fc.save(up, "hf", overwrite=True)
    assert sorted(os.listdir(up)) == ["config.json", "model.safetensors"]
    assert os.listdir(tmp_path) == ["up"]


def test_existing_empty_folder_needs_force(tmp_path, small_fc):
    (tmp_path / "up").mkdir()
    with pytest.raises(CheckpointError, match="output exists"):
        small_fc.save(tmp_path / "up", "upstream")
    assert os.listdir(tmp_path / "up") == []
    small_fc.save(tmp_path / "up", "upstream", overwrite=True)
    assert sorted(os.listdir(tmp_path / "up")) == ["config.gin", "params"]


def _start_child(target, kind: str) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(target), kind], cwd=ROOT,
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline() == "ready\n"
    return child


@pytest.mark.parametrize("sig, kind", [(signal.SIGTERM, "folder"), (signal.SIGINT, "folder"),
                                       (signal.SIGTERM, "file")])
def test_signal_removes_temporaries(tmp_path, sig, kind):
    child = _start_child(tmp_path / "out", kind)
    try:
        temps = _temporaries(tmp_path)
        assert len(temps) == 1 and temps[0].startswith(f"{atomic.TMP_PREFIX}{child.pid}-")
        # Another write to the same folder leaves the live writer's temporary alone.
        with atomic.atomic_target(str(tmp_path / "other"), False) as tmp, open(tmp, "wb") as f:
            f.write(b"x")
        assert _temporaries(tmp_path) == temps
        child.send_signal(sig)
        child.wait(timeout=30)
    finally:
        child.kill()
    assert child.returncode != 0
    assert os.listdir(tmp_path) == ["other"]


def test_killed_writer_temporary_cleaned_by_next_write(tmp_path, small_fc):
    child = _start_child(tmp_path / "up", "folder")
    child.kill()
    child.wait(timeout=30)
    assert len(_temporaries(tmp_path)) == 1  # SIGKILL cannot be caught
    small_fc.save(tmp_path / "w.safetensors")
    assert os.listdir(tmp_path) == ["w.safetensors"]


def test_live_and_reused_pid_temporaries(tmp_path):
    mine = tmp_path / f"{atomic.TMP_PREFIX}{os.getpid()}-00-a"
    live = tmp_path / f"{atomic.TMP_PREFIX}1-00-b"  # pid 1 is alive, started before it
    reused = tmp_path / f"{atomic.TMP_PREFIX}1-00-c"  # written before pid 1 started: reused
    foreign = tmp_path / ".lopt-tmp-unparsable"
    for path in (mine, live, reused, foreign):
        path.write_bytes(b"x")
    os.utime(reused, (0, 0))
    removed = atomic.clean_stale_temporaries(str(tmp_path))
    assert removed == [str(reused)]
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in (mine, live, foreign))


def test_bytes_depend_only_on_tensors_and_metadata(tmp_path, small_fc):
    small_fc.save(tmp_path / "src.safetensors")
    shuffled = converters.Converted(
        small_fc.kind, dict(reversed(small_fc.state_dict.items())), small_fc.config,
        dict(reversed(small_fc.metadata.items())))
    for fmt, files in (("safetensors", [""]), ("pt", [""]),
                       ("hf", ["config.json", "model.safetensors"])):
        outputs = []
        for i in range(3):
            converters.convert(tmp_path / "src.safetensors").save(tmp_path / f"{fmt}{i}", fmt)
            outputs.append(tmp_path / f"{fmt}{i}")
        shuffled.save(tmp_path / f"{fmt}-shuffled", fmt)
        outputs.append(tmp_path / f"{fmt}-shuffled")
        for name in files:
            contents = {(out / name if name else out).read_bytes() for out in outputs}
            assert len(contents) == 1, (fmt, name)


def test_output_path_errors_exit_2_one_line(tmp_path, capsys):
    (tmp_path / "somefile.txt").write_text("x")
    for out, needle in ((tmp_path / "somefile.txt" / "out.safetensors", "is a file"),
                        ("/proc/lopt-out.safetensors", "cannot write the output")):
        assert cli.main([SRC, "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
    assert os.listdir(tmp_path) == ["somefile.txt"]
    assert not any(n.startswith(atomic.TMP_PREFIX) for n in os.listdir("/proc"))


def test_no_space_mid_write_leaves_nothing(tmp_path):
    def full(path: str) -> None:
        with open(path, "wb") as f:
            f.write(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with (pytest.raises(CheckpointError, match="No space left on device"),
          atomic.atomic_target(str(tmp_path / "w.safetensors"), False) as tmp):
        full(tmp)
    with pytest.raises(CheckpointError, match="No space left on device"):
        atomic.write_files_atomic(str(tmp_path / "up"),
                                  {"config.gin": _text_writer("x"),
                                   "params": full}, False)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root (CAP_DAC_OVERRIDE): a "
                    "chmod 0o500 folder does not block writes")
def test_read_only_folder(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    assert cli.main([SRC, "-o", str(folder / "w.safetensors")]) == 2
    assert "Permission denied" in capsys.readouterr().err
    assert os.listdir(folder) == []


def test_symlink_output_refused_and_force_replaces_the_link(tmp_path, capsys, small_fc):
    kept = tmp_path / "kept.bin"
    kept.write_bytes(b"not weights")
    link = tmp_path / "w.safetensors"
    link.symlink_to(kept)
    assert cli.main([SRC, "-o", str(link)]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert cli.main([SRC, "-o", str(link), "--force"]) == 0
    assert not link.is_symlink() and link.read_bytes()[:8] != b"not weig"
    assert kept.read_bytes() == b"not weights"
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "keep").write_text("x")
    (tmp_path / "up").symlink_to(folder)
    small_fc.save(tmp_path / "up", "upstream", overwrite=True)
    assert not (tmp_path / "up").is_symlink()
    assert sorted(os.listdir(tmp_path / "up")) == ["config.gin", "params"]
    assert os.listdir(folder) == ["keep"]


def test_without_renameat2_the_fallbacks_hold(tmp_path, monkeypatch, small_fc):
    monkeypatch.setattr(atomic, "_renameat2", None)
    results = _race(lambda i: small_fc.save(tmp_path / "w.safetensors"))
    assert sorted(r == "ok" for r in results) == [False, True], results
    converters.convert(checkpoint_dir("celo")).save(tmp_path / "up", "upstream")
    with pytest.raises(CheckpointError, match="output exists"):
        small_fc.save(tmp_path / "up", "upstream")
    small_fc.save(tmp_path / "up", "upstream", overwrite=True)
    assert sorted(os.listdir(tmp_path / "up")) == ["config.gin", "params"]
    assert sorted(os.listdir(tmp_path)) == ["up", "w.safetensors"]
