"""experiments.files.write_atomically: a failed write never replaces the last good file."""

from pathlib import Path

import pytest

from experiments.files import write_atomically


def writer(text: str, fail: bool = False):
    def write(tmp: str) -> None:
        Path(tmp).write_text(text)
        if fail:
            raise RuntimeError("interrupted")

    return write


def test_a_writer_that_fails_midway_leaves_the_previous_file_as_it_was(tmp_path):
    path = tmp_path / "results.json"
    write_atomically(str(path), writer('{"good": 1}'))
    with pytest.raises(RuntimeError, match="interrupted"):
        write_atomically(str(path), writer('{"trunc', fail=True))
    assert path.read_text() == '{"good": 1}'


def test_the_temporary_name_keeps_the_suffix_a_writer_reads_the_format_from(tmp_path):
    seen = []
    write_atomically(
        str(tmp_path / "fig.png"), lambda tmp: seen.append(tmp) or writer("")(tmp), ".png"
    )
    assert seen == [str(tmp_path / "fig.png.tmp.png")] and (tmp_path / "fig.png").exists()
