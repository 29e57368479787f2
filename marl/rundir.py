"""Run directories that survive being killed at any moment.

A run directory (``runs/<name>/``) holds ``run.json`` (what was run), ``metrics.jsonl``,
``checkpoints/`` (orbax) and, while a process writes it, ``.lock``. Everything here runs
on the host before anything compiles:

* :func:`prepare` checks the directory (writable, not already holding checkpoints of
  another run, the same description when resuming) and takes the lock;
* :class:`RunLock` refuses a second writer and names the holder (pid, host, start time);
  a lock left by a dead process on this host is taken over with a notice;
* :func:`atomic_write` replaces a file by writing a sibling temporary file, fsyncing it
  and renaming it over the old one, so a reader sees the old or the new content, never
  a mix or an empty file.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Optional

from marl.config import ConfigError

LOCK_NAME = ".lock"
RESUME_KEYS = ("algo", "env", "env_kwargs", "num_seeds", "seed", "chunk_iterations")
"""fields of ``run.json`` that must match for an exact resume (plus every config field)"""


def atomic_write(path: str, text: str) -> None:
    """Replace ``path`` by ``text`` durably: temp file, fsync, rename, fsync the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(folder)


def fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class RunLockedError(ConfigError):
    """Another live process writes this run directory."""


class RunLock:
    """An exclusive lock on a run directory: ``<run_dir>/.lock`` holding pid, host and
    start time. Created with ``O_EXCL``, so two processes never both hold it."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.held = False

    def holder(self) -> Optional[dict]:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written, or damaged: treated as held by an unknown process

    def acquire(self) -> "RunLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self.holder()
                if other is None:
                    continue  # released meanwhile: try again
                if self._stale(other):
                    self._take_over(other)
                    continue
                run_dir = os.path.dirname(self.path)
                who = (
                    f"process {other.get('pid')} on host {other.get('host')} (since {other.get('started')})"
                    if other
                    else "another process (unreadable lock)"
                )
                raise RunLockedError(
                    "run_dir",
                    run_dir,
                    f"is being written by {who}; wait for it to finish, or choose another run name. "
                    f"If that process is gone, delete {self.path}",
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return self
        raise RunLockedError("run_dir", os.path.dirname(self.path), "its lock changed hands repeatedly; try again")

    @staticmethod
    def _stale(other: dict) -> bool:
        if not other:
            return False
        if other.get("host") != socket.gethostname():
            return False  # a process on another host cannot be checked from here
        pid = other.get("pid")
        return isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid)

    def _take_over(self, other: dict) -> None:
        # a rename succeeds for one process only: two takers never both proceed
        grave = f"{self.path}.stale.{os.getpid()}"
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return
        os.remove(grave)
        print(
            f"notice: took over the lock of {os.path.dirname(self.path)} left by process {other.get('pid')} "
            f"(no longer running, started {other.get('started')})",
            file=sys.stderr,
        )

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        other = self.holder()
        if other and other.get("pid") == os.getpid() and other.get("host") == socket.gethostname():
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def has_checkpoints(run_dir: str) -> bool:
    ck = os.path.join(run_dir, "checkpoints")
    return os.path.isdir(ck) and any(n.isdigit() for n in os.listdir(ck))


def _check_writable(run_dir: str) -> None:
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, f".write_test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("")
        os.remove(probe)
    except OSError as e:
        raise ConfigError("run_dir", run_dir, f"must be a writable directory ({e.strerror})") from None


def check_resume_compatible(old: dict, new: dict) -> None:
    """ConfigError naming the first field of ``new`` that differs from the run being resumed."""
    for k in RESUME_KEYS:
        if k in old and k in new and old[k] != new[k]:
            raise ConfigError(k, new[k], f"must match the run being resumed ({old[k]!r}) for an exact resume")
    if "checkpoint_rows" in old and "checkpoint_rows" in new and old["checkpoint_rows"] != new["checkpoint_rows"]:
        raise ConfigError(
            "devices",
            new.get("placement", {}).get("devices", 1),
            f"must give the run's checkpointed rows ({old['checkpoint_rows']}: seeds padded to a "
            f"multiple of the device count it ran on, {old.get('placement', {}).get('devices', 1)}); "
            f"this placement gives {new['checkpoint_rows']}. Resume on that device count "
            "(--no-shard for one device)",
        )
    old_cfg, new_cfg = old.get("config", {}), new.get("config", {})
    for k in sorted(set(old_cfg) | set(new_cfg)):
        if k in new_cfg and k not in old_cfg:
            continue  # a field added to the config class after the run was written is not a change
        if old_cfg.get(k) != new_cfg.get(k):
            raise ConfigError(
                f"config.{k}",
                new_cfg.get(k),
                f"must match the run being resumed ({old_cfg.get(k)!r}) for an exact resume",
            )


def read_description(run_dir: str) -> Optional[dict]:
    path = os.path.join(run_dir, "run.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError("run_dir", run_dir, f"holds an unreadable run.json ({e}); it cannot be resumed") from None


def prepare(
    run_dir: str, resume: bool, description: dict, resume_or_start: bool = False, lock: bool = True
) -> tuple[str, Optional[RunLock], bool]:
    """Check ``run_dir`` and take its lock, before anything compiles.

    Returns ``(absolute run_dir, lock or None, resuming)``. ``resume`` of a directory
    with no checkpoint is refused unless ``resume_or_start``; without ``resume``, a
    directory that already holds checkpoints is refused. The description is written to
    ``run.json`` (atomically) once every check passed and the lock is held.
    """
    run_dir = os.path.abspath(run_dir)
    exists = has_checkpoints(run_dir)
    if resume and not exists and not resume_or_start:
        raise ConfigError(
            "resume",
            True,
            f"needs a run with a checkpoint, and {run_dir} has none "
            "(start it without --resume, or pass --resume-or-start)",
        )
    if not resume and not resume_or_start and exists:
        raise ConfigError(
            "run_dir", run_dir, "already holds checkpoints: pass --resume to continue it, or choose a new name"
        )
    _check_writable(run_dir)
    held = RunLock(run_dir).acquire() if lock else None
    try:
        resuming = (resume or resume_or_start) and exists
        if resuming:
            old = read_description(run_dir)
            if old is not None:
                check_resume_compatible(old, description)
        atomic_write(os.path.join(run_dir, "run.json"), json.dumps(description, indent=2, default=str))
    except BaseException:
        if held is not None:
            held.release()
        raise
    return run_dir, held, resuming
