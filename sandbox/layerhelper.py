"""IO: the single-threaded process that applies one layer, forked ready by the fork server of
``sandbox.helperserver`` for :class:`sandbox.unpack.LayerHelper` (``python -I -m
sandbox.layerhelper`` runs the same on its own).

Why a process of its own: a layer on top of parents is unpacked into an overlay mount (lower =
the parents, upper = the new layer directory), so that writes through a symlink that lives in a
lower layer (usrmerge's ``lib -> usr/lib`` in layer 1, ``lib/x.so`` in layer 2) land where the
merged view puts them, and whiteouts become real overlay whiteouts written by the kernel. That
needs ``unshare(CLONE_NEWNS)`` and ``mount``, which the trio daemon never calls (STYLE §6). The
mount lives in this process's private mount namespace and vanishes with it, even on SIGKILL.

Steps, in order, each its own function:

1. ``read_plan``: the plan, one JSON object on stdin (see the table), validated.
2. ``die_with_parent``: PR_SET_PDEATHSIG, so a dead daemon leaves no unpacker behind.
3. ``enter_mount_namespace`` (only with parents): unshare(CLONE_NEWNS), then make ``/``
   recursively private so nothing we mount propagates to the host.
4. ``mount_merged`` (only with parents): overlay on ``WORK/merged`` with
   ``lowerdir=l/N:..:l/0,upperdir=DEST,workdir=ovl`` (relative to WORK; ``WORK/l/<i>`` are
   short symlinks to the parents, lowest first) and
   ``userxattr,index=off,metacopy=off,redirect_dir=nofollow``. ``userxattr`` (kernel commit
   2d2f2d7322ff, Documentation/filesystems/overlayfs.rst "Non-standard behavior"/"userxattr")
   keeps overlay metadata in ``user.overlay.*`` so the same layer directories work under a
   daemon that is real root and one that is root of a user namespace. It refuses redirects
   and metacopy (they would let a user forge ``user.overlay.redirect``): the kernel rejects
   ``userxattr`` with ``redirect_dir=off`` ("conflicting options: userxattr,redirect_dir=
   follow", as ``off`` still follows), so it is ``nofollow``: none created, none followed.
   ``index=off`` keeps the upper directory free of an index tied to this particular mount.
5. ``unpack``: :func:`sandbox.unpack.unpack_stream` from the source fd into the merged root
   (or straight into DEST for a layer without parents).
6. ``unmount``: the overlay is unmounted and WORK emptied before success is reported.
   ``strip_bookkeeping`` then removes the ``user.overlay.*`` xattrs overlayfs records for its
   own use on copy-up (``origin``, ``impure``, ``uuid``: tied to this mount and filesystem)
   and keeps only ``user.overlay.opaque``, the one that means something in a lower layer
   (stacker and BuildKit's differ keep the same subset).
7. ``report``: one JSON record on stdout (the status fd), then exit 0 (``os._exit``, after
   flushing stdio: no interpreter teardown); stdout is moved away first so that nothing else
   can ever be written to it.

Plan (stdin, one JSON object):

=================== ===============================================================
``name``            blob name used in errors
``source_fd``       inherited fd with the layer stream (read to its end;
                    ``sandbox.helperserver.SOURCE_FD`` in a forked helper)
``parents``         layer directories, lowest first (may be empty)
``dest``            empty directory that becomes the layer
``work``            empty directory on DEST's filesystem (null without parents)
``limits``          :class:`sandbox.archive.UnpackLimits` as JSON
``expected_*``      ``expected_diff_id``/``expected_digest``: ``sha256:…`` or null
``hash_compressed`` false when the source's writer hashed it: a compressed stream is then
                    not hashed again (see :func:`sandbox.unpack.unpack_stream`)
=================== ===============================================================

Status records (stdout, exactly one):

====================================== ============================================
``{"result": LayerResult.to_json()}``  the layer is complete in DEST (exit 0)
``{"error": RuntimedError.to_json()}`` failed; DEST/WORK may hold partial state that the
                                       caller removes (exit 1)
(nothing)                              the helper crashed; stderr says why
====================================== ============================================
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import signal
import sys
import traceback
from pathlib import Path
from typing import Final, NoReturn

from runtimed.errors import InternalError, InvalidParamsError, Json, RuntimedError
from sandbox import syscalls
from sandbox.archive import LayerResult, UnpackPlan
from sandbox.fstree import walk_tree
from sandbox.unpack import unpack_stream

log = logging.getLogger(__name__)

# Documentation/filesystems/overlayfs.rst: "userxattr", "Sharing and copying layers"
# (index=off), "Metadata only copy up" (metacopy=off), "Redirect dir" (redirect_dir=nofollow).
OVERLAY_OPTIONS: Final = "userxattr,index=off,metacopy=off,redirect_dir=nofollow"
OVERLAY_XATTR_PREFIX: Final = "user.overlay."
KEPT_OVERLAY_XATTRS: Final = frozenset({"user.overlay.opaque"})
LINKS: Final = "l"  # WORK/l/<i>: short symlinks to the parent layers
OVERLAY_WORK: Final = "ovl"  # WORK/ovl: overlayfs's own workdir
# The mount(2) data argument is one page; keep a margin.
_MAX_OPTIONS: Final = 4000
_FORBIDDEN_IN_PATHS: Final = (",", ":", "\\")


def read_plan(text: bytes) -> UnpackPlan:
    """Step 1. Raises InvalidParamsError naming the bad field."""
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise InvalidParamsError(f"plan: not JSON: {exc}", details={"parameter": "."}) from exc
    return UnpackPlan.from_json(obj)


def die_with_parent() -> None:
    """Step 2, with the descriptor limit raised to its hard limit: walking a deep layer (for
    ``strip_bookkeeping``) holds one descriptor per level."""
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def enter_mount_namespace() -> None:
    """Step 3: a private mount namespace whose mounts never propagate back to the host."""
    syscalls.unshare(syscalls.CLONE_NEWNS)
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)


def overlay_options(layers: int, upper: str) -> str:
    """The overlay mount data, relative to WORK: ``layers`` lower dirs named by the symlinks
    ``l/0`` (lowest) .. ``l/N``, listed top first; ``upper`` is DEST relative to WORK.

    Short symlinks, as Docker's overlay2 driver uses, keep 127 layers (OCI's usual maximum)
    far inside the single page that mount(2) takes for its data, whatever the store's paths.

    Raises:
        InvalidParamsError: DEST holds a character the option syntax cannot carry, or the
            options do not fit in a page.
    """
    if any(c in upper for c in _FORBIDDEN_IN_PATHS):
        raise InvalidParamsError(
            f"overlay upper dir {upper}: ',', ':' and '\\' cannot be passed to overlayfs",
            details={"parameter": "dest"},
        )
    lower = ":".join(f"{LINKS}/{i}" for i in reversed(range(layers)))
    data = f"lowerdir={lower},upperdir={upper},workdir={OVERLAY_WORK},{OVERLAY_OPTIONS}"
    if len(data.encode()) > _MAX_OPTIONS:
        raise InvalidParamsError(
            f"overlay options for {layers} layers exceed one page",
            details={"parameter": "parents"},
        )
    return data


def mount_merged(parents: list[Path], dest: Path, work: Path) -> Path:
    """Step 4: the merged view of the parents with DEST as its upper directory."""
    merged = work / "merged"
    for sub in (merged, work / OVERLAY_WORK, work / LINKS):
        sub.mkdir(mode=0o700)
    for i, parent in enumerate(parents):
        (work / LINKS / str(i)).symlink_to(parent.resolve())
    data = overlay_options(len(parents), os.path.relpath(dest.resolve(), work.resolve()))
    os.chdir(work)  # overlayfs resolves the relative lowerdir/upperdir/workdir from here
    syscalls.mount("overlay", merged, "overlay", 0, data)
    return merged


def unpack(plan: UnpackPlan, root: Path) -> LayerResult:
    """Step 5."""
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return unpack_stream(
            plan.source_fd,
            root_fd,
            plan.limits,
            name=plan.name,
            expected_diff_id=plan.expected_diff_id,
            expected_digest=plan.expected_digest,
            hash_compressed=plan.hash_compressed,
        )
    finally:
        os.close(root_fd)


def unmount(merged: Path, work: Path) -> None:
    """Step 6: detach the overlay and leave WORK empty."""
    syscalls.umount2(merged)
    # overlayfs leaves WORK/ovl/work (mode 000, maybe holding leftovers) behind.
    shutil.rmtree(work / OVERLAY_WORK)
    shutil.rmtree(work / LINKS)
    merged.rmdir()


def strip_bookkeeping(dest: Path) -> None:
    """Step 6, second half: keep only the overlay xattrs that describe the layer itself."""
    top = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _strip(top, follow=True)
        for dir_fd, _, name, _ in walk_tree(top):
            # The magic link names the directory; the last component is not followed.
            _strip(f"/proc/self/fd/{dir_fd}/{name}", follow=False)
    except OSError as exc:
        raise syscalls.oserror(exc, syscall="strip overlay xattrs") from exc
    finally:
        os.close(top)


def _strip(target: int | str, *, follow: bool) -> None:
    for key in os.listxattr(target, follow_symlinks=follow):
        if key.startswith(OVERLAY_XATTR_PREFIX) and key not in KEPT_OVERLAY_XATTRS:
            os.removexattr(target, key, follow_symlinks=follow)


def run(plan_text: bytes) -> LayerResult:
    """Steps 1-6."""
    plan = read_plan(plan_text)
    die_with_parent()
    dest = Path(plan.dest)
    if not plan.parents:
        return unpack(plan, dest)
    assert plan.work is not None  # UnpackPlan.from_json requires it with parents
    work = Path(plan.work)
    enter_mount_namespace()
    merged = mount_merged([Path(p) for p in plan.parents], dest, work)
    result = unpack(plan, merged)
    unmount(merged, work)
    strip_bookkeeping(dest)
    return result


def report(status_fd: int, record: dict[str, Json]) -> None:
    """Step 7."""
    data = json.dumps(record).encode()
    while data:
        data = data[os.write(status_fd, data) :]


def main() -> int:
    # stdout is the status fd: move it away so that stray output cannot corrupt the record.
    status_fd = os.dup(1)
    os.dup2(2, 1)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="layerhelper: %(message)s")
    try:
        result = run(sys.stdin.buffer.read())
    except RuntimedError as exc:
        report(status_fd, {"error": exc.to_json()})
        return 1
    except Exception as exc:  # the one top-level catch: report, then show the traceback
        traceback.print_exc()
        report(status_fd, {"error": InternalError(f"layer helper: {exc!r}").to_json()})
        return 1
    report(status_fd, {"result": result.to_json()})
    return 0


def run_process() -> NoReturn:
    """The whole process: :func:`main`, then exit at once.

    Nothing here needs an orderly interpreter shutdown: the record went out with os.write,
    logging writes through at once, and the daemon threads of an unpack hold nothing to
    flush. Skipping it (tens of ms freeing the module graph and the unpack's objects) lets
    the caller read EOF and see the helper gone that much sooner.
    """
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    run_process()
