"""The ``.info`` compare-and-swap with a per-generation temp name: exclusive, and fenced.

``files.publish_info`` writes generation N to ``.volume-<id>.info.tmp-<N>``
(so a deletion can name it), created exclusively: a second publisher of the
same generation loses there. A publisher that died leaves that file behind;
the next locked operation on the volume removes it and goes on. And the claim
is linked from the publisher's descriptor, so a publisher whose temp file was
removed (and the name reused by another writer) publishes nothing, never the
other writer's half-written file. The bodies run in this process, confined to
``tmp_path``: the daemon's own code.
"""

from __future__ import annotations

import json
import os

import pytest
from oslo_config import cfg

from remotefs_aa import exception, opts, privsep
from remotefs_aa.image.chain import Chain, InProcessIO, _Bodies
from remotefs_aa.privsep import files

pytestmark = pytest.mark.functional


@pytest.fixture
def conf(tmp_path):
    conf = cfg.ConfigOpts()
    opts.register_opts(conf)
    privsep.register_opts(conf)
    conf([], default_config_files=[])
    conf.set_override("allowed_paths", [str(tmp_path)], group="privileged")
    privsep.use(conf)
    yield conf
    privsep._settings = None


def _text(generation: int) -> str:
    return json.dumps({"active": "volume-p", "generation": generation, "format": "raw"}) + "\n"


def test_a_second_publisher_of_a_generation_loses_and_a_dead_ones_file_is_removed(tmp_path, conf):
    d, f = str(tmp_path), _Bodies(files)
    with open(tmp_path / "volume-p", "wb") as image:
        image.truncate(1 << 30)
    assert f.publish_info(d, "volume-p", _text(1), 1, None) is None
    (tmp_path / ".volume-p.info.tmp-2").write_text("another publisher's, or a dead one's")
    assert f.publish_info(d, "volume-p", _text(2), 2, _text(1)) == _text(1)  # lost
    assert not (tmp_path / ".volume-p.gen.2").exists()
    # The next operation under the volume's lock removes the leftover first.
    chain = Chain(InProcessIO(conf), d, "p", 1, "raw")
    state = chain.create_snapshot("s1")
    assert state.generation == 2 and not (tmp_path / ".volume-p.info.tmp-2").exists()
    assert chain.verify(deep=False)["problems"] == []


def test_a_publisher_whose_temp_file_was_removed_publishes_nothing(tmp_path, conf, monkeypatch):
    d, f = str(tmp_path), _Bodies(files)
    assert f.publish_info(d, "volume-p", _text(1), 1, None) is None
    real_fsync = os.fsync
    tmp = tmp_path / ".volume-p.info.tmp-2"

    def swap_while_writing(fd: int) -> None:
        real_fsync(fd)
        if tmp.exists() and os.path.samestat(os.fstat(fd), os.stat(tmp)):
            # A sweep under the volume's lock removed our temp file, and another
            # writer is now writing its own under the same name.
            os.unlink(tmp)
            tmp.write_text("half of someone else's")

    monkeypatch.setattr(os, "fsync", swap_while_writing)
    assert f.publish_info(d, "volume-p", _text(2), 2, _text(1)) is not None  # lost
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert not (tmp_path / ".volume-p.gen.2").exists()
    assert (tmp_path / "volume-p.info").read_text() == _text(1)
    assert tmp.read_text() == "half of someone else's"  # theirs: neither published nor removed


@pytest.mark.parametrize("where", ["claim", "info"])
def test_a_non_file_claim_or_info_is_refused_never_read_as_no_info(tmp_path, conf, where):
    """A FIFO or a link where a claim or the .info stands must not hide the chain.

    Read as "no .info", the volume would look like its bare base: a clone or
    an upload would read old data, a delete would leave the overlays behind.
    """
    chain = Chain(InProcessIO(conf), str(tmp_path), "p", 1, "qcow2")
    chain.create_base("qcow2", "thin")
    chain.create_snapshot("s1")
    state = chain.load()
    if where == "claim":
        os.mkfifo(tmp_path / f".volume-p.gen.{state.generation + 1}")
    else:
        os.rename(tmp_path / "volume-p.info", tmp_path / "elsewhere.info")
        os.symlink(tmp_path / "elsewhere.info", tmp_path / "volume-p.info")
    again = Chain(InProcessIO(conf), str(tmp_path), "p", 1, "qcow2")
    with pytest.raises(exception.PrivilegedArgumentRefused, match="not a regular file|link"):
        again.load()
