"""``dpt-data list``, ``check`` and ``prepare`` and the safe unpacking, without a hub (see
test_loopback_hub.py for ``download``)."""
from __future__ import annotations

import errno
import io
import json
import stat
import zipfile
from pathlib import Path

import pytest

from dpt_lightning.data import archives
from dpt_lightning.data.archives import DatasetInstallError, prepare_dataset, unpack_zip
from dpt_lightning.data.audit import audit_dataset
from dpt_lightning.data.catalogue import CATALOGUE, CatalogueEntry, catalogue_entry
from dpt_lightning.data.splits import SPLITS
from dpt_lightning.data_cli import main
from fakedata import write_fake_dataset
from hub import benchmark_zip

#: train/val/test of the benchmark's published split files (the reference README's table; DermaMNIST's
#: split file has 7006 training images where the README says 7007; OCTMNIST from the README only).
PUBLISHED = {"BTMRI": (2854, 1141, 1717), "BUSI": (389, 155, 236), "CHMNIST": (2496, 1000, 1504),
             "COVID_19": (10582, 4232, 6351), "CTKidney": (6221, 2487, 3738), "DermaMNIST": (7006, 1003, 2005),
             "KneeXray": (5778, 826, 1656), "Kvasir": (2000, 800, 1200), "LungColon": (12500, 5000, 7500),
             "OCTMNIST": (97477, 10832, 1000), "RETINA": (2108, 841, 1268)}


def work_files(root: Path) -> list[str]:
    """What ``dpt-data`` left in its work folder, lock files aside."""
    return sorted(p.name for p in (root / ".dpt-data").iterdir() if p.suffix != ".lock")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_catalogue_holds_every_benchmark_dataset_with_its_archive_and_published_counts():
    assert {name: entry.counts for name, entry in CATALOGUE.items()} == PUBLISHED
    for name, entry in CATALOGUE.items():
        assert entry.archive.repo == "TahaKoleilat/BiomedCoOp" and entry.archive.filename == f"{name}.zip"
        assert entry.archive.repo_type == "dataset" and entry.licence and entry.origin_url.startswith("https://")
    assert catalogue_entry("btmri").name == "BTMRI"
    with pytest.raises(KeyError, match="known: BTMRI"):
        catalogue_entry("ChestX-ray14")


def test_list_shows_sources_counts_and_licence_notes(capsys):
    status, out, _ = run(capsys, "list")
    assert status == 0
    for name, counts in PUBLISHED.items():
        line = next(line for line in out.splitlines() if line.startswith(f"{name} "))
        assert "/".join(map(str, counts)) in line and f"TahaKoleilat/BiomedCoOp: {name}.zip" in line
        assert str(sum(counts)) in line
    assert "CC BY-NC 4.0" in out and "7007" in out and "--dry-run" in out


def split_with_counts(name: str, counts: tuple[int, int, int]) -> dict[str, list[list]]:
    """A split file of ``name`` with the published per-split counts, spread over the real classes in label
    order (generated names: the counts and class names are the benchmark's, the file lists are not)."""
    classnames = CATALOGUE[name].facts.classnames
    split = {}
    for part, total in zip(SPLITS, counts):
        split[part] = [[f"{classnames[k % len(classnames)].replace(' ', '_')}/{part}_{k}.png", k % len(classnames),
                        classnames[k % len(classnames)]] for k in range(total)]
    return split


def write_split_root(root: Path, name: str, counts: tuple[int, int, int]) -> None:
    """``<root>/<name>`` in the benchmark layout with a split file of ``counts`` and an empty file per image."""
    split = split_with_counts(name, counts)
    (root / name).mkdir(parents=True)
    (root / name / f"split_{name}.json").write_text(json.dumps(split))
    for classname in CATALOGUE[name].facts.classnames:
        (root / name / name / classname.replace(" ", "_")).mkdir(parents=True)
    for part in SPLITS:
        for relpath, _, _ in split[part]:
            (root / name / name / relpath).touch()


@pytest.mark.slow
def test_check_reports_the_published_counts_of_every_dataset(tmp_path, capsys):
    """A fake root per dataset with the published counts (108 k empty files; OCTMNIST, whose split file is not
    known, is left out): check finds the layout, every class folder and image, and the counts as published."""
    names = [name for name in PUBLISHED if name != "OCTMNIST"]
    for name in names:
        write_split_root(tmp_path, name, PUBLISHED[name])
    status, out, _ = run(capsys, "check", *names, "--root", str(tmp_path))
    assert status == 0, out
    for name in names:
        line = next(line for line in out.splitlines() if line.startswith(f"{name}: "))
        assert line.startswith(f"{name}: ok") and f"train/val/test {'/'.join(map(str, PUBLISHED[name]))} as published" \
            in line, line
        assert f"{sum(PUBLISHED[name])} images listed, all present" in line
    assert f"{len(names)} datasets checked in {tmp_path}: {len(names)} ok" in out


def test_check_reports_counts_that_differ_from_the_published_ones(tmp_path, capsys):
    train, val, test = PUBLISHED["BUSI"]
    write_split_root(tmp_path, "BUSI", (train - 3, val, test + 1))
    status, out, _ = run(capsys, "check", "BUSI", "--root", str(tmp_path))
    assert status == 1
    assert "BUSI: usable, but not the published benchmark" in out
    assert f"train {train - 3}, published {train}; test {test + 1}, published {test}" in out
    assert f"fix: dpt-data download BUSI --root {tmp_path} --replace" in out


def test_check_names_each_problem_and_the_command_that_fixes_it(tmp_path, capsys):
    split = write_fake_dataset(tmp_path, "BTMRI")
    image_dir = tmp_path / "BTMRI" / "BTMRI"
    missing, broken = split["train"][0][0], split["test"][0][0]
    (image_dir / missing).unlink()
    (image_dir / broken).write_bytes(b"not a jpeg")
    status, out, _ = run(capsys, "check", "BTMRI", "BUSI", "--root", str(tmp_path))
    assert status == 1
    assert f"1 listed image missing, e.g. {image_dir / missing}" in out
    assert f"{image_dir / broken}" not in out  # not decoded without --decode
    assert f"fix: dpt-data download BTMRI --root {tmp_path} --replace" in out
    assert f"{tmp_path / 'BUSI'} not found" in out and f"fix: dpt-data download BUSI --root {tmp_path}\n" in out

    status, out, _ = run(capsys, "check", "BTMRI", "--root", str(tmp_path), "--decode")
    assert f"{image_dir / broken}: cannot read image" in out

    __import__("shutil").rmtree(image_dir / "normal_brain")
    (tmp_path / "BTMRI" / "split_BTMRI.json").unlink()
    status, out, _ = run(capsys, "check", "BTMRI", "--root", str(tmp_path))
    assert "class folders missing in" in out and "normal_brain" in out
    assert f"split file {tmp_path / 'BTMRI' / 'split_BTMRI.json'} not found" in out

    status, out, _ = run(capsys, "check", "BTMRI", "--root", str(tmp_path / "BTMRI"))  # one level too deep
    assert f"--root looks like the BTMRI folder itself: give its parent, {tmp_path}" in out
    assert f"fix: dpt-data check BTMRI --root {tmp_path}" in out


# ------------------------------------------------------------------------------------------- unpacking
def zip_of(members: dict[str, bytes], link: str | None = None, method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        if link:
            info = zipfile.ZipInfo(link)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


@pytest.mark.parametrize("members, link, method, reason", [
    ({"BTMRI/../../evil.txt": b"x"}, None, zipfile.ZIP_DEFLATED, "leaves the archive's folder"),
    ({"/tmp/evil.txt": b"x"}, None, zipfile.ZIP_DEFLATED, "an absolute path"),
    ({"C:/evil.txt": b"x"}, None, zipfile.ZIP_DEFLATED, "an absolute path"),
    ({"BTMRI/a.jpg": b"x"}, "BTMRI/link", zipfile.ZIP_DEFLATED, "a symbolic link"),
    ({"BTMRI/bomb.bin": bytes(20_000_000)}, None, zipfile.ZIP_BZIP2, "a zip bomb"),
], ids=["dotdot", "absolute", "drive", "symlink", "bomb"])
def test_unpack_refuses_unsafe_archives_before_writing_anything(tmp_path, members, link, method, reason):
    archive = tmp_path / "BTMRI.zip"
    archive.write_bytes(zip_of(members, link, method))
    with pytest.raises(DatasetInstallError, match=reason):
        unpack_zip(archive, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "evil.txt").exists()


def test_unpack_refuses_duplicates_forged_sizes_and_oversized_archives(tmp_path, monkeypatch):
    archive = tmp_path / "dup.zip"
    with zipfile.ZipFile(archive, "w") as z, pytest.warns(UserWarning, match="Duplicate name"):
        z.writestr("a.txt", b"1")
        z.writestr("a.txt", b"2")
    with pytest.raises(DatasetInstallError, match="appears twice"):
        unpack_zip(archive, tmp_path / "out", progress=False)
    forged = tmp_path / "forged.zip"
    data = bytearray(zip_of({"BTMRI/a.txt": b"x" * 1000}, method=zipfile.ZIP_STORED))
    central = data.index(b"PK\x01\x02")
    data[central + 24:central + 28] = (10).to_bytes(4, "little")  # the directory says 10 bytes: a lie
    forged.write_bytes(bytes(data))
    with pytest.raises(DatasetInstallError, match="'BTMRI/a.txt' cannot be read .*damaged"):
        unpack_zip(forged, tmp_path / "out", progress=False)
    monkeypatch.setattr(archives, "MAX_UNPACKED_BYTES", 500)
    big = tmp_path / "big.zip"
    big.write_bytes(zip_of({"BTMRI/a.txt": b"x" * 1000}))
    with pytest.raises(DatasetInstallError, match="would unpack to 1000 B, more than the limit of 500 B"):
        unpack_zip(big, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("nested", [True, False], ids=["DIR-at-top", "contents-at-top"])
def test_prepare_installs_an_archive_into_the_benchmark_layout(tmp_path, capsys, nested):
    archive = tmp_path / "BTMRI.zip"
    data = benchmark_zip("BTMRI", tmp_path / "made", nested=nested)
    with zipfile.ZipFile(io.BytesIO(data)) as z:  # junk a zip made on a Mac holds
        members = {info.filename: z.read(info) for info in z.infolist()}
    archive.write_bytes(zip_of({**members, "__MACOSX/._BTMRI": b"junk"}))
    root = tmp_path / "data"
    status, out, _ = run(capsys, "prepare", "BTMRI", "--root", str(root), "--archive", str(archive))
    assert status == 0, out
    assert sorted(p.name for p in (root / "BTMRI").iterdir()) == ["BTMRI", "split_BTMRI.json"]
    assert sorted(p.name for p in root.iterdir()) == [".dpt-data", "BTMRI"]
    assert work_files(root) == []  # the unpacking folder is gone (the lock file of the dataset stays)
    audit = audit_dataset(CATALOGUE["BTMRI"], root, decode=True)
    assert audit.ok and audit.differences  # a small copy: usable, not the published counts

    before = (root / "BTMRI" / "split_BTMRI.json").stat().st_mtime_ns
    status, _, err = run(capsys, "prepare", "BTMRI", "--root", str(root), "--archive", str(archive))
    assert status == 1 and f"{root / 'BTMRI'} exists: nothing was changed" in err and "--replace" in err
    assert (root / "BTMRI" / "split_BTMRI.json").stat().st_mtime_ns == before
    assert run(capsys, "prepare", "BTMRI", "--root", str(root), "--archive", str(archive), "--replace")[0] == 0


def test_an_archive_without_the_layout_is_refused(tmp_path, capsys):
    archive = tmp_path / "BTMRI.zip"
    archive.write_bytes(zip_of({"readme.txt": b"hello", "images/a.jpg": b"x"}))
    status, _, err = run(capsys, "prepare", "BTMRI", "--root", str(tmp_path / "data"), "--archive", str(archive))
    assert status == 1 and "holds no BTMRI/<class folder>/ image folder (its top level: images/, readme.txt)" in err
    assert not (tmp_path / "data" / "BTMRI").exists()


def test_a_full_disk_while_unpacking_leaves_no_dataset(tmp_path, capsys, monkeypatch):
    archive = tmp_path / "BTMRI.zip"
    archive.write_bytes(benchmark_zip("BTMRI", tmp_path / "made"))
    calls, copy = [], archives._copy_member

    def full(archive_file, info, target):  # the disk fills up at the fourth file
        calls.append(info.filename)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return copy(archive_file, info, target)

    monkeypatch.setattr(archives, "_copy_member", full)
    root = tmp_path / "data"
    status, _, err = run(capsys, "prepare", "BTMRI", "--root", str(root), "--archive", str(archive))
    assert status == 1 and "the disk is full (No space left on device); nothing was installed" in err
    assert sorted(p.name for p in root.iterdir()) == [".dpt-data"] and work_files(root) == []

    monkeypatch.setattr(archives, "free_bytes", lambda folder: 1000)  # checked before anything is written
    status, _, err = run(capsys, "prepare", "BTMRI", "--root", str(root), "--archive", str(archive))
    assert status == 1 and "unpacking BTMRI.zip needs" in err and "free some space" in err


def test_a_licence_bound_dataset_is_prepared_from_the_users_archives(tmp_path, capsys, monkeypatch):
    """The catalogue takes datasets that cannot be downloaded for the user (ChestX-ray14, CheXpert): an
    entry with no archive and a preparer that writes the layout from the user's own files."""
    made = tmp_path / "made"
    write_fake_dataset(made, "BUSI")
    images, labels = tmp_path / "images.zip", tmp_path / "labels.json"  # as the owner might publish them
    images.write_bytes(zip_of({path.relative_to(made / "BUSI" / "BUSI").as_posix(): path.read_bytes()
                               for path in (made / "BUSI" / "BUSI").rglob("*") if path.is_file()}))
    labels.write_bytes((made / "BUSI" / "split_BUSI.json").read_bytes())

    def preparer(files, folder):
        unpack_zip(files[0], folder / "BUSI", progress=False)
        (folder / "split_BUSI.json").write_bytes(files[1].read_bytes())

    entry = CatalogueEntry("BUSI", "a licence-bound collection", "https://example.org", "registration required",
                           None, preparer=preparer, access="Register at example.org and download its files.")
    monkeypatch.setitem(CATALOGUE, "BUSI", entry)
    root = tmp_path / "data"
    status, _, err = run(capsys, "download", "BUSI", "--root", str(root))
    assert status == 1 and "BUSI cannot be downloaded for you (registration required). Register at example.org" in err
    assert f"dpt-data prepare BUSI --root {root} --archive <your downloaded archives>" in err
    status, out, _ = run(capsys, "prepare", "BUSI", "--root", str(root), "--archive", str(images), str(labels))
    assert status == 0, out
    assert audit_dataset(entry, root).matches and "nothing published to compare with" in out


def test_one_dpt_data_at_a_time_per_dataset_and_root(tmp_path, capsys):
    archive = tmp_path / "BTMRI.zip"
    archive.write_bytes(benchmark_zip("BTMRI", tmp_path / "made"))
    root = tmp_path / "data"
    with archives.dataset_lock(root, CATALOGUE["BTMRI"]):  # another process downloading BTMRI
        status, _, err = run(capsys, "prepare", "BTMRI", "--root", str(root), "--archive", str(archive))
        assert status == 1 and f"another dpt-data is working on BTMRI in {root}" in err
        status, _, err = run(capsys, "prepare", "BUSI", "--root", str(root), "--archive", str(archive))
        assert "another dpt-data" not in err and "holds no BUSI/<class folder>/ image folder" in err  # not locked
    assert run(capsys, "prepare", "BTMRI", "--root", str(root), "--archive", str(archive))[0] == 0


def test_replace_swaps_a_linked_dataset_folder_without_touching_what_it_points_to(tmp_path, capsys):
    archive = tmp_path / "BTMRI.zip"
    archive.write_bytes(benchmark_zip("BTMRI", tmp_path / "made"))
    elsewhere = tmp_path / "elsewhere" / "BTMRI"
    write_fake_dataset(tmp_path / "elsewhere", "BTMRI")
    before = sorted(p.relative_to(elsewhere) for p in elsewhere.rglob("*"))
    root = tmp_path / "data"
    root.mkdir()
    (root / "BTMRI").symlink_to(elsewhere)
    assert run(capsys, "prepare", "BTMRI", "--root", str(root), "--archive", str(archive))[0] == 1  # kept
    assert (root / "BTMRI").is_symlink()
    assert run(capsys, "prepare", "BTMRI", "--root", str(root), "--archive", str(archive), "--replace")[0] == 0
    assert not (root / "BTMRI").is_symlink() and (root / "BTMRI" / "split_BTMRI.json").is_file()
    assert sorted(p.relative_to(elsewhere) for p in elsewhere.rglob("*")) == before and work_files(root) == []
