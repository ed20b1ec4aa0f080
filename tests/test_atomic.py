"""A failed write leaves the previous file whole (resume logic trusts that existing files are complete)."""
import pytest

from lpld.atomic import write_atomically


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
