"""Writing checkpoints: HF ``nemotron_h`` safetensors (one file, or shards with an index), with the
ModelOpt quantization config when the model is quantized; under expert parallelism rank 0 writes
every rank's experts.

Saving never edits a checkpoint in place. :func:`save_pretrained` writes the whole new checkpoint
into a fresh ``<dir>.tmp-XXXXXXXX`` beside the target, syncs it, then renames the old directory to
``<dir>.old-XXXXXXXX``, renames the new one in and deletes the old one. Any error before the swap
(a full disk, an interrupt) removes the temporary directory and leaves the old checkpoint as it
was; only a crash between the two renames leaves the old checkpoint under its ``.old-`` name. The
writer owns ``config.json``, ``hf_quant_config.json``, ``*.safetensors`` and
``*.safetensors.index.json``: a new save drops every old file of those names (no stale shard, index
or quantization config survives) and carries every other entry over unchanged (tokenizer files,
README, generation_config.json, subdirectories), hard-linked where the filesystem allows.
"""
from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
from typing import Optional

from . import distributed


def _owned(name: str) -> bool:
    """The files :func:`save_pretrained` writes: an old one of these names never survives a save."""
    return name in ("config.json", "hf_quant_config.json") or name.endswith((".safetensors", ".safetensors.index.json"))


def _write(model, path: str, max_shard_bytes: Optional[int], peers=()) -> None:
    """config.json (+ quantization config) and the tensors: this process's state dict, then each
    ``peers`` state dict (other ranks' routed experts, one at a time), split into files of at most
    ``max_shard_bytes``; one ``model.safetensors`` when there is one piece and no limit, else shards
    ``model-XXXXX-of-NNNNN.safetensors`` and the index."""
    from safetensors.torch import save_file

    from .checkpoint import INDEX, QUANT_CONFIG, quant_config_of
    q = quant_config_of(model)
    extra = {"dtype": str(model.dtype).replace("torch.", "")}
    if q is not None:
        extra["quantization_config"] = q
        with open(os.path.join(path, QUANT_CONFIG), "w") as f:
            json.dump({"producer": q["producer"], "quantization": {k: v for k, v in q.items() if k != "producer"}},
                      f, indent=2)
    model.config.save_pretrained(path, extra=extra)
    own = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    pieces = itertools.chain([own], (sd for _, sd in peers))
    written, total = [], 0                  # (temporary file name, its tensor names)
    for piece in pieces:
        shards, cur, size = [], {}, 0
        for k, v in piece.items():
            nbytes = v.numel() * v.element_size()
            if cur and max_shard_bytes is not None and size + nbytes > max_shard_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[k], size, total = v, size + nbytes, total + nbytes
        shards.append(cur)
        for shard in shards:
            name = f"part-{len(written):05d}.tmp"
            save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
            written.append((name, list(shard)))
        del piece, shards, cur
    if len(written) == 1 and max_shard_bytes is None:
        os.rename(os.path.join(path, written[0][0]), os.path.join(path, "model.safetensors"))
        return
    weight_map = {}
    for i, (tmp, keys) in enumerate(written):
        name = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        os.rename(os.path.join(path, tmp), os.path.join(path, name))
        weight_map.update({k: name for k in keys})
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _carry_over(old: str, new: str) -> None:
    """Entries of ``old`` the writer does not own, into ``new`` (hard links where possible)."""
    for entry in os.scandir(old):
        if _owned(entry.name):
            continue
        dst = os.path.join(new, entry.name)
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), dst)
        elif entry.is_dir():
            shutil.copytree(entry.path, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry.path, dst)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _fsync(path: str, *, directory: bool = False) -> None:
    """Flush a file or directory to disk, so the renames publish complete files."""
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError:                         # some filesystems cannot sync a directory
        if not directory:
            raise
    finally:
        os.close(fd)


def _fresh_dir(target: str) -> str:
    """A new empty directory ``<target>.tmp-XXXXXXXX`` (made by os.mkdir, so the umask applies)."""
    while True:
        name = f"{target}.tmp-{secrets.token_hex(4)}"
        try:
            os.mkdir(name)
            return name
        except FileExistsError:
            continue


def save_pretrained(model, path: str, *, max_shard_bytes: Optional[int] = None, ep_timeout: Optional[float] = 600.0
                    ) -> None:
    """Write the checkpoint into a fresh directory beside ``path`` and swap it in (module docstring).

    Under expert parallelism every rank calls it: rank 0 writes the whole checkpoint (no shared
    filesystem needed), its own tensors first, then each other rank's routed experts, received one
    rank at a time into a shard of their own (rank 0 holds its model plus one rank's experts); the
    result is one ordinary sharded checkpoint with its index, loadable on one process or any world
    size that divides the experts. The other ranks return once rank 0 reports the swap done; every
    wait is bounded by ``ep_timeout`` seconds (rank 0 writes the ranks' shards in turn)."""
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes: expected a positive byte count or None, got {max_shard_bytes}")
    group = distributed.ep_group_of(model)
    if group is not None and group.size() > 1:
        distributed.save_from_ranks(model, group, ep_timeout, lambda peers: _save(model, path, max_shard_bytes, peers))
    else:
        _save(model, path, max_shard_bytes, ())


def _save(model, path: str, max_shard_bytes: Optional[int], peers) -> None:
    target = os.path.realpath(path)
    if os.path.exists(target) and not os.path.isdir(target):
        raise NotADirectoryError(f"path: {path} exists and is not a directory")
    cwd = os.path.realpath(os.getcwd())
    if os.path.commonpath([target, cwd]) == target:
        raise ValueError(f"path: {path} holds the working directory, which a save replaces; save elsewhere")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = _fresh_dir(target)
    try:
        if os.path.isdir(target):
            shutil.copymode(target, tmp)
            _carry_over(target, tmp)
        _write(model, tmp, max_shard_bytes, peers)
        for root, dirs, files in os.walk(tmp):
            for f in files:
                if not os.path.islink(os.path.join(root, f)):
                    _fsync(os.path.join(root, f))
            _fsync(root, directory=True)
        if not os.path.isdir(target):
            os.rename(tmp, target)
        else:
            old = f"{target}.old-{secrets.token_hex(4)}"
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        _fsync(parent, directory=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
