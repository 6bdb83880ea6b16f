"""Publish a finished export into DIR atomically: a failed or killed export leaves no model.onnx behind, and one
over a previous export keeps that one usable until the new one is complete.

Every export is built in a hidden `.export-*` folder inside DIR (`prepare_out_dir` first removes what a killed
one left, and restores a folder a killed swap parked aside); `publish` then moves it in (see its docstring).

    out = prepare_out_dir("out/tiny", force=False)
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
        ...  # write tmp/model.onnx (+ model.onnx.data)
        publish(Path(tmp), out)
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from runtime import files
from runtime.artifact import ONNX_NAME, ArtifactError, data_path, read_onnx_artifact

from .ecosystem import TOOL_FILES
from .graph import ExportError

OURS = (ONNX_NAME, data_path(ONNX_NAME).name, *TOOL_FILES)  # what an export puts in DIR (model.onnx first: moved in last)


def prepare_out_dir(out_dir: str | os.PathLike, force: bool) -> Path:
    """Create DIR (or accept an empty one / one holding a previous export); refuse other contents unless force."""
    out = Path(out_dir).expanduser()
    files.recover_folder(out)  # a publish killed between its two renames: the old export comes back first
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".probe-"):
            pass
    except OSError as e:
        raise ExportError(f"cannot write to --out {out}: {e.strerror or e}; choose a writable folder") from None
    clear_temp_dirs(out)
    previous = (out / "model.onnx").exists()
    if previous:
        try:
            read_onnx_artifact(out)
        except ArtifactError:
            previous = False
    # config.json, tokenizer files...: ours only beside a previous export (a Hugging Face folder has its own)
    ours = OURS if previous else OURS[:2]
    others = sorted(p.name for p in out.iterdir() if p.name not in ours)
    if (out / "model.onnx").exists() and not previous:
        others.insert(0, "model.onnx (not a nanogpt-deploy export)")
    if others and not force:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise ExportError(f"--out {out} holds files that are not a previous export ({shown}); "
                          f"choose an empty folder or pass --force to write model.onnx there anyway")
    return out


def clear_temp_dirs(out: Path) -> None:
    """Remove `.export-*` folders a killed export left in `out`, and the `.NAME.publish-*` / `.NAME.old-*` folders
    beside it a killed publish left (`out` exists: those hold no current export)."""
    leftovers = [*out.glob(".export-*")]
    if out.is_dir():
        leftovers += [*out.parent.glob(f".{out.name}.publish-*"), *out.parent.glob(f".{out.name}.old-*")]
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)


def publish(tmp: Path, out: Path) -> None:
    """Make the finished export in `tmp` (a `.export-*` folder inside `out`) the export at `out`.

    Into a folder with no previous export: model.onnx.data, then model.onnx, are renamed in (model.onnx last:
    its presence means done; a kill in between leaves no model.onnx).

    Over a previous export, the old one stays usable until the new one is complete: `tmp` becomes a folder
    beside `out` (`.NAME.publish-*`, with hard links to anything else `out` holds, its mode copied), and the two
    folders are exchanged in one renameat2(RENAME_EXCHANGE) call (runtime/files.exchange_paths; Linux on
    ext4, xfs, btrfs, tmpfs): at every instant `out` is the old complete folder or the new complete one, and a
    server that opened the old files keeps reading them. The old folder is then deleted. This beats a symlink
    swap, which would turn the user's folder into a link. Where the exchange is unsupported, two renames:
    `out` -> `.NAME.old-*`, the new folder -> `out`; a kill between them leaves `out` missing for a moment,
    and the next load (artifact.resolve_file) or export (prepare_out_dir) renames the old folder back
    (files.recover_folder): never a mix of old and new files. When no folder can be made beside `out` (a
    read-only parent, `out` a mount point), the files are renamed in place as into a fresh folder.
    """
    out = Path(os.path.realpath(out))  # a symlinked DIR: swap the folder it points at, keep the link
    if not (out / "model.onnx").exists():
        return _move_in(tmp, out, previous=False)
    staging = out.with_name(f".{out.name}.publish-{tmp.name.rsplit('-', 1)[-1]}")
    try:
        os.rename(tmp, staging)  # the same filesystem as `out` unless `out` is a mount point
    except OSError:
        return _move_in(tmp, out)
    try:
        os.chmod(staging, out.stat().st_mode & 0o7777)
        _link_others(out, staging)
        _fsync_dir(staging)
        try:
            swapped = files.exchange_paths(staging, out)  # staging now holds the old export
        except OSError:
            swapped = False
        if swapped:
            _fsync_dir(out.parent)
            return
        backup = files.backup_name(out)
        try:
            os.rename(out, backup)
        except OSError:  # `out` itself cannot be renamed (sticky parent, bind mount): in place, as a fresh folder
            return _move_in(staging, out)
        try:
            os.rename(staging, out)
        except BaseException:
            os.rename(backup, out)
            raise
        _fsync_dir(out.parent)
        staging = backup
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_in(tmp: Path, out: Path, previous: bool = True) -> None:
    """Rename model.onnx.data, then model.onnx, from `tmp` into `out`. Over a previous export its files the new one
    lacks go (a stale data file, tool files left out by --no-tool-files); into another folder (--force), files of
    the same names that the new export does not write stay: they are that folder's own (a Hugging Face folder's
    config.json and tokenizer files)."""
    (out / "model.onnx").unlink(missing_ok=True)  # from here until the last rename, DIR holds no finished export
    for name in OURS[1:]:
        if (tmp / name).exists():
            os.replace(tmp / name, out / name)
        elif previous:
            (out / name).unlink(missing_ok=True)
    os.replace(tmp / "model.onnx", out / "model.onnx")


def _link_others(out: Path, staging: Path) -> None:
    """Give `staging` what `out` holds besides an export (files kept there with --force): hard links, else copies."""
    for p in out.iterdir():
        if p.name in OURS or p.name.startswith((".export-", ".probe-")) or (staging / p.name).exists():
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.copytree(p, staging / p.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(p, staging / p.name)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _fsync_dir(path: Path) -> None:
    files._fsync(path)
