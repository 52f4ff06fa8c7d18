"""Crash-safe overwrites (fxpeft/formats/files.py): a save killed at any file operation leaves one whole adapter.

Kill tests: one child process (``CHILD`` below) builds the old and the new adapters of a tiny MLP, then for
k = 0, 1, 2, ... copies the old folder into place, forks, and in the fork saves the new adapter(s) over it with
every file operation counted: Python's audit events for renames, links, removals, mkdir, chmod, utime, copies and
opens for writing, plus ``os.fsync``, safetensors' ``save_file`` (before and after) and the atomic exchange,
wrapped. The fork SIGKILLs itself before operation k; the folder as the kill left it (staging folders included)
is copied aside, until a save completes. Every copy must then load, with ``fxpeft.load_adapter`` and with
``peft.PeftModel.from_pretrained``, to exactly the whole old adapter(s) or the whole new one(s) (tensors, config
and outputs compared with both); unrelated files are kept; and a following save succeeds and leaves no staging
folder behind.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch

import fxpeft
from fxpeft.errors import AdapterLoadError, AdapterSaveError
from fxpeft.formats import files
from fxpeft.formats.files import CONFIG_NAME, WEIGHTS_NAME, read_adapter
from tests.models import mlp

ROOT = Path(__file__).resolve().parents[1]
X = (torch.randn(5, 16, generator=torch.Generator().manual_seed(2)),)
README = "notes\n"
FOLDER_MODE = 0o750  # an existing folder's mode, which the new folder keeps


def spec(alpha, seed, r=4, targets=("fc1", "fc2")):
    return {"targets": list(targets), "r": r, "alpha": alpha, "seed": seed}


# Old and new differ in alpha and weights at the same shapes: a mix of the two would load silently.
SCENARIOS = {
    "one-adapter": dict(old={"default": spec(8, 1)}, new={"default": spec(32, 2)}, save="default", existing=True),
    "several": dict(old={"default": spec(8, 1), "other": spec(4, 3, r=2, targets=["fc1"])},
                    new={"default": spec(32, 2), "other": spec(16, 4, r=2, targets=["fc1"])},
                    save=["default", "other"], existing=True, third=spec(2, 5, r=1)),
    # The two-step commit (filesystems without an atomic exchange), saving over the state that a kill between its
    # two renames left (no folder, the old one beside it): the recovery at the start of the save is killed too,
    # then every step of the two-step commit.
    "after-a-killed-commit": dict(old={"default": spec(8, 1), "other": spec(4, 3, r=2, targets=["fc1"])},
                                  new={"default": spec(32, 2), "other": spec(16, 4, r=2, targets=["fc1"])},
                                  save=["default", "other"], existing=True, third=spec(2, 5, r=1), two_step=True,
                                  interrupted=True),
    "new-folder": dict(old={"default": spec(8, 1), "other": spec(4, 3, r=2, targets=["fc1"])},
                       new={"default": spec(32, 2), "other": spec(16, 4, r=2, targets=["fc1"])},
                       save=["default", "other"], existing=False),
}

CHILD = r'''
import itertools, json, os, shutil, signal, sys, traceback
from pathlib import Path

import torch

torch.set_num_threads(1)  # no thread pool: the process forks
import fxpeft
from fxpeft.formats import files
from tests.models import mlp

X = (torch.randn(5, 16, generator=torch.Generator().manual_seed(2)),)
WRITES = {"os.rename", "os.link", "os.symlink", "os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
          "os.utime", "os.truncate", "shutil.copyfile", "shutil.copystat", "shutil.copytree", "shutil.rmtree"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def build(specs):
    adapted = None
    for name, spec in specs.items():
        rule = fxpeft.LoRA(targets=spec["targets"], r=spec["r"], alpha=spec["alpha"])
        if adapted is None:
            adapted = fxpeft.transform(mlp(), [rule], example_inputs=X, adapter_name=name)
        else:
            adapted.add_adapter(name, [rule])
        generator = torch.Generator().manual_seed(spec["seed"])
        with torch.no_grad():
            for _, tensor in sorted(adapted.adapters[name].peft_state_dict().items()):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return adapted.eval()


def save_killed_at(k, adapted, target, names, two_step, report):
    count = 0

    def step(what):
        nonlocal count
        if count == k:
            os.write(report, what.encode() + b"\n")
            os.kill(os.getpid(), signal.SIGKILL)
        count += 1

    def name(value):
        return os.path.basename(os.fsdecode(value)) if isinstance(value, (str, bytes, os.PathLike)) else "?"

    def hook(event, args):
        if event in WRITES or event == "open" and (
                any(c in args[1] for c in "wax+") if isinstance(args[1], str) else args[2] & WRITE_FLAGS):
            step(f"{event} {name(args[0])}" + (f" -> {name(args[1])}" if event in ("os.rename", "os.link") else ""))

    fsync, save_file, exchange = os.fsync, files.save_file, getattr(files, "_exchange", None)

    def counted_fsync(fd):
        step("os.fsync")
        return fsync(fd)

    def counted_save_file(state, filename, *args, **kwargs):
        step(f"save_file {name(filename)}")
        save_file(state, filename, *args, **kwargs)
        step(f"save_file {name(filename)} written")

    def counted_exchange(a, b):
        step(f"exchange {name(a)} <-> {name(b)}")
        return False if two_step else exchange(a, b)

    os.fsync, files.save_file = counted_fsync, counted_save_file
    if exchange is not None:
        files._exchange = counted_exchange
    sys.addaudithook(hook)
    adapted.save_adapter(target, names)
    os.write(report, f"done {count}\n".encode())


for scenario in json.loads(sys.argv[1]):
    root = Path(scenario["root"])
    old, new = build(scenario["old"]), build(scenario["new"])
    names = scenario["save"]
    old.save_adapter(root / "refs" / "old" / "adapter", names)
    new.save_adapter(root / "refs" / "new" / "adapter", names)
    pristine = root / "pristine"
    pristine.mkdir()
    if scenario["existing"]:
        old.save_adapter(pristine / "adapter", names)
        (pristine / "adapter" / "README.md").write_text("notes\n")
        if scenario.get("third"):  # an adapter in a sub-folder that this save does not write: kept
            build({"default": scenario["third"]}).save_adapter(pristine / "adapter" / "third")
        os.chmod(pristine / "adapter", scenario["mode"])
        if scenario.get("interrupted"):
            os.rename(pristine / "adapter", pristine / ".adapter.fxpeft-old-abcdefgh")
            shutil.copytree(root / "refs" / "new" / "adapter", pristine / ".adapter.fxpeft-save-abcdefgh")
    arena, steps = root / "arena", []
    for k in itertools.count():
        if arena.exists():
            shutil.rmtree(arena)
        shutil.copytree(pristine, arena, symlinks=True)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            try:
                save_killed_at(k, new, arena / "adapter", names, scenario.get("two_step", False), write)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        os.close(write)
        _, status = os.waitpid(pid, 0)
        with os.fdopen(read) as pipe:
            said = pipe.read().strip()
        shutil.copytree(arena, root / "snapshots" / f"{k:03d}", symlinks=True)
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            steps.append(said)
        elif said.startswith("done"):
            break
        else:
            sys.exit(f"{root.name}: the save at k={k} ended with status {status}: {said!r}")
    (root / "steps.json").write_text(json.dumps(steps, indent=1))
'''


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """Run the child once for every scenario; returns ``{scenario: root}``."""
    base = tmp_path_factory.mktemp("kills")
    plan = [dict(scenario, root=str(base / name), mode=FOLDER_MODE) for name, scenario in SCENARIOS.items()]
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(plan)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: base / name for name in SCENARIOS}


def folder_of(target: Path, name: str, names) -> Path:
    return target if isinstance(names, str) or name == "default" else target / name


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


class Expected:
    """The old and the new adapters as the child saved them whole: configs, tensors, and fxpeft's outputs."""

    def __init__(self, root: Path, scenario: dict):
        self.names = [scenario["save"]] if isinstance(scenario["save"], str) else scenario["save"]
        self.save = scenario["save"]
        self.files, self.outputs, self.loaded = {}, {}, {}
        for side in ("old", "new"):
            folder = root / "refs" / side / "adapter"
            self.files[side] = {name: read_adapter(folder_of(folder, name, self.save)) for name in self.names}
            loaded = self.fxpeft_load(folder)
            self.outputs[side] = {}
            for name in self.names:
                loaded.set_adapter(name)
                with torch.no_grad():
                    self.outputs[side][name] = loaded(*X)
        self.saver = loaded  # the new adapters, for the save that follows a kill
        for name in self.names:  # old and new can be told apart
            assert not torch.equal(self.outputs["old"][name], self.outputs["new"][name])

    def fxpeft_load(self, target: Path):
        first, *others = self.names
        loaded = fxpeft.load_adapter(mlp(), folder_of(target, first, self.save), adapter_name=first,
                                     example_inputs=X)
        for name in others:
            loaded.load_adapter(folder_of(target, name, self.save), name)
        return loaded.eval()

    def side_of(self, name: str, state: dict[str, torch.Tensor]) -> str:
        for side in ("old", "new"):
            reference = self.files[side][name][1]
            if sorted(state) == sorted(reference) and all(torch.equal(state[k], reference[k]) for k in reference):
                return side
        raise AssertionError(f"adapter {name!r} has the tensors of neither the old nor the new adapter")

    def fxpeft_side(self, target: Path) -> str:
        """Which whole version fxpeft reads and loads (read_adapter first: it applies the recovery rule)."""
        sides = set()
        for name in self.names:
            config, state = read_adapter(folder_of(target, name, self.save))
            side = self.side_of(name, state)
            assert config == self.files[side][name][0], f"{name}: tensors of the {side} adapter, config of another"
            sides.add(side)
        # load_adapter (a capture, the slow part) once per distinct folder content: the same bytes load the same
        key = hashlib.sha256(repr(sorted(file_bytes(target).items())).encode()).hexdigest()
        if key in self.loaded:
            assert sides == {self.loaded[key]}, sides
            return self.loaded[key]
        loaded = self.fxpeft_load(target)
        for name in self.names:
            side = self.side_of(name, loaded.adapter_state_dict(name))
            loaded.set_adapter(name)
            with torch.no_grad():
                torch.testing.assert_close(loaded(*X), self.outputs[side][name], rtol=0, atol=0)
            sides.add(side)
        assert len(sides) == 1, f"a mix of old and new adapters: {sides}"
        self.loaded[key] = sides.pop()
        return self.loaded[key]

    def peft_side(self, target: Path) -> str:
        first, *others = self.names
        model = peft.PeftModel.from_pretrained(mlp(), str(folder_of(target, first, self.save)), adapter_name=first)
        for name in others:
            model.load_adapter(str(folder_of(target, name, self.save)), adapter_name=name)
        model.eval()
        sides = set()
        for name in self.names:
            side = self.side_of(name, peft.get_peft_model_state_dict(model, adapter_name=name))
            config, expected = model.peft_config[name], self.files[side][name][0]
            assert (config.r, config.lora_alpha, set(config.target_modules)) == (
                expected["r"], expected["lora_alpha"], set(expected["target_modules"])), name
            model.set_adapter(name)
            with torch.no_grad():
                torch.testing.assert_close(model(*X), self.outputs[side][name], rtol=1e-5, atol=1e-6)
            sides.add(side)
        assert len(sides) == 1, f"PEFT loads a mix of old and new adapters: {sides}"
        return sides.pop()


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_a_save_killed_at_any_file_operation_leaves_one_whole_adapter(killed, name):
    scenario, root = SCENARIOS[name], killed[name]
    expected = Expected(root, scenario)
    steps = json.loads((root / "steps.json").read_text())
    snapshots = sorted((root / "snapshots").iterdir())
    assert len(snapshots) == len(steps) + 1 and len(steps) >= 10, steps  # the last one completed its save
    [old_folder] = [path for path in (root / "pristine").iterdir() if "fxpeft-save" not in path.name] or [None]
    unrelated = {} if old_folder is None else {path: data for path, data in file_bytes(old_folder).items()
                                               if path == "README.md" or path.startswith("third/")}
    seen, missing = [], []
    for k, snapshot in enumerate(snapshots):
        target = snapshot / "adapter"
        where = f"killed before step {k} ({steps[k] if k < len(steps) else 'completed'})"
        if target.exists():
            side = expected.peft_side(target)
            assert expected.fxpeft_side(target) == side, where
        else:  # a new folder not yet renamed into place, or the two-step commit's window
            assert not scenario["existing"] or scenario.get("two_step"), f"no folder left, {where}"
            missing.append(k)
            if scenario["existing"]:
                side = expected.fxpeft_side(target)  # fxpeft's recovery rule puts the old folder back...
                assert side == "old" and expected.peft_side(target) == "old", where  # ...for PEFT too
            else:
                with pytest.raises(AdapterLoadError, match="has no"):
                    read_adapter(target)
                side = "none"
        seen.append(side)
        if target.exists():
            assert {path: data for path, data in file_bytes(target).items() if path in unrelated} == unrelated, where
        # The next save succeeds, cleans every leftover of the killed one, and keeps the unrelated files.
        expected.saver.save_adapter(target, scenario["save"])
        assert os.listdir(snapshot) == ["adapter"], (where, os.listdir(snapshot))
        assert expected.fxpeft_side(target) == "new", where
        assert {path: data for path, data in file_bytes(target).items() if path in unrelated} == unrelated, where
        if scenario["existing"]:
            assert (target.stat().st_mode & 0o777) == FOLDER_MODE, where
    # Old until one commit step, new from it on: never back, never a mix.
    before = "none" if not scenario["existing"] else "old"
    first_new = seen.index("new")
    assert seen == [before] * first_new + ["new"] * (len(seen) - first_new), seen
    assert "exchange" in steps[first_new - 1] or "os.rename" in steps[first_new - 1], steps[first_new - 1]
    if scenario.get("interrupted"):  # no folder until the recovery renamed the old one back
        recovered = len(missing) - 1
        assert missing[:-1] == list(range(recovered)), missing
        assert steps[recovered - 1].startswith("os.rename .adapter.fxpeft-old-abcdefgh -> adapter"), steps
    if scenario.get("two_step"):  # and exactly the kill between the commit's two renames
        assert missing and steps[missing[-1] - 1].startswith("os.rename adapter -> .adapter.fxpeft-old-"), missing
        assert scenario.get("interrupted") or len(missing) == 1, missing
    elif scenario["existing"]:
        assert not missing
    print(f"{name}: {len(steps)} kill points, old/none before step {first_new}, then new")


# -- the pieces of the protocol, one at a time ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapters():
    old = fxpeft.transform(mlp(), [fxpeft.LoRA(targets=["fc1"], r=2, alpha=4)], example_inputs=X).eval()
    new = fxpeft.transform(mlp(), [fxpeft.LoRA(targets=["fc1"], r=2, alpha=16)], example_inputs=X).eval()
    with torch.no_grad():
        for tensor in new.adapter_state_dict().values():
            tensor.add_(0.5)
    return old, new


def alpha_of(folder: Path) -> int:
    return json.loads((folder / CONFIG_NAME).read_text())["lora_alpha"]


def test_folder_modes_and_unrelated_files_are_kept_by_hard_links(tmp_path, adapters):
    old, new = adapters
    old.save_adapter(tmp_path / "adapter")
    mask = os.umask(0o022)
    os.umask(mask)
    assert (tmp_path / "adapter").stat().st_mode & 0o7777 == 0o777 & ~mask  # a plain mkdir's mode
    (tmp_path / "adapter" / "README.md").write_text(README)
    os.chmod(tmp_path / "adapter", 0o750)
    inode = (tmp_path / "adapter" / "README.md").stat().st_ino
    new.save_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter").stat().st_mode & 0o7777 == 0o750
    assert (tmp_path / "adapter" / "README.md").stat().st_ino == inode  # linked, not copied
    assert alpha_of(tmp_path / "adapter") == 16 and os.listdir(tmp_path) == ["adapter"]


def test_only_leftovers_of_killed_saves_are_cleaned(tmp_path, adapters):
    old, new = adapters
    old.save_adapter(tmp_path / "adapter")
    stale, live = tmp_path / ".adapter.fxpeft-save-aaaaaaaa", tmp_path / ".adapter.fxpeft-save-bbbbbbbb"
    unrelated = tmp_path / ".adapter.fxpeft-save-notours"  # not a name fxpeft makes: not touched
    for folder in (stale, live, unrelated):
        folder.mkdir()
        (folder / WEIGHTS_NAME).write_bytes(b"partial")
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a save still running in another process holds its folder
        new.save_adapter(tmp_path / "adapter")
        assert sorted(os.listdir(tmp_path)) == sorted([live.name, unrelated.name, "adapter"])
    finally:
        os.close(fd)
    new.save_adapter(tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path)) == sorted([unrelated.name, "adapter"])


def test_a_failed_exchange_changes_nothing(tmp_path, adapters, monkeypatch):
    old, new = adapters
    old.save_adapter(tmp_path / "adapter")
    before = file_bytes(tmp_path / "adapter")

    def cross_device(a, b):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(a), None, str(b))

    monkeypatch.setattr(files, "_exchange", cross_device)
    with pytest.raises(AdapterSaveError, match="mount point"):
        new.save_adapter(tmp_path / "adapter")
    assert file_bytes(tmp_path / "adapter") == before and os.listdir(tmp_path) == ["adapter"]


def test_a_two_step_commit_whose_undo_fails_keeps_the_old_folder_for_recovery(tmp_path, adapters, monkeypatch):
    """The second rename fails, and so does putting the old folder back: nothing is deleted, and the next read
    (or save) restores the old adapter whole."""
    old, new = adapters
    old.save_adapter(tmp_path / "adapter")
    before = file_bytes(tmp_path / "adapter")
    rename = os.rename

    def failing(source, destination, *args, **kwargs):
        if Path(destination).name == "adapter":
            raise OSError(errno.EIO, "I/O error (injected)", str(source))
        return rename(source, destination, *args, **kwargs)

    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(AdapterSaveError, match="injected"):
        new.save_adapter(tmp_path / "adapter")
    monkeypatch.setattr(os, "rename", rename)
    assert not (tmp_path / "adapter").exists()
    [kept] = os.listdir(tmp_path)
    assert kept.startswith(".adapter.fxpeft-old-") and file_bytes(tmp_path / kept) == before
    config, _ = read_adapter(tmp_path / "adapter")  # the recovery rule renames it back
    assert config["lora_alpha"] == 4 and os.listdir(tmp_path) == ["adapter"]
    assert file_bytes(tmp_path / "adapter") == before
    new.save_adapter(tmp_path / "adapter")  # the two-step commit, without failures
    assert alpha_of(tmp_path / "adapter") == 16 and os.listdir(tmp_path) == ["adapter"]


def test_a_read_during_a_commit_is_read_again(tmp_path, adapters, monkeypatch):
    """A save commits between the read of the config and of the weights: read_adapter returns one version."""
    old, new = adapters
    old.save_adapter(tmp_path / "adapter")
    load_file, calls = files.load_file, []

    def load_during_a_save(path):
        if not calls:
            new.save_adapter(tmp_path / "adapter")
        calls.append(path)
        return load_file(path)

    monkeypatch.setattr(files, "load_file", load_during_a_save)
    config, state = read_adapter(tmp_path / "adapter")
    assert len(calls) == 2 and config["lora_alpha"] == 16
    for key, value in new.adapter_state_dict().items():
        assert torch.equal(state[key], value), key


def test_a_save_into_the_current_directory_moves_it_along(tmp_path, adapters, monkeypatch):
    old, new = adapters
    tmp_path = tmp_path.resolve()
    old.save_adapter(tmp_path / "adapter")
    monkeypatch.chdir(tmp_path / "adapter")
    new.save_adapter(".")
    assert Path(os.getcwd()) == tmp_path / "adapter" and alpha_of(Path(".")) == 16
    assert sorted(os.listdir(".")) == [CONFIG_NAME, WEIGHTS_NAME] and os.listdir(tmp_path) == ["adapter"]


def test_a_read_only_folder_is_not_replaced(tmp_path, adapters, monkeypatch):
    old, new = adapters
    tmp_path = tmp_path.resolve()
    old.save_adapter(tmp_path / "adapter")
    before = file_bytes(tmp_path / "adapter")
    os.chmod(tmp_path / "adapter", 0o555)
    if os.geteuid() == 0:  # root may write into any folder: report what any other user is told
        access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kwargs: (
            not mode & os.W_OK or Path(path) != tmp_path / "adapter") and access(path, mode, **kwargs))
    try:
        with pytest.raises(AdapterSaveError, match="read-only"):
            new.save_adapter(tmp_path / "adapter")
    finally:
        os.chmod(tmp_path / "adapter", 0o755)
    assert file_bytes(tmp_path / "adapter") == before and os.listdir(tmp_path) == ["adapter"]
