"""`watch.FileWatch`: when `--watch` reloads."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from guardd.config import DEFAULT_PRINCIPAL, load_config_file
from guardd.daemon import Daemon, _read_digests
from guardd.policy.engine import Policy
from guardd.watch import WRITER_PATIENCE, FileWatch, stamp


def test_a_change_is_reported_once_it_has_settled_and_once_only(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("a")
    watch = FileWatch([str(policy)])
    assert not watch.changed()
    policy.write_text("bb")
    assert not watch.changed()  # just written: it may still be half-way
    assert watch.changed()  # the same for a whole poll: settled
    watch.follow([str(policy)])  # reloaded
    assert not watch.changed()


def test_a_refused_state_is_not_tried_again_but_the_next_is(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("a")
    watch = FileWatch([str(policy)])
    policy.write_text("broken")
    watch.changed()
    assert watch.changed()
    watch.refused()
    assert not watch.changed() and not watch.changed()
    policy.write_text("fixed!")
    watch.changed()
    assert watch.changed()


def test_a_symlink_swap_and_a_vanished_file_are_changes(tmp_path: Path) -> None:
    for version in ("v1", "v2"):
        (tmp_path / version).mkdir()
        (tmp_path / version / "policy.yaml").write_text("same")
    (tmp_path / "..data").symlink_to("v1")
    (tmp_path / "policy.yaml").symlink_to("..data/policy.yaml")
    watch = FileWatch([str(tmp_path / "policy.yaml")])
    (tmp_path / "..tmp").symlink_to("v2")
    os.rename(tmp_path / "..tmp", tmp_path / "..data")
    watch.changed()
    assert watch.changed()  # same size, maybe same time: another file
    watch.follow(watch.paths)
    (tmp_path / "v2" / "policy.yaml").unlink()
    watch.changed()
    assert watch.changed()


def test_a_file_rewritten_in_place_with_its_size_and_time_kept_is_a_change(
        tmp_path: Path) -> None:
    """Session 55's attack (Low): a deny list overwritten in place by `cp -p` (or `rsync -a
    --inplace`, or a build's fixed timestamps) with a file of the same size and modification
    time was never reloaded: the name it now denies stayed allowed, and nothing said so. The
    change time, which no program sets back, says the content changed."""
    listed = tmp_path / "deny.txt"
    listed.write_text("evil1.test\n")
    kept = listed.stat().st_mtime_ns
    watch = FileWatch([str(listed)])
    with listed.open("r+") as rewritten:  # (in place: the same inode, the same size)
        rewritten.write("evil2.test\n")
    os.utime(listed, ns=(kept, kept))
    assert listed.stat().st_mtime_ns == kept and listed.stat().st_size == len("evil1.test\n")
    watch.changed()
    assert watch.changed()


def test_a_file_whose_metadata_alone_changed_is_no_change(tmp_path: Path) -> None:
    """Session 55's re-attack (Low): with the change time in the stamp, a `chmod`, a hard link
    or `touch -a` reloaded the policy, its content the same, and a reload forgets the names
    clients resolved (connects by address refused until they look them up again). A file
    whose content is what was loaded (its SHA-256, as the policy read it) did not change."""
    listed = tmp_path / "deny.txt"
    listed.write_text("evil1.test\n")
    digest = hashlib.sha256(listed.read_bytes()).hexdigest()
    watch = FileWatch([str(listed)], {str(listed): digest})
    os.chmod(listed, 0o640)
    os.link(listed, tmp_path / "linked.txt")
    assert not watch.changed() and not watch.changed() and not watch.changed()
    with listed.open("r+") as rewritten:  # (and then the content: a change)
        rewritten.write("evil2.test\n")
    watch.changed()
    assert watch.changed()


def test_an_edit_that_lands_while_the_policy_loads_is_seen_afterwards(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("a")
    watch = FileWatch([str(policy)])
    seen = watch.now()  # before the load reads the file
    policy.write_text("edited meanwhile")
    watch.follow([str(policy)], seen)
    watch.changed()
    assert watch.changed()


def test_an_edit_between_the_read_and_the_watch_is_a_change(tmp_path: Path) -> None:
    """CI of session 56: a domain list edited after start-up read it and before the watch
    took its stamp (so too a list a reloaded policy names first, stamped after the load) was
    taken for the state loaded, and never reloaded. A file stamped after the load whose content
    is not what the load read (its SHA-256) is a change."""
    listed = tmp_path / "allowed.txt"
    listed.write_text("api.test\n")
    digest = hashlib.sha256(listed.read_bytes()).hexdigest()  # (the load reads it)
    listed.write_text("api.test\nother.test\n")
    watch = FileWatch([str(listed)], {str(listed): digest})
    watch.changed()
    assert watch.changed()


def test_a_list_two_policies_read_apart_and_edited_between_is_a_change(
        tmp_path: Path) -> None:
    """Review of session 57: each principal's policy is read on its own; a domain list both
    name, edited between the two reads, took the last read's digest, and the first
    principal's policy kept the old list, never reloaded."""
    listed = tmp_path / "shared.txt"
    listed.write_text("old.test\n")
    policy = 'version: "1.0"\nrules:\n  - {id: listed, action: "*", domainList: shared.txt, ' \
        'effect: deny}\n'
    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text(policy)
    first = Policy.from_file(tmp_path / "a.yaml")
    listed.write_text("old.test\nnewdeny.test\n")
    policies = {"default": first, "agent": Policy.from_file(tmp_path / "b.yaml")}
    files = list(dict.fromkeys(path for each in policies.values() for path in each.files))
    watch = FileWatch(files, _read_digests(policies))
    watch.changed()
    assert watch.changed()


def test_a_file_only_a_refused_policy_names_is_followed_from_then(tmp_path: Path) -> None:
    """A domain list the refused policy names and that is not there yet: its arrival is a
    change (attack pass 24)."""
    policy, later = tmp_path / "policy.yaml", tmp_path / "later.txt"
    policy.write_text("a")
    watch = FileWatch([str(policy)])
    policy.write_text("names later.txt")
    watch.changed()
    assert watch.changed()
    watch.refused(watch.now(), [str(policy), str(later)])
    assert watch.paths == (str(policy), str(later))
    watch.changed()
    assert watch.changed()  # (its state as the load read it is unknown: one try more)
    watch.refused(watch.now(), [str(policy), str(later)])  # (still not there)
    assert not watch.changed() and not watch.changed()
    later.write_text("api.test\n")
    watch.changed()
    assert watch.changed()


def test_a_file_that_came_before_the_refusal_was_taken_is_a_change(tmp_path: Path) -> None:
    """Review: the list came between the load's failed read and `refused`: taken for the
    state refused, it was never a change."""
    policy, later = tmp_path / "policy.yaml", tmp_path / "later.txt"
    policy.write_text("names later.txt")
    watch = FileWatch([str(policy)])
    seen = watch.now()  # (the load reads; later.txt is not there)
    later.write_text("api.test\n")
    watch.refused(seen, [str(policy), str(later)])
    watch.changed()
    assert watch.changed()


def test_a_file_its_writer_still_has_open_is_not_loaded_however_long_it_pauses(
        tmp_path: Path) -> None:
    """Session 54's attack: a deny list rewritten in place by a writer that paused for 3.5 s,
    its denied name last, had stayed the same for a poll and was loaded without that name,
    which the next rule then allowed until the writer was done. A file changed in place is
    settled only once its writer closed it."""
    listed = tmp_path / "denylist.txt"
    listed.write_text("a.test\nb.test\n")
    watch = FileWatch([str(listed)])
    with listed.open("w") as writer:  # (truncated: the writer has begun)
        writer.write("b.test\n")
        writer.flush()
        assert not any(watch.changed() for _ in range(5))  # (it pauses: however long)
        assert watch.being_written == [str(listed)]
        writer.write("a.test\n")
    assert not watch.changed()  # (closed: settled at the next poll)
    assert watch.changed() and watch.being_written == []


def test_a_file_replaced_by_a_rename_is_loaded_at_once_and_watched_from_then(
        tmp_path: Path) -> None:
    """What deploy.md asks: a new file renamed over the old (an editor's save, `mv`); the new
    file's own writes are watched once it is followed."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("a")
    watch = FileWatch([str(policy)])
    (tmp_path / "new.yaml").write_text("replaced")
    os.rename(tmp_path / "new.yaml", policy)
    watch.changed()
    assert watch.changed()
    watch.follow([str(policy)])
    with policy.open("a") as writer:
        writer.write(" and more")
        writer.flush()
        watch.changed()
        assert not watch.changed() and watch.being_written == [str(policy)]


def test_a_writer_still_at_work_across_a_reload_still_holds_the_next(tmp_path: Path) -> None:
    """The review of session 54: what a writer had open was forgotten when the files were
    followed again after a reload, and its half-written file loaded at the next poll."""
    listed = tmp_path / "list.txt"
    listed.write_text("a.test\n")
    watch = FileWatch([str(listed)])
    seen = watch.now()
    with listed.open("a") as writer:
        writer.write("b.")
        writer.flush()
        watch.follow([str(listed)], seen)  # (a reload read it meanwhile)
        assert not any(watch.changed() for _ in range(3))
    watch.changed()
    assert watch.changed()


def test_a_file_not_there_yet_is_watched_for_its_writer_as_it_comes(tmp_path: Path) -> None:
    """The review of session 54: a domain list the policy names that is not there yet
    (attack pass 24), written in place when it comes (`curl > list`, pausing), had no watch
    and was loaded half-written; nor did one deleted and written again."""
    listed = tmp_path / "list.txt"
    watch = FileWatch([str(listed)])
    with listed.open("w") as writer:
        writer.write("a.")
        writer.flush()
        assert not any(watch.changed() for _ in range(3))
    watch.changed()
    assert watch.changed()
    watch.follow([str(listed)])
    listed.unlink()
    with listed.open("w") as writer:  # (created anew: not a byte yet)
        assert not any(watch.changed() for _ in range(3))
        writer.write("b.test\n")
    watch.changed()
    assert watch.changed()


def test_a_writer_that_holds_a_file_open_is_named_in_the_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The review of session 54: a writer that never closes a file it changed holds every
    reload back, and nothing said so."""
    listed = tmp_path / "list.txt"
    listed.write_text("a.test\n")
    watch = FileWatch([str(listed)])
    with listed.open("a") as writer:
        writer.write("b.test\n")
        writer.flush()
        for _ in range(WRITER_PATIENCE + 1):  # (the first poll sees it change)
            assert not watch.changed()
    assert caplog.text.count("is open for writing after") == 1 and str(listed) in caplog.text


def test_a_writer_seen_by_no_event_still_holds_the_file(tmp_path: Path) -> None:
    """Session 54's last re-attack: a list written in place through a hard link in another
    directory (whose events go to that directory), or by a writer paused while another
    process opened and closed the file, was loaded half-written. A read lease, refused while
    any process has the file open for writing, says so whatever the name or the events."""
    (tmp_path / "d1").mkdir()
    (tmp_path / "d2").mkdir()
    listed = tmp_path / "d1" / "list.txt"
    listed.write_text("a.test\n")
    os.link(listed, tmp_path / "d2" / "link.txt")
    watch = FileWatch([str(listed)])
    with (tmp_path / "d2" / "link.txt").open("w") as writer:
        writer.write("b.")
        writer.flush()
        open(listed, "a").close()  # (another process's open and close)
        assert not any(watch.changed() for _ in range(3))
        assert watch.being_written == [str(listed)]
    watch.changed()
    assert watch.changed()


def test_a_file_renamed_away_while_written_holds_nothing_back(tmp_path: Path) -> None:
    """Session 54's last re-attack: a list renamed away while its writer paused stayed open
    for good to the watch (its close came under the new name), and no reload came again."""
    listed, policy = tmp_path / "list.txt", tmp_path / "policy.yaml"
    listed.write_text("a.test\n")
    policy.write_text("v1")
    watch = FileWatch([str(listed), str(policy)])
    writer = listed.open("a")
    writer.write("b.")
    writer.flush()
    os.rename(listed, tmp_path / "list.old")
    writer.close()
    (tmp_path / "new.yaml").write_text("v2, naming list.old")
    os.rename(tmp_path / "new.yaml", policy)
    watch.changed()
    assert watch.changed() and watch.being_written == []


def test_a_daemon_config_edited_between_its_read_and_the_watch_is_a_change(
        tmp_path: Path) -> None:
    """Session 57's last attack (Medium): the daemon config file, read before the daemon
    starts and stamped only once the watch began, was taken as loaded when rewritten in
    between (a policy switched to another that denies: never loaded, 5 runs of 5). It is
    stamped before its read (`cli`), and the watch starts from that stamp."""
    policy = tmp_path / "policy.yaml"
    policy.write_text('version: "1.0"\nrules: []\n')
    config_file = tmp_path / "guardd.yaml"
    config_file.write_text(f"policy: {policy}\n")
    seen = stamp(str(config_file))  # (before the read)
    config = load_config_file(config_file)
    config_file.write_text(f"policy: {policy}\nlogLevel: debug\n")  # (the edit, meanwhile)
    daemon = Daemon(config, config_file=config_file, config_seen=seen)
    watch = daemon.file_watch({DEFAULT_PRINCIPAL: Policy.from_file(policy)})
    watch.changed()
    assert watch.changed()
