"""Writing model folders all at once: a failed command leaves no partial output behind."""

import contextlib
import os
import shutil
import tempfile

from ..cli import CommandError


def check_output_dir(output: str, overwrite: bool) -> None:
    """Reject an existing output folder unless `overwrite` is set."""
    if os.path.exists(output) and not overwrite:
        raise CommandError(f"output folder {output} already exists; pass --overwrite to replace it.")


def apply_default_permissions(folder: str) -> None:
    """Give `folder` and everything in it the modes that plain `mkdir` and `open` give under the umask.

    `tempfile.mkdtemp` creates the staging folder with mode 0700, and safetensors writes its files
    with mode 0600, so without this other users could not read a published model folder.
    """
    umask = os.umask(0)
    os.umask(umask)
    for root, _, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_output_dir(output: str, overwrite: bool = False):
    """Yield a temporary folder beside `output` and rename it to `output` only on success.

    On any exception the temporary folder is removed and `output` is left as it was.
    """
    check_output_dir(output, overwrite)
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(output))}.", dir=parent)
    try:
        yield staging
        apply_default_permissions(staging)
        if os.path.exists(output):
            shutil.rmtree(output)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
