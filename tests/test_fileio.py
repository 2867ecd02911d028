"""unet_jax.fileio: the one-line reason of a failed operating-system call."""

from __future__ import annotations

import errno

import pytest

from unet_jax.fileio import os_error_reason


@pytest.mark.parametrize(
    ("err", "reason"),
    [
        # The system's text and the file it names.
        (
            OSError(errno.ENOSPC, "No space left on device", "/out/a.csv"),
            "No space left on device: /out/a.csv",
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "/ro/out"),
            "Permission denied: /ro/out",
        ),
        # No file named: the system's text alone.
        (OSError(errno.EIO, "Input/output error"), "Input/output error"),
        # No system text: the error's own.
        (OSError("the disk went away"), "the disk went away"),
        # Nothing at all: the type's name.
        (OSError(), "OSError"),
        (FileNotFoundError(), "FileNotFoundError"),
    ],
)
def test_os_error_reason(err, reason):
    assert os_error_reason(err) == reason


def test_os_error_reason_of_a_real_failure(tmp_path):
    missing = tmp_path / "no_such_folder" / "a.csv"
    with pytest.raises(OSError) as e:
        open(missing, "w")
    assert os_error_reason(e.value) == f"No such file or directory: {missing}"
